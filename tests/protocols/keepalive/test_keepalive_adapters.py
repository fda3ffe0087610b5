"""The Twisted adapters on a MemoryReactorClock: logs, close causes, timers, reconnects."""

import errno
import random
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from nettester.interfaces import IReportingService
from nettester.protocols.keepalive.adapter import address_text, close_cause
from nettester.protocols.keepalive.client import (
    KeepAliveClientProtocol,
    KeepAliveClientService,
)
from nettester.protocols.keepalive.server import (
    KeepAliveServerProtocol,
    KeepAliveServerService,
)
from nettester.protocols.keepalive.transport import tcp_ending
from nettester.protocols.keepalive.wire import ClientTiming

CLIENT_ADDRESS = IPv4Address("TCP", "10.0.0.2", 40000)
SERVER_ADDRESS = IPv4Address("TCP", "10.0.0.1", 49665)


# ------------------------------------------------------------------ server


def _server(timeout: float = 20.0) -> tuple[MemoryReactorClock, KeepAliveServerService]:
    reactor = MemoryReactorClock()
    service = KeepAliveServerService(reactor, 49665, keepalive_timeout=timeout)
    service.startService()
    return reactor, service


def _accept(reactor: MemoryReactorClock) -> tuple[KeepAliveServerProtocol, StringTransport]:
    factory = reactor.tcpServers[-1][1]
    protocol = factory.buildProtocol(CLIENT_ADDRESS)
    transport = StringTransport(hostAddress=SERVER_ADDRESS, peerAddress=CLIENT_ADDRESS)
    protocol.makeConnection(transport)
    return protocol, transport


def test_server_service_provides_reporting_and_listens_where_told() -> None:
    reactor, service = _server()
    verifyObject(IReportingService, service)
    assert reactor.tcpServers[0][0] == 49665
    assert service.port_number == 49665


def test_server_answers_and_closes_a_silent_client_with_the_original_lines(logged: Any) -> None:
    reactor, service = _server(timeout=20.0)
    protocol, transport = _accept(reactor)
    assert logged.lines("conn_attempt") == ["New TCP connection attempt 10.0.0.2:40000"]
    protocol.dataReceived(b"Establish Session 3 r-3-1\nKeep Alive 1\n")
    assert transport.value() == b"Keep Alive Response 1\n"
    reactor.pump([1.0] * 19)
    assert not transport.disconnecting
    reactor.advance(1.0)
    assert logged.lines("keepalive_missing") == ["Keep alive request not received 10.0.0.2:40000, conn=r-3-1"]
    assert logged.lines("conn_terminating") == ["Terminating TCP connection from 10.0.0.2:40000 :keep_alive_missing"]
    assert logged.events[-1]["log_level"].name == "info" and transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert logged.lines("conn_closed") == [
        "TCP connection from 10.0.0.2:40000 closed, conn=r-3-1: closed_by_server (keep_alive_missing)"]
    summary = service.summary()
    assert (summary["open"], summary["keepalives"], summary["keepalive_missing"], summary["closed_by_server"]) == (
        0, 1, 1, 1)


@pytest.mark.parametrize(
    "reason, cause, level",
    [(ConnectionDone(), "peer_closed", "info"), (ConnectionLost(), "peer_reset", "error")],
)
def test_server_tells_a_fin_from_a_reset(logged: Any, reason: Exception, cause: str,
                                         level: str) -> None:
    reactor, service = _server()
    protocol, _ = _accept(reactor)
    protocol.dataReceived(b"Establish Session 3 r-3-1\n")
    protocol.connectionLost(Failure(reason))
    closed = logged.named("conn_closed")
    assert [(event["cause"], event["conn"], event["log_level"].name) for event in closed] == [(cause,
                                                                                               "r-3-1", level)]
    assert service.summary()[cause] == 1
    assert reactor.getDelayedCalls() == []


def test_server_closes_gracefully_on_garbage(logged: Any) -> None:
    reactor, service = _server()
    protocol, transport = _accept(reactor)
    protocol.dataReceived(b"Establish Session 3 r-3-1\nGET / HTTP/1.1\nKeep Alive 1\n")
    assert logged.lines("protocol_error") == ["Invalid message from 10.0.0.2:40000, conn=r-3-1: unknown message: "
                                               "GET / HTTP/1.1"]
    assert transport.disconnecting and transport.value() == b""
    assert service.summary()["protocol_errors"] == 1


def test_server_stop_closes_every_connection_and_waits_for_them() -> None:
    reactor, service = _server()
    protocols = [_accept(reactor) for _ in range(3)]
    stopped = service.stopService()
    assert all(transport.disconnecting for _, transport in protocols)
    fired: list[object] = []
    stopped.addCallback(fired.append)
    for protocol, _ in protocols[:2]:
        protocol.connectionLost(Failure(ConnectionDone()))
    assert not fired
    protocols[2][0].connectionLost(Failure(ConnectionDone()))
    assert len(fired) == 1 and service.summary()["closed_by_server"] == 3


# ------------------------------------------------------------------ client


def _fleet(clients: int = 1, dummy: float = 0.0) -> tuple[MemoryReactorClock, KeepAliveClientService]:
    reactor = MemoryReactorClock()
    service = KeepAliveClientService(reactor, "10.0.0.1", 49665, clients, ClientTiming(5.0, 10.0, dummy),
                                     ramp_up=10.0, reconnect_delay=2.0, rng=random.Random(7), run_id="run")
    service.startService()
    return reactor, service


def _connect(reactor: MemoryReactorClock, index: int = -1) -> tuple[KeepAliveClientProtocol, StringTransport]:
    host, port, factory, timeout, _ = reactor.tcpClients[index]
    assert (host, port) == ("10.0.0.1", 49665)
    protocol = factory.buildProtocol(SERVER_ADDRESS)
    transport = StringTransport(hostAddress=CLIENT_ADDRESS, peerAddress=SERVER_ADDRESS)
    protocol.makeConnection(transport)
    return protocol, transport


def test_clients_start_spread_over_the_ramp_up() -> None:
    reactor, service = _fleet(clients=20)
    verifyObject(IReportingService, service)
    reactor.advance(5.0)
    assert 3 < len(reactor.tcpClients) < 17
    reactor.advance(5.0)
    assert len(reactor.tcpClients) == 20


def test_client_establishes_keeps_alive_and_measures_rtt(logged: Any) -> None:
    reactor, service = _fleet()
    reactor.advance(10.0)
    protocol, transport = _connect(reactor)
    assert transport.value() == b"Establish Session 1 run-1-1\n"
    assert logged.lines("conn_open") == ["Client 1: connected 10.0.0.2:40000 -> 10.0.0.1:49665, conn=run-1-1"]
    transport.clear()
    reactor.advance(5.0)
    assert transport.value() == b"Keep Alive 1\n"
    reactor.advance(0.25)
    protocol.dataReceived(b"Keep Alive Response 1\n")
    summary = service.summary()
    assert (summary["keepalives"], summary["rtt_avg_ms"], summary["errors"]) == (1, 250.0, 0)


def test_client_closes_when_the_response_is_missing_then_reconnects(logged: Any) -> None:
    reactor, service = _fleet()
    reactor.advance(10.0)
    protocol, transport = _connect(reactor)
    reactor.pump([1.0] * 15)  # Keep Alive 1 at +5 s, unanswered at +15 s
    assert logged.lines("response_missing") == ["Client 1: Keep alive response not received, conn=run-1-1"]
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert logged.lines("conn_closed") == ["Client 1: closed TCP connection, conn=run-1-1 :response_missing"]
    assert len(reactor.tcpClients) == 1
    reactor.advance(2.0)
    assert len(reactor.tcpClients) == 2
    _, transport = _connect(reactor)
    assert transport.value() == b"Establish Session 1 run-1-2\n"
    assert service.summary()["responses_missing"] == 1


@pytest.mark.parametrize(
    "reason, line, cause",
    [
        (ConnectionDone(), "Client 1: Server terminated TCP connection, conn=run-1-1", "server_closed"),
        (ConnectionLost(), "Client 1: TCP connection reset, conn=run-1-1", "resets"),
    ],
)
def test_client_tells_a_fin_from_a_reset(logged: Any, reason: Exception, line: str,
                                         cause: str) -> None:
    reactor, service = _fleet()
    reactor.advance(10.0)
    protocol, _ = _connect(reactor)
    protocol.connectionLost(Failure(reason))
    closed = logged.named("conn_closed")
    assert [formatEvent(event) for event in closed] == [line]
    assert closed[0]["log_level"].name == "error"
    assert service.summary()[cause] == 1 and service.summary()["errors"] == 1
    assert [call for call in reactor.getDelayedCalls() if call.active()]  # the reconnect


def test_client_logs_an_unavailable_server_and_retries(logged: Any) -> None:
    reactor, service = _fleet()
    reactor.advance(10.0)
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert logged.lines("server_unavailable") == [
        "Client 1: Server unavailable Connection was refused by other side (is keepalive-server running at "
        "10.0.0.1:49665? retrying in 2 s), conn=run-1-1"]
    reactor.advance(2.0)
    assert len(reactor.tcpClients) == 2


def test_client_stop_closes_with_a_fin_and_stops_reconnecting() -> None:
    reactor, service = _fleet(clients=2)
    reactor.advance(10.0)
    protocol, transport = _connect(reactor, 0)
    stopped = service.stopService()
    assert transport.disconnecting
    fired: list[object] = []
    stopped.addCallback(fired.append)
    protocol.connectionLost(Failure(ConnectionDone()))
    assert fired and service.summary()["errors"] == 0
    reactor.advance(60.0)
    assert len(reactor.tcpClients) == 2


def test_how_tcp_ended_is_found_under_tls_too() -> None:
    class Reset:
        lost_errno = errno.ECONNRESET

    class Fin:
        saw_fin = True

    class Tls:
        def __init__(self, transport: object) -> None:
            self.transport = transport

    assert tcp_ending(Tls(Reset())) == "ECONNRESET (104: Connection reset by peer)"
    assert tcp_ending(Tls(Fin())) == "FIN"
    assert tcp_ending(StringTransport()) is None


@pytest.mark.parametrize(
    "reason, tcp_end, expected",
    [
        (ConnectionDone(), None, ("peer_closed", "FIN")),
        (ConnectionLost(), "FIN", ("peer_closed", "FIN without TLS close_notify")),
        (ConnectionLost(), "ECONNRESET (104: Connection reset by peer)",
         ("peer_reset", "ECONNRESET (104: Connection reset by peer)")),
        (ConnectionLost(), None, ("peer_reset", "Connection to the other side was lost in a non-clean fashion.")),
    ],
)
def test_close_causes(reason: Exception, tcp_end: str | None, expected: tuple[str, str]) -> None:
    assert close_cause(Failure(reason), None, "closed_by_server", tcp_end) == expected
    assert close_cause(Failure(reason), "shutdown", "closed_by_server", tcp_end) == ("closed_by_server", "shutdown")


def test_a_connection_completing_after_the_stop_is_closed_at_once() -> None:
    reactor, service = _fleet()
    reactor.advance(10.0)
    service.stopService()
    protocol, transport = _connect(reactor)
    assert transport.disconnecting and protocol.closing == "shutdown"


def test_addresses_read_host_port_and_a_mapped_ipv4_peer_of_a_dual_stack_server_as_ipv4() -> None:
    """What both ends log as their 4-tuple (so keepalive-report can join a ``::`` server to its IPv4 clients)."""
    assert address_text(IPv4Address("TCP", "192.0.2.1", 49665)) == "192.0.2.1:49665"
    assert address_text(IPv6Address("TCP", "2001:db8::1", 49665)) == "[2001:db8::1]:49665"
    assert address_text(IPv6Address("TCP", "::ffff:192.0.2.1", 40000)) == "192.0.2.1:40000"
