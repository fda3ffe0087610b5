"""The stun-client adapter on a task.Clock: its sockets, its log lines to the letter, its summary.

The clients' sockets are real loopback sockets, but nothing runs a reactor:
the test reads the requests from its own socket and hands the answers to
the client socket's ``doRead`` itself, so every step is explicit.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from zope.interface.verify import verifyObject

from nettester.protocols.stun.client import StunClientService, format_mapped
from nettester.protocols.stun.fleet import FleetConfig
from nettester.protocols.stun.message import (
    Address,
    AttributeType,
    Message,
    MessageClass,
    Method,
    decode,
    make_attribute,
)
from nettester.protocols.stun.options import raise_open_file_limit
from tests.logcapture import log_events


class FakeReactor(Clock):
    """A Clock that also records readers (what the client service registers)."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[Any] = set()

    def addReader(self, reader: Any) -> None:
        self.readers.add(reader)

    def removeReader(self, reader: Any) -> None:
        self.readers.discard(reader)


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    with log_events() as seen:
        yield seen


@pytest.fixture
def server_socket() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def advance(reactor: Clock, seconds: float) -> None:
    """Let time pass in 10 ms steps, as the real reactor would run the fleet's tick."""
    reactor.pump([0.01] * round(seconds / 0.01))


def lines(events: list[dict[str, Any]], name: str) -> list[tuple[LogLevel, str]]:
    return [(event["log_level"], formatEvent(event)) for event in events if event.get("event") == name]


def start(server: socket.socket, clients: int = 1, **config: Any) -> tuple[FakeReactor, StunClientService]:
    reactor = FakeReactor()
    reactor.advance(100.0)
    config.setdefault("interval", 1.0)
    config.setdefault("start_delay", (0.0, 0.0))
    service = StunClientService(
        reactor, "127.0.0.1", server.getsockname()[1], FleetConfig(clients=clients, **config), rng=random.Random(3)
    )
    service.startService()
    return reactor, service


def answer_next(server: socket.socket, service: StunClientService) -> bytes:
    """Read one request at the fake server, answer it, let the client read the answer."""
    data, peer = server.recvfrom(2048)
    request = decode(data)
    mapped = make_attribute(AttributeType.XOR_MAPPED_ADDRESS, Address(*peer), request.transaction_id)
    server.sendto(Message(Method.BINDING, MessageClass.SUCCESS, request.transaction_id, (mapped,)).encode(), peer)
    deliver(service)
    return request.transaction_id


def deliver(service: StunClientService) -> None:
    for reader in list(service._reactor.readers):  # type: ignore[attr-defined]
        reader.doRead()


def test_answered_requests_are_counted_and_summarised(server_socket: socket.socket) -> None:
    reactor, service = start(server_socket)
    advance(reactor, 0.02)
    (reader,) = reactor.readers
    assert verifyObject(IReadDescriptor, reader)
    answer_next(server_socket, service)
    advance(reactor, 1.0)
    answer_next(server_socket, service)
    summary = service.summary()
    assert summary["clients"] == 1
    assert (summary["requests"], summary["responses"], summary["timeouts"], summary["loss_pct"]) == (2, 2, 0, 0.0)
    assert summary["rtt_p50_ms"] == 0.0  # answered with the fake clock standing still: an RTT of 0
    assert service.fleet is not None and service.fleet.rtt.count == 2
    service.stopService()
    assert reactor.readers == set()


def test_lost_responses_log_the_original_lines_then_a_new_socket(
    server_socket: socket.socket, events: list[dict[str, Any]]
) -> None:
    reactor, service = start(server_socket)
    advance(reactor, 0.02)
    answer_next(server_socket, service)
    mapped = format_mapped(Address("127.0.0.1", service.local_port(0) or 0))
    first_port = service.local_port(0)
    advance(reactor, 1.0)
    for _ in range(5):  # five intervals without an answer
        lost = decode(server_socket.recvfrom(2048)[0]).transaction_id
        advance(reactor, 1.0)
    trid = lost.hex(":").upper()
    warnings = lines(events, "response_missing")
    assert (
        warnings
        == [(LogLevel.warn, f'Client 0: Failed to receive STUN response for TrID "{trid}", mapped addr: {mapped}')] * 5
    )
    assert lines(events, "consecutive_failures") == [
        (
            LogLevel.error,
            f'Client 0: Failed to receive 5 consecutive STUN response for TrID "{trid}", mapped addr: {mapped}',
        )
    ]
    assert service.local_port(0) != first_port
    assert lines(events, "socket_reopened") == [
        (LogLevel.info, f"Client 0: new UDP socket, local port {service.local_port(0)} (failures)")
    ]
    # The new socket carries on with a new transaction id and no known mapping.
    assert answer_next(server_socket, service) != lost
    assert service.summary()["consecutive_failure_errors"] == 1
    service.stopService()


def test_unknown_mapping_is_logged_as_a_lone_colon(server_socket: socket.socket, events: list[dict[str, Any]]) -> None:
    reactor, service = start(server_socket)
    advance(reactor, 1.02)
    trid = decode(server_socket.recvfrom(2048)[0]).transaction_id.hex(":").upper()
    assert lines(events, "response_missing") == [
        (LogLevel.warn, f'Client 0: Failed to receive STUN response for TrID "{trid}", mapped addr: :')
    ]
    service.stopService()


def test_unexpected_and_mapping_change_lines(server_socket: socket.socket, events: list[dict[str, Any]]) -> None:
    reactor, service = start(server_socket)
    advance(reactor, 0.02)
    answer_next(server_socket, service)
    stray = bytes(range(12))
    server_socket.sendto(
        Message(Method.BINDING, MessageClass.SUCCESS, stray).encode(), ("127.0.0.1", service.local_port(0))
    )
    deliver(service)
    assert lines(events, "unexpected_response") == [
        (LogLevel.warn, 'Client 0: Received STUN response with unexpected TrID "00:01:02:03:04:05:06:07:08:09:0A:0B"')
    ]
    advance(reactor, 1.0)
    data, peer = server_socket.recvfrom(2048)
    request = decode(data)
    moved = make_attribute(AttributeType.XOR_MAPPED_ADDRESS, Address("203.0.113.9", 1234), request.transaction_id)
    server_socket.sendto(Message(Method.BINDING, MessageClass.SUCCESS, request.transaction_id, (moved,)).encode(), peer)
    deliver(service)
    assert lines(events, "mapping_changed") == [
        (LogLevel.warn, f"Client 0: mapped address changed from 127.0.0.1:{peer[1]} to 203.0.113.9:1234")
    ]
    service.stopService()


def test_refused_server_is_reported_once(events: list[dict[str, Any]]) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the kernel answers ICMP port unreachable
    reactor = FakeReactor()
    service = StunClientService(reactor, "127.0.0.1", port, FleetConfig(clients=2, interval=1.0, start_delay=(0, 0)))
    service.startService()
    advance(reactor, 0.02)
    deliver(service)
    advance(reactor, 1.0)
    deliver(service)
    assert service.summary()["refused"] >= 2
    refused = lines(events, "server_refused")
    assert len(refused) == 1
    assert refused[0][0] == LogLevel.error and f"127.0.0.1:{port} refused" in refused[0][1]
    service.stopService()


def test_unroutable_server_is_reported_once(events: list[dict[str, Any]]) -> None:
    reactor = FakeReactor()
    # 198.51.100.0/24 (TEST-NET-2) from the loopback address: the kernel refuses to route it.
    config = FleetConfig(clients=2, interval=1.0, start_delay=(0, 0))
    service = StunClientService(reactor, "198.51.100.1", 3478, config, local_address="127.0.0.1")
    service.startService()
    advance(reactor, 1.05)
    summary = service.summary()
    assert summary["socket_errors"] >= 2
    logged = lines(events, "socket_error")
    assert len(logged) == 1 and logged[0][0] == LogLevel.error
    assert logged[0][1].startswith("Client 0: cannot open a UDP socket to 198.51.100.1:3478: ")
    service.stopService()


def test_open_file_limit_error_says_what_to_do() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on open files here")
    assert raise_open_file_limit(10) >= 10 + 64
    with pytest.raises(ValueError, match=r"ulimit -Hn.*lower --clients"):
        raise_open_file_limit(hard)


def answer_with(server: socket.socket, service: StunClientService, responder: Any, deliver_it: bool = True) -> bytes:
    """Read one request, answer it with a nettester responder; drop the answer unless ``deliver_it``."""
    data, peer = server.recvfrom(2048)
    reply = responder.respond(data, peer, now=service._reactor.seconds())  # type: ignore[attr-defined]
    if deliver_it:
        server.sendto(reply[0], peer)
        deliver(service)
    return bytes(decode(data).transaction_id)


def nettester_responder() -> Any:
    from nettester.metrics import MetricSet
    from nettester.protocols.stun.attribution import SessionTable
    from nettester.protocols.stun.counters import ServerCounters
    from nettester.protocols.stun.responder import BindingResponder

    return BindingResponder(ServerCounters(MetricSet("stun_test_server")), "nettester", sessions=SessionTable())


def test_a_resolved_loss_episode_gets_one_line_naming_its_direction(
    server_socket: socket.socket, events: list[dict[str, Any]]
) -> None:
    reactor, service = start(server_socket)
    responder = nettester_responder()
    advance(reactor, 0.02)
    answer_with(server_socket, service, responder)
    mapped = f"127.0.0.1:{service.local_port(0)}"
    advance(reactor, 1.0)
    lost = answer_with(server_socket, service, responder, deliver_it=False)  # reached the server, answer lost
    advance(reactor, 1.0)
    assert answer_with(server_socket, service, responder, deliver_it=False) == lost  # the re-send: same again
    advance(reactor, 1.0)
    assert answer_with(server_socket, service, responder) == lost  # the second re-send is answered
    trid = lost.hex(":").upper()
    assert lines(events, "loss_attributed") == [
        (
            LogLevel.warn,
            f'Client 0: TrID "{trid}": 2 of 2 requests reached the server; their responses were lost on the '
            f"way back, mapped addr: {mapped}",
        )
    ]
    assert len(lines(events, "response_missing")) == 2  # the original lines are still there
    summary = service.summary()
    assert (summary["lost_forward"], summary["lost_return"], summary["lost_unattributed"]) == (0, 1, 0)
    assert summary["attribution_invalid"] == 0
    service.stopService()


def test_loss_counters_are_one_family_with_a_direction_label(server_socket: socket.socket) -> None:
    from prometheus_client.exposition import generate_latest

    from nettester.metrics import new_registry

    reactor, service = start(server_socket)
    text = generate_latest(new_registry(service.metrics)).decode()
    for direction in ("forward", "return", "unattributed"):
        assert f'nettester_stun_client_lost_total{{direction="{direction}"}} 0.0' in text
    assert "nettester_stun_client_attribution_invalid_total 0.0" in text
    service.stopService()


def test_a_loss_open_at_stop_is_unattributed_and_reported(
    server_socket: socket.socket, events: list[dict[str, Any]], tmp_path: Any
) -> None:
    import json

    from nettester.report import Thresholds
    from nettester.service import exit_status_of

    reactor = FakeReactor()
    reactor.advance(100.0)
    report = tmp_path / "run.json"
    service = StunClientService(
        reactor, "127.0.0.1", server_socket.getsockname()[1],
        FleetConfig(clients=1, interval=1.0, start_delay=(0.0, 0.0)), rng=random.Random(3),
        report=str(report), thresholds=Thresholds(max_loss_percent=10.0), configuration={"clients": 1},
    )  # fmt: skip
    service.startService()
    responder = nettester_responder()
    advance(reactor, 0.02)
    answer_with(server_socket, service, responder)
    advance(reactor, 1.0)
    lost = answer_with(server_socket, service, responder, deliver_it=False)
    advance(reactor, 1.0)  # one miss, then the re-send is outstanding when the run stops
    service.stopService()
    summary = service.summary()
    assert (summary["lost_forward"], summary["lost_return"], summary["lost_unattributed"]) == (0, 0, 1)
    assert lines(events, "loss_open_at_stop") == [
        (LogLevel.info, "1 loss episodes still unresolved at stop: counted as lost_unattributed")
    ]
    document = json.loads(report.read_text())
    assert document["loss"] == {"lost_forward": 0, "lost_return": 0, "lost_unattributed": 1}
    (episode,) = document["episodes"]
    assert (episode["key"], episode["direction"], episode["end"]) == (lost.hex(":").upper(), "unattributed", None)
    # 1 of 2 waits ended without an answer: 50 % is above --max-loss 10.
    assert document["verdict"]["passed"] is False and exit_status_of(service) == 1
    assert [text for _, text in lines(events, "verdict")] == [
        "verdict: FAIL: loss 50.00% (1 of 2) is above --max-loss 10%"
    ]


def test_duration_stops_the_reactor_by_itself(server_socket: socket.socket, events: list[dict[str, Any]]) -> None:
    reactor = FakeReactor()
    stopped: list[float] = []
    reactor.stop = lambda: stopped.append(reactor.seconds())  # type: ignore[attr-defined]
    service = StunClientService(
        reactor, "127.0.0.1", server_socket.getsockname()[1], FleetConfig(clients=1, start_delay=(0.0, 0.0)),
        duration=2.5,
    )  # fmt: skip
    service.startService()
    advance(reactor, 2.49)
    assert stopped == []
    advance(reactor, 0.02)
    assert stopped == [pytest.approx(2.5, abs=0.011)]
    assert lines(events, "duration_over") == [(LogLevel.info, "--duration 2.5 s is over: stopping")]
    service.stopService()


def test_the_timer_is_one_delayed_call_re_armed_at_the_fleets_next_deadline(server_socket: socket.socket) -> None:
    reactor, service = start(server_socket, clients=3, interval=1.0)
    advance(reactor, 0.05)
    calls = reactor.getDelayedCalls()
    assert len(calls) == 1  # not a periodic tick: the next deadline of the whole fleet
    assert 1.0 <= calls[0].getTime() - 100.0 <= 1.02
    service.stopService()
    assert reactor.getDelayedCalls() == []


def test_a_child_of_processes_numbers_its_clients_in_the_run_and_leaves_the_run_lines_to_its_parent(
    server_socket: socket.socket, events: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nettester.protocols.stun.runlines import summary_of
    from nettester.report import Thresholds
    from nettester.tally import Tally
    from nettester.workers import WORKER_ENV

    monkeypatch.setenv(WORKER_ENV, "1/2")
    reactor = FakeReactor()
    reactor.advance(100.0)
    service = StunClientService(
        reactor, "127.0.0.1", server_socket.getsockname()[1],
        FleetConfig(clients=1, interval=1.0, start_delay=(0.0, 0.0)), rng=random.Random(3),
        thresholds=Thresholds(max_loss_percent=10.0), first_client=5,
    )  # fmt: skip
    service.startService()
    advance(reactor, 0.02)
    answer_next(server_socket, service)
    advance(reactor, 1.0)
    lost = decode(server_socket.recvfrom(2048)[0]).transaction_id.hex(":").upper()
    advance(reactor, 1.0)  # one miss, then the re-send is outstanding when the run stops
    # Its client 0 is client 5 of the whole run: the line a user greps for is the one client's.
    assert lines(events, "response_missing") == [
        (LogLevel.warn, f'Client 5: Failed to receive STUN response for TrID "{lost}", mapped addr: '
                        f'127.0.0.1:{service.local_port(0)}')
    ]
    service.stopService()
    assert [event for event in events if event.get("event") in (
        "clients_start", "loss_open_at_stop", "verdict")] == [], "the parent prints the whole run's"
    report = service.worker_report(final=True)
    tally = Tally.from_dict(report["tally"])
    assert summary_of(tally) == service.summary() and summary_of(tally)["timeouts"] == 1
    assert tally.count("open_at_stop") == 1 and tally.histogram("rtt").count == 1
    assert report["result"]["judged"] == [2, 1, 1, None]
    assert report["result"]["document"]["episodes"][0]["client"] == "5"
