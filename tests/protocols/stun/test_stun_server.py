"""The stun-server adapters without a reactor: TCP framing on a StringTransport, listen failures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import ServerCounters
from nettester.protocols.stun.message import Address, AttributeType, Message, MessageClass, Method, decode
from nettester.protocols.stun.responder import BindingResponder
from nettester.protocols.stun.server import StunDatagramProtocol, StunServerService, StunStreamProtocol
from nettester.service import exit_status_of

TID_A = b"A" * 12
TID_B = b"B" * 12


def connected_stream() -> tuple[StunStreamProtocol, StringTransport, ServerCounters]:
    counters = ServerCounters(MetricSet("stun_tcp_test"))
    protocol = StunStreamProtocol(BindingResponder(counters, "tcp test"), lambda: 0.0)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.4", 5555))
    protocol.makeConnection(transport)
    return protocol, transport, counters


def split_responses(data: bytes) -> list[Message]:
    messages = []
    while data:
        size = 20 + int.from_bytes(data[2:4], "big")
        messages.append(decode(data[:size]))
        data = data[size:]
    return messages


def test_tcp_requests_split_and_coalesced_are_framed_by_their_header() -> None:
    protocol, transport, counters = connected_stream()
    stream = Message(Method.BINDING, MessageClass.REQUEST, TID_A).encode() + Message(
        Method.BINDING, MessageClass.REQUEST, TID_B
    ).encode(fingerprint=True)
    for cut in (1, 7, 19, 20, 33):  # arbitrary TCP segment boundaries
        protocol.dataReceived(stream[:cut])
        stream = stream[cut:]
    protocol.dataReceived(stream)
    responses = split_responses(transport.value())
    assert [response.transaction_id for response in responses] == [TID_A, TID_B]
    assert responses[0].get(AttributeType.XOR_MAPPED_ADDRESS) == Address("192.0.2.4", 5555)
    assert responses[1].find(AttributeType.FINGERPRINT) is not None
    assert counters.responses.value == 2
    assert not transport.disconnecting


def test_tcp_non_stun_closes_the_connection_gracefully() -> None:
    protocol, transport, counters = connected_stream()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value() == b""
    assert transport.disconnecting  # loseConnection: a FIN, not a reset


class RefusingReactor:
    """Every listenUDP fails, as when the port is taken."""

    def __init__(self) -> None:
        self.when_running: list[Any] = []
        self.stopped = False

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    def callWhenRunning(self, call: Any) -> None:
        self.when_running.append(call)

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def critical() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.critical:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def test_port_in_use_says_what_to_do_and_stops_with_status_1(critical: list[dict[str, Any]]) -> None:
    reactor = RefusingReactor()
    service = StunServerService(reactor, port=3478, interface="127.0.0.1")
    service.startService()
    assert service.failed is not None and "Address already in use" in service.failed
    assert [event["event"] for event in critical] == ["listen_failed"]
    assert formatEvent(critical[0]) == (
        "cannot listen on 127.0.0.1:3478 (--port): Address already in use; choose another --port")
    for call in reactor.when_running:
        call()
    assert reactor.stopped and exit_status_of(service) == 1


@given(st.lists(st.binary(max_size=40), max_size=8))
@settings(max_examples=200, deadline=None)
def test_fuzz_tcp_stream_never_raises(chunks: list[bytes]) -> None:
    protocol, transport, _ = connected_stream()
    for chunk in chunks:
        protocol.dataReceived(chunk)
    if transport.value():
        assert split_responses(transport.value())  # whole responses only


class FullSocket:
    """A port whose socket's send buffer is full."""

    def getHandle(self) -> FullSocket:
        return self

    def sendto(self, data: bytes, addr: Any) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")


def test_udp_send_failure_is_counted_not_raised() -> None:
    counters = ServerCounters(MetricSet("stun_udp_test"))
    protocol = StunDatagramProtocol(0, [FullSocket()])
    protocol.serve(BindingResponder(counters, "udp test"), counters, lambda: 0.0)
    protocol.datagramReceived(Message(Method.BINDING, MessageClass.REQUEST, TID_A).encode(), ("192.0.2.4", 5555))
    assert counters.responses.value == 1
    assert counters.dropped.get("send_failed") == 1


def test_local_scenario_reports_a_listen_failure_in_its_verdict() -> None:
    from nettester.protocols.stun.local import StunLocalScenario

    reactor = RefusingReactor()
    scenario = StunLocalScenario(reactor)
    scenario.service.startService()
    verdict = scenario.verdict()
    assert not verdict.passed and "Address already in use" in verdict.evidence["error"]
    assert reactor.when_running == [] and exit_status_of(scenario.service) == 0  # the local run goes on
