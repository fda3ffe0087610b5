"""Server and client fleet on real loopback sockets: a clean run, a lossy relay, RFC 5780, TCP."""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import LogLevel, formatEvent

from nettester.protocols.stun.client import StunClientService
from nettester.protocols.stun.fleet import FleetConfig
from nettester.protocols.stun.message import (
    Address,
    AttributeType,
    ChangeRequest,
    Message,
    MessageClass,
    Method,
    decode,
    make_attribute,
)
from nettester.protocols.stun.server import StunServerService
from tests.logcapture import log_events
from tests.loopback import has_ipv6_loopback, wait_until

pytestmark = pytest.mark.integration
TIMEOUT = 30.0  # a bound, not a wait: every wait ends as soon as its condition holds


def wait_for(condition: Callable[[], bool]) -> Deferred[None]:
    """``condition`` reached within ``TIMEOUT``, polled every 20 ms."""
    waited: Deferred[None] = wait_until(condition, TIMEOUT, 0.02)
    return waited


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with log_events() as seen:
        yield seen


@pytest_twisted.inlineCallbacks
def test_thirty_clients_every_request_answered(events: list[dict[str, Any]]) -> Generator[Any, Any, None]:
    server = StunServerService(reactor, port=0, interface="127.0.0.1")
    server.startService()
    config = FleetConfig(clients=30, interval=0.5, start_delay=(0.0, 0.25))
    fleet = StunClientService(reactor, "127.0.0.1", server.port, config, rng=random.Random(1))
    fleet.startService()
    try:
        yield wait_for(lambda: fleet.counters.responses.value >= 30 * 5)
    finally:
        yield fleet.stopService()
        yield server.stopService()
    summary = fleet.summary()
    assert summary["clients"] == 30
    assert summary["responses"] >= 30 * 5
    assert summary["timeouts"] == 0 and summary["unexpected"] == 0
    # Only the requests in flight when the run stopped may lack an answer.
    assert summary["responses"] <= server.counters.responses.value <= summary["requests"] <= summary["responses"] + 30
    assert not [e for e in events if e.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)]


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest_twisted.inlineCallbacks
def test_ipv6_clients_see_their_ipv6_mapping(events: list[dict[str, Any]]) -> Generator[Any, Any, None]:
    server = StunServerService(reactor, port=0, interface="::1")
    server.startService()
    fleet = StunClientService(reactor, "::1", server.port, FleetConfig(clients=5, interval=0.2, start_delay=(0, 0.1)))
    fleet.startService()
    try:
        yield wait_for(lambda: fleet.counters.responses.value >= 10)
        assert fleet.fleet is not None
        mapped = {fleet.fleet.mapped_address(index) for index in range(5)}
        ports = {fleet.local_port(index) for index in range(5)}
    finally:
        yield fleet.stopService()
        yield server.stopService()
    assert mapped == {Address("::1", port) for port in ports}
    assert fleet.counters.timeouts.value == 0


class DroppingRelay(DatagramProtocol):
    """Between clients and server: forwards everything, except the responses to one client address.

    Requests go upstream from one socket; responses are routed back by
    transaction id, so the server sees every client as the relay's address.
    """

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.origin: dict[bytes, tuple[str, int]] = {}
        self.victim: tuple[str, int] | None = None
        self.drop_until = 0.0
        self.dropped = 0
        self.delivered: set[tuple[str, int]] = set()  # client addresses that got a response

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if addr == self.server:
            client = self.origin.get(datagram[8:20])
            if client is None:
                return
            if client == self.victim and reactor.seconds() < self.drop_until:
                self.dropped += 1
                return
            self.transport.write(datagram, client)
            self.delivered.add(client)
        else:
            self.origin[datagram[8:20]] = addr
            self.transport.write(datagram, self.server)


@pytest_twisted.inlineCallbacks
def test_relay_dropping_one_clients_responses_for_six_intervals(
    events: list[dict[str, Any]],
) -> Generator[Any, Any, None]:
    interval = 0.3
    server = StunServerService(reactor, port=0, interface="127.0.0.1")
    server.startService()
    relay = DroppingRelay(("127.0.0.1", server.port))
    relay_port = reactor.listenUDP(0, relay, interface="127.0.0.1")
    mapped = f"127.0.0.1:{relay_port.getHost().port}"  # what the server sees: the relay's address
    config = FleetConfig(clients=3, interval=interval, start_delay=(0.0, 0.05))
    fleet = StunClientService(reactor, "127.0.0.1", relay_port.getHost().port, config, rng=random.Random(2))
    fleet.startService()
    try:
        yield wait_for(lambda: fleet.counters.responses.value >= 6)  # every client has a mapping
        first_port = fleet.local_port(1)
        relay.victim = ("127.0.0.1", first_port)
        relay.drop_until = reactor.seconds() + 6 * interval
        yield wait_for(lambda: fleet.counters.failures.value == 1)
        yield wait_for(lambda: ("127.0.0.1", fleet.local_port(1)) in relay.delivered)  # the new socket is answered
        yield wait_for(lambda: fleet.counters.lost.get("return") == 1)  # which resolves the loss episode
        new_port = fleet.local_port(1)
    finally:
        yield fleet.stopService()
        relay_port.stopListening()
        yield server.stopService()

    def lines(name: str) -> list[tuple[LogLevel, str]]:
        return [(e["log_level"], formatEvent(e)) for e in events if e.get("event") == name]

    misses = lines("response_missing")
    assert len(misses) == 5
    trid = misses[0][1].split('"')[1]
    assert len(trid.split(":")) == 12 and trid == trid.upper()
    expected_warning = f'Client 1: Failed to receive STUN response for TrID "{trid}", mapped addr: {mapped}'
    assert misses == [(LogLevel.warn, expected_warning)] * 5  # the same TrID on every re-send
    assert lines("consecutive_failures") == [
        (
            LogLevel.error,
            f'Client 1: Failed to receive 5 consecutive STUN response for TrID "{trid}", mapped addr: {mapped}',
        )
    ]
    assert new_port not in (None, first_port)
    assert lines("socket_reopened") == [(LogLevel.info, f"Client 1: new UDP socket, local port {new_port} (failures)")]
    assert lines("loss_attributed") == [
        (
            LogLevel.warn,
            f'Client 1: TrID "{trid}": 5 of 5 requests reached the server; their responses were lost on the way '
            f"back, mapped addr: {mapped}",
        )
    ]
    # The other clients never missed, and the new socket is answered again.
    assert ("127.0.0.1", new_port) in relay.delivered
    assert relay.dropped >= 5
    assert fleet.counters.timeouts.value == 5
    summary = fleet.summary()
    assert summary["consecutive_failure_errors"] == 1 and summary["loss_pct"] > 0


class OneShot(DatagramProtocol):
    """Sends one datagram, fires with (response, source address)."""

    def __init__(self, data: bytes, to: tuple[str, int]) -> None:
        self.data, self.to = data, to
        self.answered: Deferred[tuple[bytes, tuple[str, int]]] = Deferred()

    def startProtocol(self) -> None:
        self.transport.write(self.data, self.to)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if not self.answered.called:
            self.answered.callback((datagram, addr))


@pytest.mark.parametrize(
    ("change", "from_other_ip", "from_other_port"),
    [(None, False, False), (ChangeRequest(True, True), True, True), (ChangeRequest(False, True), False, True)],
)
@pytest_twisted.inlineCallbacks
def test_rfc5780_change_request_answers_from_the_other_address(
    change: ChangeRequest | None, from_other_ip: bool, from_other_port: bool
) -> Generator[Any, Any, None]:
    server = StunServerService(reactor, port=0, interface="127.0.0.1", other_address=Address("127.0.0.2", 0))
    server.startService()
    primary, alternate_port, alternate_ip, both = server.addresses
    assert (primary.host, alternate_ip.host) == ("127.0.0.1", "127.0.0.2")
    assert alternate_ip.port == primary.port and both.port == alternate_port.port != primary.port
    attributes = (make_attribute(AttributeType.CHANGE_REQUEST, change),) if change else ()
    asker = OneShot(Message(Method.BINDING, MessageClass.REQUEST, b"C" * 12, attributes).encode(), tuple(primary))
    port = reactor.listenUDP(0, asker, interface="127.0.0.1")
    asker_address = Address("127.0.0.1", port.getHost().port)
    try:
        data, source = yield asker.answered.addTimeout(TIMEOUT, reactor)
    finally:
        port.stopListening()
        yield server.stopService()
    expected = server_address = Address(
        "127.0.0.2" if from_other_ip else "127.0.0.1", alternate_port.port if from_other_port else primary.port
    )
    assert Address(*source) == expected
    response = decode(data)
    assert response.get(AttributeType.RESPONSE_ORIGIN) == server_address
    assert response.get(AttributeType.OTHER_ADDRESS) == both
    assert response.get(AttributeType.XOR_MAPPED_ADDRESS) == asker_address


class Collect(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


@pytest_twisted.inlineCallbacks
def test_stun_over_tcp_on_the_same_port() -> Generator[Any, Any, None]:
    server = StunServerService(reactor, port=0, interface="127.0.0.1", tcp=True)
    server.startService()
    try:
        collector = Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        yield connectProtocol(endpoint, collector).addTimeout(TIMEOUT, reactor)
        collector.transport.write(Message(Method.BINDING, MessageClass.REQUEST, b"T" * 12).encode())
        yield wait_for(lambda: len(collector.received) >= 20)
        response = decode(collector.received)
        assert response.transaction_id == b"T" * 12
        assert response.get(AttributeType.XOR_MAPPED_ADDRESS) == Address(
            "127.0.0.1", collector.transport.getHost().port
        )
        collector.transport.loseConnection()
    finally:
        yield server.stopService()


class SeededLossRelay(DatagramProtocol):
    """Drops a seeded share of requests and of responses, and remembers which (by TrID)."""

    def __init__(self, server: tuple[str, int], seed: int, request_loss: float, response_loss: float) -> None:
        self.server = server
        self.rng = random.Random(seed)
        self.request_loss, self.response_loss = request_loss, response_loss
        self.origin: dict[bytes, tuple[str, int]] = {}
        self.dropped: dict[bytes, list[str]] = {}

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        trid = datagram[8:20]
        if addr == self.server:
            if self.rng.random() < self.response_loss:
                self.dropped.setdefault(trid, []).append("return")
            elif trid in self.origin:
                self.transport.write(datagram, self.origin[trid])
        else:
            self.origin[trid] = addr
            if self.rng.random() < self.request_loss:
                self.dropped.setdefault(trid, []).append("forward")
            else:
                self.transport.write(datagram, self.server)


@pytest_twisted.inlineCallbacks
def test_journal_and_stun_report_agree_with_the_clients_own_attribution(tmp_path: Any) -> Generator[Any, Any, None]:
    import io
    import json

    from twisted.logger import globalLogPublisher

    from nettester.logs import JsonObserver
    from nettester.protocols.stun.report import run_report

    journal = tmp_path / "server.jsonl"
    client_log = tmp_path / "client.jsonl"
    server = StunServerService(reactor, port=0, interface="127.0.0.1", journal=str(journal))
    server.startService()
    relay = SeededLossRelay(("127.0.0.1", server.port), seed=7, request_loss=0.15, response_loss=0.15)
    relay_port = reactor.listenUDP(0, relay, interface="127.0.0.1")
    config = FleetConfig(clients=10, interval=0.2, start_delay=(0.0, 0.1))
    fleet = StunClientService(reactor, "127.0.0.1", relay_port.getHost().port, config, rng=random.Random(4))
    with open(client_log, "w") as log_file:
        observer = JsonObserver(log_file)
        globalLogPublisher.addObserver(observer)
        try:
            fleet.startService()
            lost = fleet.counters.lost
            yield wait_for(lambda: lost.get("forward") >= 3 and lost.get("return") >= 3)
        finally:
            yield fleet.stopService()
            globalLogPublisher.removeObserver(observer)
            relay_port.stopListening()
            yield server.stopService()
    records = [json.loads(line) for line in client_log.read_text().splitlines()]
    resolved = [r for r in records if r["event"] == "loss_attributed"]
    assert resolved
    for record in resolved:  # the client's verdict matches the relay's own record, transmission for transmission
        fates = relay.dropped[bytes.fromhex(record["trid"].replace(":", ""))]
        assert (record["lost_forward"], record["lost_return"]) == (fates.count("forward"), fates.count("return"))
    out = io.StringIO()
    assert run_report(str(journal), [str(client_log)], out) == 1
    text = out.getvalue()
    for record in resolved:
        direction = {"forward": "forward", "return": "return"}.get(record["directions"], "both")
        line = next(line for line in text.splitlines() if record["trid"] in line and "wireshark" not in line)
        assert f"; {direction}: " in line
        hex_id = record["trid"].replace(":", "").lower()
        assert f"wireshark: stun.id == 0x{hex_id} || frame contains {record['trid']}" in text
    assert "lost TrIDs: " in text
