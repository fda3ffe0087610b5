"""coap-bench: statistics lines, options, a short closed-loop run against the server."""

from __future__ import annotations

import io
import random
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from coap_testing import MemoryLink, UdpClock
from twisted.internet import defer, reactor
from twisted.python import usage

from tests.logcapture import log_events
from nettester.protocols.coap.bench import (
    BenchConfig,
    BenchStatistics,
    CoapBenchService,
)
from nettester.protocols.coap.client import parse_uri
from nettester.protocols.coap.message import decode
from nettester.protocols.coap.options import CoapBenchOptions
from nettester.protocols.coap.server import CoapServerService
from nettester.udplink import UdpLink


def test_progress_line_matches_californium_wording() -> None:
    stats = BenchStatistics(clients=3, started=100.0)
    for client in (0, 1, 1, 2):
        stats.record_response(client, 0.002)
    stats.record_failure()
    line = stats.progress_line(102.0, retransmissions=1, active_clients=3)
    assert line == "4 requests (2 reqs/s, 1 retransmissions (20.00%), 1 transmission errors (20.00%), 3 clients)"
    stats.record_response(0, 0.004)
    assert stats.progress_line(103.0, 1, 3).startswith("5 requests (1 reqs/s,")


def test_percentiles_and_histogram() -> None:
    stats = BenchStatistics(clients=4, started=0.0)
    for index in range(100):
        stats.record_response(index % 2, (index + 1) / 1000)
    assert stats.percentile(50) == pytest.approx(0.050)
    assert stats.percentile(99) == pytest.approx(0.099)
    assert stats.percentile(100) == pytest.approx(0.100)
    lines = stats.summary_lines(10.0, retransmissions=0)
    assert lines[0].startswith("100 requests in 10.0 s: 10 reqs/s")
    assert "p50=50.00" in lines[1] and "max=100.00" in lines[1]
    assert lines[2:] == ["requests per client (requests: clients):", "  0: 2", "  50: 2"]
    assert BenchStatistics(1, 0.0).percentile(50) == 0.0


def test_options() -> None:
    options = CoapBenchOptions()
    options.parseOptions(["--clients", "10", "--non", "--payload-random", "8", "coap://127.0.0.1:5783/benchmark"])
    assert options["clients"] == 10 and options["non"] and options["payload-random"] == 8
    assert options["uri"].path == ("benchmark",) and options["dtls"] is None
    with pytest.raises(usage.UsageError):
        CoapBenchOptions().parseOptions(["--con", "--non", "coap://127.0.0.1/benchmark"])


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_short_run_against_the_server() -> Generator[Any, Any, None]:
    server = CoapServerService(reactor, 0, ["127.0.0.1"], plugtest=False, benchmark=True)
    server.startService()
    port = next(p for _, _, p, name in server.listening if name == "extended")
    out = io.StringIO()
    config = BenchConfig(parse_uri(f"coap://127.0.0.1:{port}/benchmark?rlen=40"), clients=20, requests=10,
                         report_interval=0.05)
    bench = CoapBenchService(reactor, config, UdpLink, out, random.Random(3))
    try:
        bench.startService()
        status = yield bench.done.addTimeout(10.0, reactor)
        assert status == 0
        assert bench.stats.responses == 200 and bench.stats.per_client == [10] * 20
        text = out.getvalue()
        assert "200 requests in" in text and "  10: 20" in text
    finally:
        yield server.stopService()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_failures_are_counted_logged_with_mid_and_retried() -> Generator[Any, Any, None]:
    from twisted.internet.task import deferLater

    silent = UdpLink()
    silent_port = reactor.listenUDP(0, silent, interface="127.0.0.1")  # a peer that never answers
    with log_events() as events:
        out = io.StringIO()
        config = BenchConfig(parse_uri(f"coap://127.0.0.1:{silent_port.getHost().port}/benchmark"), clients=2,
                             timeout=0.2, report_interval=0)
        bench = CoapBenchService(reactor, config, UdpLink, out, random.Random(5))
        try:
            bench.startService()
            yield deferLater(reactor, 1.5, lambda: None)  # 0.2 s timeout, then a retry 1 s later
            yield bench.stopService()
        finally:
            yield silent_port.stopListening()
    assert bench.stats.failures >= 4 and bench.stats.responses == 0
    failures = [event for event in events if event.get("event") == "coap_bench_failure"]
    assert len(failures) == bench.stats.failures
    assert all(isinstance(event["mid"], int) and len(event["token"]) == 16 for event in failures)
    assert failures[0]["reason"] == "timeout"


def test_exit_status_says_how_the_run_went() -> None:
    stats = BenchStatistics(clients=1, started=0.0)
    assert stats.exit_status() == 3
    stats.record_failure()
    assert stats.exit_status() == 3
    stats.record_response(0, 0.001)
    assert stats.exit_status() == 1
    clean = BenchStatistics(clients=1, started=0.0)
    clean.record_response(0, 0.001)
    assert clean.exit_status() == 0


def run_on_clock(link_factory: Any, requests: int) -> tuple[CoapBenchService, UdpClock, list[int]]:
    clock = UdpClock()
    config = BenchConfig(parse_uri("coap://192.0.2.1:5783/benchmark"), clients=2, requests=requests, timeout=1.0,
                         report_interval=0)
    bench = CoapBenchService(clock, config, link_factory, io.StringIO(), random.Random(7))
    statuses: list[int] = []
    bench.done.addCallback(statuses.append)
    bench.startService()
    for _ in range(100):
        clock.advance(0.1)
    return bench, clock, statuses


def test_a_dead_server_costs_counted_requests_and_the_run_ends() -> None:
    links: list[MemoryLink] = []

    def silent() -> MemoryLink:
        links.append(MemoryLink(("198.51.100.1", 40000 + len(links))))
        return links[-1]

    bench, clock, statuses = run_on_clock(silent, requests=2)
    # Each client: a request, 1 s timeout, 1 s pause, the second, 1 s timeout: then done.
    assert statuses == [3] and not bench.running
    assert bench.stats.failures == 4 and bench.stats.responses == 0
    assert [len({decode(data).token for data, _ in link.sent}) for link in links] == [2, 2]
    assert clock.getDelayedCalls() == []


def test_failed_handshakes_count_as_requests_too() -> None:
    class Unreachable(MemoryLink):
        def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
            return defer.fail(ConnectionError("handshake timeout"))

    bench, clock, statuses = run_on_clock(lambda: Unreachable(("198.51.100.1", 40000)), requests=3)
    assert statuses == [3] and bench.stats.failures == 6
    assert clock.getDelayedCalls() == []
