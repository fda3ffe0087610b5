"""coap+tcp under a flood: ``--max-tcp-connections`` closes new connections at once, counted and warned
about at a bounded rate (StringTransport, MemoryReactorClock, one loopback run with N+1 sockets)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from nettester.metrics import new_registry
from nettester.protocols.coap.message import encode_uint
from nettester.protocols.coap.options import CoapServerOptions
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.coap.tcp import SignalCode, SignalOption, StreamParameters, encode_frame
from nettester.protocols.coap.tcplink import WARNING_INTERVAL, CoapTcpConnection, TcpLink
from tests.logcapture import log_events
from tests.loopback import wait_until


def connect(link: TcpLink, port: int = 40001) -> tuple[CoapTcpConnection, StringTransport]:
    connection = link.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", port))
    connection.makeConnection(transport)
    return connection, transport


def test_connections_past_the_cap_are_closed_at_once_counted_and_warned_about_once() -> None:
    clock = Clock()
    # Streams that outlive the test's clock moves: only the cap closes connections here.
    link = TcpLink(clock, StreamParameters(csm_timeout=1e6), max_connections=2)
    admitted = [connect(link, 40001 + index) for index in range(2)]
    assert all(transport.value() and not transport.disconnecting for _, transport in admitted)  # CSM sent
    with log_events() as events:
        refused = [connect(link, 40010 + index) for index in range(3)]
    for connection, transport in refused:
        assert connection.stream is None and transport.value() == b"" and transport.disconnecting
    assert link.closed["max_connections"] == 3 and link.refused == 3 and len(link.connections) == 2
    warnings = [event for event in events if event.get("event") == "coap_tcp_max_connections"]
    assert len(warnings) == 1 and warnings[0]["bound"] == 2 and warnings[0]["count"] == 1
    assert str(refused[0][0]).startswith("tcp#")  # the line names the connection
    # A refused connection's end costs nothing and frees no slot.
    refused[0][0].connectionLost(Failure(ConnectionError("gone")))
    assert len(link.connections) == 2
    # An admitted one leaving frees a slot.
    admitted[0][0].connectionLost(Failure(ConnectionError("gone")))
    connection, transport = connect(link, 40020)
    assert connection.stream is not None and not transport.disconnecting
    # The next warning comes after the interval and tells how many were refused meanwhile.
    with log_events() as events:
        connect(link, 40021)
        clock.advance(WARNING_INTERVAL)
        connect(link, 40022)
    warnings = [event for event in events if event.get("event") == "coap_tcp_max_connections"]
    assert [event["count"] for event in warnings] == [4]


def test_client_logs_the_servers_release_and_abort() -> None:
    """A client connection (``ready`` set) names the server's Release options and an Abort's
    Bad-CSM-Option in its info lines."""
    link = TcpLink(Clock())
    connection = link.buildProtocol(None)
    connection.ready = defer.Deferred()
    connection.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5683)))
    with log_events() as events:
        connection.dataReceived(encode_frame(SignalCode.CSM) + encode_frame(
            SignalCode.RELEASE, b"", [(SignalOption.ALTERNATIVE_ADDRESS, b"192.0.2.10:5683"),
                                      (SignalOption.HOLD_OFF, encode_uint(20))]))
    (line,) = [formatEvent(event) for event in events if event.get("event") == "coap_tcp_released"]
    assert line == (f"{connection} server released the connection: Alternative-Address 192.0.2.10:5683, "
                    "Hold-Off 20 s")
    connection = link.buildProtocol(None)
    connection.ready = defer.Deferred()
    connection.ready.addErrback(lambda _: None)
    connection.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 5683)))
    with log_events() as events:
        connection.dataReceived(encode_frame(SignalCode.ABORT, b"", [(SignalOption.BAD_CSM_OPTION, encode_uint(4))],
                                             b"no block-wise here"))
    (line,) = [formatEvent(event) for event in events if event.get("event") == "coap_tcp_aborted"]
    assert line.endswith("closed (peer_abort): the peer aborted: no block-wise here (Bad-CSM-Option 4)")


def test_a_peer_that_does_not_read_stops_being_read() -> None:
    """Backpressure: once data flows the connection is its transport's streaming producer, and a
    full send buffer (``pauseProducing``) stops the reading of more requests."""
    link = TcpLink(Clock())
    connection, transport = connect(link)
    assert transport.producer is None  # not during a TLS handshake: nothing flows yet
    connection.dataReceived(encode_frame(SignalCode.CSM))
    assert transport.producer is connection and transport.streaming
    connection.pauseProducing()
    assert transport.producerState == "paused"
    connection.resumeProducing()
    assert transport.producerState == "producing"


def test_no_cap_without_max_connections() -> None:
    link = TcpLink(Clock())
    for index in range(50):
        connect(link, 40001 + index)
    assert len(link.connections) == 50 and link.refused == 0


class _Reactor(MemoryReactorClock):
    """A memory reactor that also "listens" on UDP (the server's coap endpoints next to coap+tcp)."""

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        return self.listenTCP(port, protocol, interface=interface)


def test_server_option_and_metric_family() -> None:
    options = CoapServerOptions()
    options.parseOptions([])
    assert options["max-tcp-connections"] == 10000
    memory = _Reactor()
    service = CoapServerService(memory, 0, ["127.0.0.1"], tcp=True, max_tcp_connections=1)
    service.startService()
    try:
        factories = [entry[1] for entry in memory.tcpServers if isinstance(entry[1], TcpLink)]
        assert len(factories) == 2 and all(factory.max_connections == 1 for factory in factories)
        link = factories[0]
        connect(link)
        connect(link, 40002)
        assert service.summary()["tcp_refused"] == 1
        families = {family.name: family for family in
                    text_string_to_metric_families(_exposition(service))}
        samples = {sample.labels["reason"]: sample.value
                   for sample in families["nettester_coap_server_tcp_refused"].samples}
        assert samples["max_connections"] == 1 and samples["slowloris"] == 0
    finally:
        service.stopService()


def test_environment_variable_sets_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COAP_MAX_TCP_CONNECTIONS", "7")
    options = CoapServerOptions()
    options.parseOptions(["--tcp"])
    assert options["max-tcp-connections"] == 7


def _exposition(service: CoapServerService) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(new_registry(service.metrics)).decode()


class _Watch(Protocol):
    """A raw TCP client that only records what it got and when it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


class _WatchFactory(ClientFactory):
    def __init__(self) -> None:
        self.watch = _Watch()

    def buildProtocol(self, addr: Any) -> _Watch:
        return self.watch


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_loopback_n_plus_one_connections() -> Generator[Any, Any, None]:
    bound = 4
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True, max_tcp_connections=bound)
    service.startService()
    watches: list[_Watch] = []
    connectors = []
    try:
        port = next(entry[2] for entry in service.listening if entry[0] == "coap+tcp" and entry[3] == "extended")
        for _ in range(bound):
            factory = _WatchFactory()
            connectors.append(reactor.connectTCP("127.0.0.1", port, factory))
            watches.append(factory.watch)
        yield wait_until(lambda: all(watch.data for watch in watches), what="the CSM of the first connections")
        factory = _WatchFactory()
        connectors.append(reactor.connectTCP("127.0.0.1", port, factory))
        yield wait_until(lambda: factory.watch.lost, what="the connection past the cap closed")
        assert factory.watch.data == b""  # no CSM: closed before any stream existed
        assert service.summary()["tcp_refused"] == 1
        assert sum(len(link.connections) for link in service.tcp_links) == bound
        assert not any(watch.lost for watch in watches)
    finally:
        for connector in connectors:
            connector.disconnect()
        yield service.stopService()
        yield defer.succeed(None)
