"""coap-bench: statistics lines, options, a short closed-loop run against the server."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from coap_net import SERVER_ADDRESS, Net
from coap_testing import MemoryLink, UdpClock
from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.python import usage

from nettester.logs import make_observer, parse_level
from nettester.protocols.coap.attribution import REPORT_OPTION, TAG_OPTION, decode_report, decode_tag
from nettester.protocols.coap.bench import (
    BenchConfig,
    BenchStatistics,
    CoapBenchService,
)
from nettester.protocols.coap.benchlines import ProgressRate, counters_of, progress_text, summary_lines
from nettester.protocols.coap.client import parse_uri
from nettester.protocols.coap.message import Message, decode
from nettester.protocols.coap.options import CoapBenchOptions
from nettester.protocols.coap.server import CoapServerService
from nettester.report import Thresholds
from nettester.tally import Tally
from nettester.udplink import UdpLink
from tests.logcapture import log_events
from tests.loopback import wait_until


def test_progress_line_matches_californium_wording() -> None:
    rate = ProgressRate(started=100.0)
    line = progress_text(4, rate.rate(102.0, 4), retransmissions=1, failures=1, active=3)
    assert line == "4 requests (2 reqs/s, 1 retransmissions (20.00%), 1 transmission errors (20.00%), 3 clients)"
    assert progress_text(5, rate.rate(103.0, 5), 1, 1, 3).startswith("5 requests (1 reqs/s,")  # since the last line


def bench_tally(stats: BenchStatistics, at: float, **counts: int) -> Tally:
    """What the service's tally holds of ``stats``."""
    return Tally({"requests": stats.responses, "transmission_errors": stats.failures, **counts},
                 {"clients": len(stats.per_client)}, {"rtt": stats.all_rtts()}, stats.requests_per_client(),
                 stats.started, at)


def test_percentiles_and_histogram() -> None:
    stats = BenchStatistics(clients=4, started=0.0)
    for index in range(100):
        stats.record_response(index % 2, (index + 1) / 1000)
    # A bounded histogram: within 1/32 of the exact nearest-rank value, the maximum exact.
    assert stats.percentile(50) == pytest.approx(0.050, rel=1 / 32)
    assert stats.percentile(99) == pytest.approx(0.099, rel=1 / 32)
    assert stats.percentile(100) == pytest.approx(0.100)
    lines = summary_lines(bench_tally(stats, 10.0, lost_forward=1))
    assert lines[0].startswith("100 requests in 10.0 s: 10 reqs/s")
    assert "0 transmission errors, lost_forward=1, lost_return=0, lost_unattributed=0, 4 clients" in lines[0]
    assert "p50=49." in lines[1] and "max=100.00" in lines[1]
    assert lines[2:] == ["requests per client (requests: clients):", "  0: 2", "  50: 2"]
    assert BenchStatistics(1, 0.0).percentile(50) is None


def test_no_samples_say_no_responses() -> None:
    assert summary_lines(bench_tally(BenchStatistics(1, 0.0), 5.0))[1] == "RTT ms: no responses"


def test_rtts_take_bounded_memory() -> None:
    stats = BenchStatistics(clients=1, started=0.0)
    for index in range(200_000):
        stats.record_response(0, (index % 5000 + 1) / 10_000)
    stats.end_interval()
    assert stats.rtt.count == 200_000 and len(stats.rtt.counts) < 300


def test_options() -> None:
    options = CoapBenchOptions()
    options.parseOptions(["--clients", "10", "--non", "--payload-random", "8", "coap://127.0.0.1:5783/benchmark"])
    assert options["clients"] == 10 and options["non"] and options["payload-random"] == 8
    assert options["uri"].path == ("benchmark",) and options["dtls"] is None
    assert options["duration"] == 0.0 and options["report"] is None and options.thresholds() == Thresholds(0.0, 0)
    options = CoapBenchOptions()
    options.parseOptions(["--duration", "5", "--max-loss", "1.5", "coap://127.0.0.1:5783/benchmark"])
    assert options["duration"] == 5.0 and options.thresholds().max_loss_percent == 1.5
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
    silent = UdpLink()
    silent_port = reactor.listenUDP(0, silent, interface="127.0.0.1")  # a peer that never answers
    silent_number = silent_port.getHost().port
    with log_events() as events:
        out = io.StringIO()
        config = BenchConfig(parse_uri(f"coap://127.0.0.1:{silent_port.getHost().port}/benchmark"), clients=2,
                             timeout=0.2, report_interval=0)
        bench = CoapBenchService(reactor, config, UdpLink, out, random.Random(5))
        try:
            bench.startService()
            # each client: a 0.2 s timeout, then a retry 1 s later
            yield wait_until(lambda: bench.stats.failures >= 4, timeout=10.0)
            yield bench.stopService()
        finally:
            yield silent_port.stopListening()
    assert bench.stats.failures >= 4 and bench.stats.responses == 0
    failures = [event for event in events if event.get("event") == "coap_bench_failure"]
    assert len(failures) == bench.stats.failures
    assert all(isinstance(event["mid"], int) and len(event["token"]) == 16 for event in failures)
    assert failures[0]["reason"] == "timeout"
    assert failures[0]["peer"] == f"127.0.0.1:{silent_number}"  # host:port, not a tuple
    text = out.getvalue()
    assert "RTT ms: no responses" in text and "lost_unattributed=" in text


def test_exit_status_says_how_the_run_went() -> None:
    stats = BenchStatistics(clients=1, started=0.0)
    assert stats.exit_status() == 3
    stats.record_failure()
    assert stats.exit_status() == 3
    stats.record_response(0, 0.001)
    assert stats.exit_status() == 1
    assert stats.exit_status(Thresholds(max_loss_percent=50.0)) == 0  # 1 of 2 lost: at the limit
    assert stats.exit_status(Thresholds(max_loss_percent=49.0)) == 1
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


def tagged(sequences: set[int]) -> Callable[[Message], bool]:
    """Matches requests whose attribution tag carries one of ``sequences``."""
    def match(message: Message) -> bool:
        tag = message.option(TAG_OPTION)
        return tag is not None and (decode_tag(tag) or (b"", 0))[1] in sequences
    return match


def reporting(sequences: set[int]) -> Callable[[Message], bool]:
    """Matches answers whose attribution report's highest sequence is one of ``sequences``."""
    def match(message: Message) -> bool:
        report = message.option(REPORT_OPTION)
        decoded = decode_report(report) if report is not None else None
        return decoded is not None and decoded.highest in sequences
    return match


def bench_on(net: Net, requests: int, out: io.StringIO, **config: Any) -> CoapBenchService:
    settings: dict[str, Any] = {"clients": 1, "requests": requests, "timeout": 5.0, "report_interval": 0, **config}
    uri = parse_uri(f"coap://{SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]}/benchmark")
    bench = CoapBenchService(net.clock, BenchConfig(uri, **settings), net.new_client_link, out, random.Random(3))
    bench.startService()
    return bench


def test_failed_requests_are_attributed_by_direction() -> None:
    net = Net()
    net.drop_forward = tagged({3})  # every transmission of the 3rd request is lost on the way out
    net.drop_return = reporting({5})  # every answer to the 5th is lost on the way back
    out = io.StringIO()
    bench = bench_on(net, requests=8, out=out)
    statuses: list[int] = []
    bench.done.addCallback(statuses.append)
    net.run(40.0)
    assert statuses == [1] and bench.stats.failures == 2 and bench.stats.responses == 6
    assert bench.recorder.loss_fields() == {"lost_forward": 1, "lost_return": 1, "lost_unattributed": 0}
    by_direction = {episode.direction: episode for episode in bench.recorder.episodes}
    assert by_direction["forward"].detail["sequence"] == 3 and by_direction["return"].detail["sequence"] == 5
    forward = by_direction["forward"]
    assert forward.client == "0" and len(forward.key) == 16 and forward.end is not None and forward.end > forward.start
    assert forward.transmissions >= 2  # retransmitted within the 5 s timeout
    text = out.getvalue()
    assert "2 transmission errors, lost_forward=1, lost_return=1, lost_unattributed=0, 1 clients" in text
    assert "verdict: FAIL: loss 25.00% (2 of 8) is above --max-loss 0%" in text
    assert net.table is not None and len(net.table.sessions) == 1


def test_a_server_without_attribution_leaves_losses_unattributed() -> None:
    net = Net(attributing=False)
    net.drop_forward = tagged({2})
    bench = bench_on(net, requests=4, out=io.StringIO())
    net.run(30.0)
    assert bench.stats.failures == 1
    assert bench.recorder.loss_fields() == {"lost_forward": 0, "lost_return": 0, "lost_unattributed": 1}


def test_a_loss_open_at_stop_is_unattributed_with_no_end() -> None:
    net = Net()
    net.drop_forward = tagged(set(range(2, 100)))  # the server hears the first request only
    bench = bench_on(net, requests=0, out=io.StringIO(), duration=9.0)  # the 2nd fails at ~5 s, stop at 9 s
    net.run(12.0)
    assert not bench.running
    # The 2nd only: the 3rd, sent a second later, is still in flight at stop and no loss.
    [episode] = bench.recorder.episodes
    assert episode.direction == "unattributed" and episode.end is None and episode.detail["sequence"] == 2


def test_start_up_line_early_progress_and_duration(tmp_path: Any) -> None:
    net = Net()
    out = io.StringIO()
    report = str(tmp_path / "bench.json")
    bench = bench_on(net, requests=0, out=out, duration=3.0, report_interval=10.0, report=report, interval=0.1)
    first = out.getvalue().splitlines()
    assert first == ["coap-bench: 1 clients to 192.0.2.1:5783 (coap, CON GET /benchmark, for 3 s)"]
    net.run(1.05)
    progress = out.getvalue().splitlines()[1]
    assert progress.endswith("0 transmission errors (0.00%), 1 clients) lost_forward=0 lost_return=0 "
                             "lost_unattributed=0")  # after 1 s, not only after --report-interval
    net.run(3.0)
    assert not bench.running  # --duration stopped it
    assert out.getvalue().splitlines()[-1] == "verdict: pass"
    with open(report) as stream:
        document = json.load(stream)
    assert document["role"] == "coap-bench" and document["verdict"]["passed"] is True
    assert document["configuration"]["target"] == "192.0.2.1:5783" and document["configuration"]["mode"] == "CON"
    assert document["counters"]["requests"] == bench.stats.responses > 10
    assert document["rtt_ms"]["samples"] == bench.stats.responses
    assert [sample["t"] for sample in document["series"]] == pytest.approx([1001.0, 1003.0], abs=0.06)


def test_json_log_format_puts_only_json_lines_on_stdout() -> None:
    net = Net()
    out = io.StringIO()
    stream = io.StringIO()
    observer = make_observer("json", parse_level("warn"), stream)
    globalLogPublisher.addObserver(observer)
    try:
        settings: dict[str, Any] = {"clients": 1, "requests": 3, "timeout": 5.0, "report_interval": 0.5}
        uri = parse_uri(f"coap://{SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]}/benchmark")
        bench = CoapBenchService(net.clock, BenchConfig(uri, **settings), net.new_client_link, out,
                                 random.Random(3), json_lines=True)
        bench.startService()
        net.run(3.0)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert out.getvalue() == ""
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = [record["event"] for record in records]
    assert events[0] == "coap_bench_start" and "coap_bench_summary" in events and events[-1] == "verdict"
    summary = next(record for record in records if record["event"] == "coap_bench_summary")
    assert summary["requests"] == 3 and summary["lost_forward"] == 0


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_a_handshake_not_done_within_the_timeout_is_a_transmission_error() -> Generator[Any, Any, None]:
    """Issue 16: coaps against a port where nothing answers counts failed handshakes per --timeout, fails the run."""
    from functools import partial

    from nettester.protocols.dtls.connection import DtlsConfiguration
    from nettester.protocols.dtls.endpoint import DtlsEndpoint

    silent = UdpLink()
    silent_port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    address = f"127.0.0.1:{silent_port.getHost().port}"
    with log_events() as events:
        out = io.StringIO()
        config = BenchConfig(parse_uri(f"coaps://{address}/benchmark"), clients=2, timeout=0.3, report_interval=0)
        link = partial(DtlsEndpoint, reactor, client_configuration=DtlsConfiguration(
            is_client=True, psk_identity=b"Client_identity", psk=b"secretPSK"))
        bench = CoapBenchService(reactor, config, link, out, random.Random(5))
        try:
            bench.startService()
            yield wait_until(lambda: bench.stats.failures >= 2, timeout=10.0)
            yield bench.stopService()
        finally:
            yield silent_port.stopListening()
    failures = [event for event in events if event.get("event") == "coap_bench_connect_failure"]
    assert failures and f"no DTLS handshake within --timeout 0.3 s: is a coaps server listening on {address}?" in (
        failures[0]["reason"])
    assert bench.verdict is not None and not bench.verdict.passed
    assert f"{bench.stats.failures} transmission errors" in out.getvalue()


def test_a_process_of_processes_prints_nothing_and_hands_its_run_to_the_parent(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    from nettester import workers

    monkeypatch.setenv(workers.WORKER_ENV, "1/2")
    net = Net()
    net.drop_forward = tagged({3})
    out = io.StringIO()
    bench = bench_on(net, requests=5, out=out, clients=2)
    net.run(40.0)
    assert out.getvalue() == "", "the parent prints the merged lines"
    report = bench.worker_report(final=True)
    tally = Tally.from_dict(report["tally"])
    assert tally.per_client == {4: 2}  # each client's 3rd request failed
    assert (tally.count("requests"), tally.count("transmission_errors"), tally.count("lost_forward")) == (8, 2, 2)
    assert tally.histogram("rtt").count == 8 and tally.level("clients") == 2 and tally.level("active") == 0
    assert tally.at == bench.ended, "the final tally is the one of the summary one process would print"
    assert report["summary"] == counters_of(tally)
    assert report["result"]["judged"] == [10, 2, 8, None]
    document = report["result"]["document"]
    assert document["loss"]["lost_forward"] == 2 and document["counters"]["requests"] == 8
    assert "result" not in bench.worker_report(final=False)
