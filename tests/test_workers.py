"""--workers / --processes: options, merging, and the supervisor driven by a fake reactor (no processes)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from nettester import supervisor, workers
from nettester.histogram import SUB_BUCKETS
from nettester.protocols.coap.options import CoapBenchOptions, CoapServerOptions
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.cookie import DEFAULT_ROTATION, CookieGate, Verdict
from nettester.protocols.keepalive.options import ClientOptions as KeepaliveClientOptions
from nettester.protocols.stun.options import StunClientOptions, StunServerOptions
from nettester.report import LossEpisode, RttHistogram, RunRecorder, Thresholds, read_report
from nettester.report import Verdict as RunVerdict
from nettester.report.merge import conclude_processes
from tests.logcapture import log_events


def test_worker_count_accepts_numbers_and_auto() -> None:
    assert workers.worker_count("3") == 3
    assert workers.worker_count("auto") >= 1
    with pytest.raises(ValueError, match="at least 1 or 'auto'"):
        workers.worker_count("0")


def test_shares_add_up_to_the_total() -> None:
    assert [workers.share(10, index, 3) for index in range(3)] == [4, 3, 3]


def test_a_child_runs_its_share_of_the_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workers.WORKER_ENV, "1/3")
    options = StunClientOptions()
    options.parseOptions(["--server", "127.0.0.1", "--clients", "10", "--processes", "3"])
    assert options["clients"] == 3
    assert options.role_argv == ["--server", "127.0.0.1", "--clients", "10", "--processes", "3"]


def test_fewer_clients_than_processes_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers.WORKER_ENV, raising=False)
    with pytest.raises(UsageError, match="--processes 4 needs at least 4 --clients"):
        KeepaliveClientOptions().parseOptions(["--server", "127.0.0.1", "--clients", "2", "--processes", "4"])


def test_workers_need_a_fixed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers.WORKER_ENV, raising=False)
    with pytest.raises(UsageError, match="--workers needs a fixed --port"):
        StunServerOptions().parseOptions(["--port", "0", "--workers", "2"])


def test_the_roles_offer_the_options() -> None:
    assert "workers" in CoapServerOptions().docs and "processes" in CoapBenchOptions().docs


def test_summaries_merge_counts_live_levels_and_statistics() -> None:
    dead = {"requests": 5, "open": 3, "rtt_p99_ms": 9.0, "loss_pct": 1.0, "rtt_min_ms": 0.5, "node_id": 1}
    live = [{"requests": 7, "open": 2, "rtt_p99_ms": 4.0, "loss_pct": 2.0, "rtt_min_ms": 0.2, "node_id": 1},
            {"requests": 1, "open": 1, "rtt_p99_ms": 1.0, "loss_pct": 0.0, "rtt_min_ms": 0.3, "node_id": 1}]
    merged = workers.merge_summaries([dead, *live], live, frozenset({"open"}))
    assert merged == {"requests": 13, "open": 3, "rtt_p99_ms": 9.0, "loss_pct": 2.0, "rtt_min_ms": 0.2,
                      "node_id": 1}


def test_summed_rates_carry_no_float_noise() -> None:
    merged = workers.merge_summaries([{"reqs_per_s": 7708.3}, {"reqs_per_s": 7708.3}])
    assert merged == {"reqs_per_s": 15416.6}


def test_metric_counters_keep_dead_workers_and_gauges_do_not() -> None:
    def families(received: float, live: float) -> list[Any]:
        return [("nettester_coap_received", "counter", "r", [("nettester_coap_received_total", {}, received)]),
                ("nettester_coap_live", "gauge", "l", [("nettester_coap_live", {"kind": "x"}, live)])]

    merged = workers.merge_metric_families([families(5, 9), families(7, 2)], [families(7, 2)])
    assert {name: samples[0][2] for name, _, _, samples in merged} == {"nettester_coap_received": 12,
                                                                          "nettester_coap_live": 2}


def test_exit_statuses_merge() -> None:
    assert workers.merge_exit_statuses([0, 0]) == 0
    assert workers.merge_exit_statuses([3, 3]) == 3
    assert workers.merge_exit_statuses([0, 3]) == 1


def test_a_worker_cid_carries_node_and_worker() -> None:
    cid = NodeConnectionIdGenerator(6, 4, random=lambda n: b"\xaa" * n, worker=2).new_connection_id(set())
    assert cid == b"\x04\x02\xaa\xaa\xaa\xaa"
    with pytest.raises(ValueError, match="at least 3 bytes"):
        NodeConnectionIdGenerator(2, 0, worker=1)


def test_workers_accept_each_others_cookies() -> None:
    import dataclasses

    from nettester.protocols.dtls import handshake, record

    hello = handshake.ClientHello(record.DTLS_1_2, bytes(32), b"", b"", [0xC0A8], b"\x00")
    peer = ("127.0.0.1", 4000)

    def datagram(cookie: bytes) -> bytes:
        body = dataclasses.replace(hello, cookie=cookie).encode()
        return record.encode_plaintext_record(record.HANDSHAKE, record.DTLS_1_2, 0, 0,
                                              handshake.encode_message(handshake.CLIENT_HELLO, 0, body))

    first, second = CookieGate(shared_secret=b"s" * 32), CookieGate(shared_secret=b"s" * 32)
    verify = first.check(datagram(b""), peer, now=1000.0)
    fragment = handshake.parse_fragments(record.parse_records(verify.reply, 0)[0][0].fragment)[0]
    cookie = handshake.decode_hello_verify_request(fragment.body)
    assert second.check(datagram(cookie), peer, now=1030.0).verdict is Verdict.ACCEPT
    assert second.check(datagram(cookie), peer, now=1000.0 + 2 * DEFAULT_ROTATION).verdict is Verdict.VERIFY
    assert CookieGate().check(datagram(cookie), peer, now=1030.0).verdict is Verdict.VERIFY


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.written: list[dict[str, Any]] = []
        self.signals: list[str] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written.append(json.loads(data))

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str]]] = []
        self.stopped = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],
                     childFDs: dict[int, Any]) -> FakeTransport:
        assert childFDs[workers.REPORT_FD] == "r" and childFDs[0] == "w"
        transport = FakeTransport(100 + len(self.spawned))
        protocol.makeConnection(transport)
        self.spawned.append((protocol, args, env))
        return transport

    def stop(self) -> None:
        self.stopped = True


def report(child: Any, **message: Any) -> None:
    child.childDataReceived(workers.REPORT_FD, (json.dumps(message) + "\n").encode())


def make_supervisor(is_server: bool = True) -> tuple[supervisor.SupervisorService, FakeReactor, dict[str, int]]:
    reactor = FakeReactor()
    status: dict[str, int] = {}
    service = supervisor.SupervisorService(reactor, "coap-server", ["--port", "5683"], 2, is_server,
                                           frozenset({"open"}), lambda _, code: status.__setitem__("code", code),
                                           executable=["python", "-m", "nettester"])
    return service, reactor, status


def test_workers_start_one_after_the_other_and_learn_their_slots() -> None:
    service, reactor, _ = make_supervisor()
    service.startService()
    assert len(reactor.spawned) == 1
    first, args, env = reactor.spawned[0]
    assert args == ["python", "-m", "nettester", "coap-server", "--port", "5683"]
    assert env[workers.WORKER_ENV] == "0/2" and len(bytes.fromhex(env[workers.COOKIE_SECRET_ENV])) == 32
    report(first, ready=True, pid=100)
    assert len(reactor.spawned) == 2
    second = reactor.spawned[1][0]
    assert reactor.spawned[1][2][workers.COOKIE_SECRET_ENV] == env[workers.COOKIE_SECRET_ENV]
    report(second, ready=True, pid=101)
    assert first.transport.written[-1] == {"slots": [0, 1]} == second.transport.written[-1]


def test_a_dead_worker_is_restarted_its_totals_kept_and_its_slot_moved() -> None:
    service, reactor, _ = make_supervisor()
    service.startService()
    first = reactor.spawned[0][0]
    report(first, ready=True)
    second = reactor.spawned[1][0]
    report(second, ready=True)
    report(first, summary={"received": 10, "open": 4}, metrics=[])
    report(second, summary={"received": 5, "open": 1}, metrics=[])
    assert service.summary() == {"received": 15, "open": 5, "workers": 2, "restarts": 0}
    first.processEnded(Failure(ProcessTerminated(signal=9)))
    assert second.transport.written[-1] == {"slots": [-1, 0]}  # the kernel moved worker 1 to index 0
    assert service.summary() == {"received": 15, "open": 1, "workers": 1, "restarts": 1}
    reactor.advance(supervisor.RESTART_DELAY)
    again = reactor.spawned[2][0]
    assert reactor.spawned[2][2][workers.WORKER_ENV] == "0/2"
    report(again, ready=True)
    report(again, summary={"received": 1, "open": 0}, metrics=[])
    assert second.transport.written[-1] == {"slots": [1, 0]}
    assert service.summary()["received"] == 16


def test_a_worker_failing_at_start_stops_everything() -> None:
    service, reactor, status = make_supervisor()
    service.startService()
    reactor.spawned[0][0].processEnded(Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(0)
    assert reactor.stopped and status == {"code": 1} and len(reactor.spawned) == 1


def test_stop_terminates_every_worker_and_waits() -> None:
    service, reactor, _ = make_supervisor()
    service.startService()
    report(reactor.spawned[0][0], ready=True)
    report(reactor.spawned[1][0], ready=True)
    stopped = service.stopService()
    children = [spawned[0] for spawned in reactor.spawned]
    assert [child.transport.signals for child in children] == [["TERM"], ["TERM"]]
    children[0].processEnded(Failure(ProcessTerminated(signal=15)))
    assert not stopped.called
    reactor.advance(supervisor.STOP_TIMEOUT)
    assert children[1].transport.signals == ["TERM", "KILL"]
    children[1].processEnded(Failure(ProcessTerminated(signal=9)))
    assert stopped.called and len(reactor.spawned) == 2  # nothing restarted while stopping


def test_load_generators_end_with_their_merged_status() -> None:
    service, reactor, status = make_supervisor(is_server=False)
    service.startService()
    assert len(reactor.spawned) == 2, "load generators start together"
    report(reactor.spawned[0][0], ready=True)
    report(reactor.spawned[1][0], ready=True)
    reactor.spawned[0][0].processEnded(Failure(ProcessDone(0)))
    assert not reactor.stopped
    reactor.spawned[1][0].processEnded(Failure(ProcessTerminated(exitCode=3)))
    reactor.advance(0)
    assert reactor.stopped and status == {"code": 1}


def test_garbage_on_the_report_pipe_is_ignored() -> None:
    service, reactor, _ = make_supervisor()
    service.startService()
    reactor.spawned[0][0].childDataReceived(workers.REPORT_FD, b"not json\n")
    assert service.summary() == {"workers": 1, "restarts": 0}


# -- merged RTT histograms, requests per client, the load generators' merged result

def _exact_nearest_rank(samples: list[float], percent: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=0, max_size=80), min_size=1, max_size=4))
def test_merged_percentiles_are_those_of_the_union_of_samples(parts: list[list[float]]) -> None:
    histograms = []
    for samples in parts:
        histogram = RttHistogram()
        for value in samples:
            histogram.record(value)
        histograms.append(histogram.to_dict())
    merged = workers.merge_histograms([None, *histograms])  # a child that sent none yet counts for nothing
    union = [value for samples in parts for value in samples]
    if not union:
        assert merged is not None and merged.count == 0
        return
    assert merged is not None and merged.count == len(union)
    for percent in (50.0, 90.0, 99.0, 99.9, 100.0):
        got, exact = merged.percentile(percent), _exact_nearest_rank(union, percent)
        # the histogram's resolution: 1/32 of the value, and values are counted in whole microseconds
        assert got == pytest.approx(exact, rel=1 / SUB_BUCKETS, abs=2e-6), percent
    assert merged.field("rtt_max_ms") == round(max(union) * 1000, 3)
    assert merged.field("rtt_avg_ms") == pytest.approx(round(sum(union) / len(union) * 1000, 3), abs=1e-3)


def test_summaries_take_rtt_fields_from_the_merged_histogram() -> None:
    fast, slow = RttHistogram(), RttHistogram()
    for _ in range(99):
        fast.record(0.001)
    slow.record(0.5)
    union = workers.merge_histograms([fast.to_dict(), slow.to_dict()])
    parts = [{"requests": 99, "rtt_p50_ms": 1.0, "rtt_p99_ms": 1.0, "loss_pct": 0.0},
             {"requests": 1, "rtt_p50_ms": 500.0, "rtt_p99_ms": 500.0, "loss_pct": 0.0}]
    merged = workers.merge_summaries(parts, rtt=union)
    # The worst worker would say 500 ms for both: the union's median and 99th are 1 ms.
    assert merged == {"requests": 100, "rtt_p50_ms": 1.0, "rtt_p99_ms": 1.0, "loss_pct": 0.0}
    assert workers.merge_summaries(parts)["rtt_p50_ms"] == 500.0  # without histograms: the upper bound


def test_requests_per_client_histograms_add_up() -> None:
    assert workers.merge_counts([{"10": 3, "9": 1}, None, {"10": 2}]) == {9: 1, 10: 5}


def test_the_summed_dtls_families_of_a_server_are_the_workers_merge() -> None:
    from nettester.metrics import MetricSet
    from nettester.protocols.coap.server import summed_families

    sets = []
    for received in (3, 4):
        metric_set = MetricSet("dtls")
        metric_set.counter("received", "r").value = received
        metric_set.labeled_counter("dropped", "d", "reason").inc("no_session", received)
        metric_set.gauge("connections", "c", lambda received=received: received)
        sets.append(metric_set)
    values = {(sample.name, tuple(sample.labels.items())): sample.value
              for family in summed_families(sets) for sample in family.samples}
    assert values[("nettester_dtls_received_total", ())] == 7
    assert values[("nettester_dtls_dropped_total", (("reason", "no_session"),))] == 7
    assert values[("nettester_dtls_connections", ())] == 7


def _document(started: float, clients: int, lost_forward: int, episodes: int, rtt_ms: dict[str, float]
              ) -> dict[str, Any]:
    recorder = RunRecorder("stun-client", {"server": "127.0.0.1", "clients": clients}, started)
    for number in range(episodes):
        recorder.episode(LossEpisode(str(number), f"t{number}", started + number, started + number + 1, "forward",
                                     2, 0))
    recorder.sample(started + 5, rtt_p50_ms=1.0)
    document = recorder.document(started + 10, {"requests": 10, "lost_forward": lost_forward}, rtt_ms,
                                 Thresholds(max_loss_percent=5.0), RunVerdict(True))
    assert document["loss"]["lost_forward"] == episodes
    return document


def test_load_generators_print_and_report_the_merged_run(tmp_path: Any) -> None:
    reactor = FakeReactor()
    status: dict[str, int] = {}
    path = tmp_path / "run.json"
    service = supervisor.SupervisorService(reactor, "stun-client", ["--clients", "4"], 2, False, frozenset(),
                                           lambda _, code: status.__setitem__("code", code),
                                           executable=["python", "-m", "nettester"],
                                           merge_results=lambda *run: conclude_processes(*run, str(path)))
    service.startService()
    children = [spawned[0] for spawned in reactor.spawned]
    samples = ([0.001, 0.002, 0.003], [0.010, 0.020])
    for child, values in zip(children, samples, strict=True):
        histogram = RttHistogram()
        for value in values:
            histogram.record(value)
        report(child, ready=True)
        report(child, summary={"requests": 10, "rtt_p50_ms": 99.0}, metrics=[], rtt=histogram.to_dict(),
               per_client={"5": 2})
    union = RttHistogram()
    for value in samples[0] + samples[1]:
        union.record(value)
    assert service.summary()["rtt_p50_ms"] == union.field("rtt_p50_ms") == pytest.approx(3.0, rel=1 / SUB_BUCKETS)
    # Each process lost 1 of 10 (10 % > 5 %): the parent judges the sum (2 of 20), not the parts.
    documents = [_document(1000.0, 2, 1, 1, {"p50": 2.0, "p99": 3.0}),
                 _document(1002.0, 2, 1, 1, {"p50": 15.0, "p99": 20.0})]
    with log_events() as events:
        for child, document in zip(children, documents, strict=True):
            report(child, summary={"requests": 10, "rtt_p50_ms": 99.0}, metrics=[], final=True,
                   result={"document": document, "judged": [10, 1, 9, None]})
            child.processEnded(Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(0)
    assert reactor.stopped and status == {"code": 1}
    lines = {event["event"]: event for event in events}
    assert lines["merged_rtt"]["rtt_ms"] == union.percentiles_ms([50.0, 99.0])
    assert lines["merged_requests_per_client"]["requests_per_client"] == {"5": 4}
    assert lines["verdict"]["verdict"] == "verdict: FAIL: loss 10.00% (2 of 20) is above --max-loss 5%"
    merged = read_report(str(path))
    assert merged["configuration"] == {"server": "127.0.0.1", "clients": 4, "processes": 2}
    assert merged["counters"] == {"requests": 20, "lost_forward": 2}
    assert merged["loss"]["lost_forward"] == 2 and merged["rtt_ms"] == union.percentiles_ms([50.0, 99.0])
    assert [(episode["process"], episode["start"]) for episode in merged["episodes"]] == [(0, 1000.0), (1, 1002.0)]
    assert [point["process"] for point in merged["series"]] == [0, 1]
    assert (merged["started"], merged["ended"]) == (1000.0, 1012.0)
    assert merged["verdict"]["passed"] is False


def test_workers_combine_with_a_dtls_cluster_on_fixed_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(workers.WORKER_ENV, raising=False)
    options = CoapServerOptions()
    options.parseOptions(["--port", "5783", "--workers", "2", "--psk-sandbox",
                          "--dtls-cluster", ":15784;localhost:15884;1,---;localhost:25884;2"])
    assert options.process_count() == 2 and options["cluster"].node_id == 1
    for cluster in (":0;localhost:15884;1,---;localhost:25884;2", ":15784;localhost:0;1,---;localhost:25884;2"):
        with pytest.raises(UsageError, match="--workers needs fixed ports in the cluster option"):
            CoapServerOptions().parseOptions(["--port", "5783", "--workers", "2", "--psk-sandbox",
                                              "--dtls-cluster", cluster])


def test_a_cluster_workers_cids_carry_the_node_and_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(workers.WORKER_ENV, "1/2")
    options = CoapServerOptions()
    options.parseOptions(["--port", "5783", "--workers", "2", "--psk-sandbox",
                          "--dtls-cluster", ":15784;localhost:15884;7,---;localhost:25884;2"])
    cid = options["dtls"].cid_generator.new_connection_id(set())
    assert (len(cid), cid[0], cid[1]) == (6, 7, 1)


def test_the_node_count_of_cluster_workers_is_merged_once() -> None:
    live = [{"nodes": 2, "replicas": 3, "forwarded": 4}, {"nodes": 1, "replicas": 5, "forwarded": 6}]
    dead = {"nodes": 2, "replicas": 9, "forwarded": 1}
    options = CoapServerOptions
    merged = workers.merge_summaries([dead, *live], live, options.live_fields, agreed_fields=options.agreed_fields)
    assert merged == {"nodes": 2, "replicas": 8, "forwarded": 11}, "nodes: not 5; replicas: the live ones'"
    assert workers.merge_summaries([dead], [], options.live_fields, agreed_fields=options.agreed_fields)["nodes"] == 2


def test_shared_values_reach_the_other_workers_and_start_a_restarted_one() -> None:
    service, reactor, _ = make_supervisor()
    service.startService()
    first = reactor.spawned[0][0]
    assert first.transport.written == [{"shared": {}}], "the first line a worker reads: nothing kept yet"
    report(first, ready=True)
    second = reactor.spawned[1][0]
    report(second, ready=True)
    report(first, share={"cluster_nodes": {"nodes": [[2, "127.0.0.1", 9]]}})
    assert second.transport.written[-1] == {"shared": {"cluster_nodes": {"nodes": [[2, "127.0.0.1", 9]]}}}
    assert {"shared": {"cluster_nodes": {"nodes": [[2, "127.0.0.1", 9]]}}} not in first.transport.written
    first.processEnded(Failure(ProcessTerminated(signal=9)))
    reactor.advance(supervisor.RESTART_DELAY)
    again = reactor.spawned[2][0]
    assert again.transport.written[0] == {"shared": {"cluster_nodes": {"nodes": [[2, "127.0.0.1", 9]]}}}


def test_a_load_generator_is_sent_no_shared_values() -> None:
    service, reactor, _ = make_supervisor(is_server=False)
    service.startService()
    assert [spawned[0].transport.written for spawned in reactor.spawned] == [[], []]
    report(reactor.spawned[0][0], share={"k": 1})
    assert service.shared == {} and reactor.spawned[1][0].transport.written == []


def test_a_worker_context_hands_each_listener_the_kept_value_first() -> None:
    shared: list[tuple[str, Any]] = []
    context = workers.WorkerContext(1, 2, publish=lambda key, value: shared.append((key, value)),
                                    steer_with=lambda sock, factory: None)
    early: list[Any] = []
    context.on_shared("a", early.append)
    assert early == [], "nothing before the parent's first message"
    context.shared_received({"b": 1})
    assert early == [None], "the parent kept nothing under 'a'"
    late: list[Any] = []
    context.on_shared("b", late.append)
    context.shared_received({"a": 2})
    context.shared_received({"b": 3})
    assert (early, late) == ([None, 2], [1, 3])
    context.share("a", {"x": 1})
    assert shared == [("a", {"x": 1})]


class JoiningRole(Service):
    """A role that joins the workers and opens its sockets when told."""

    def __init__(self) -> None:
        self.context: workers.WorkerContext | None = None
        self.listening: Deferred[None] = Deferred()

    def join_workers(self, context: workers.WorkerContext) -> None:
        self.context = context

    def when_listening(self) -> Deferred[None]:
        return self.listening


def test_a_server_worker_joins_its_role_and_reports_ready_once_it_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    monkeypatch.setattr(supervisor, "_ParentChannel", lambda reactor, received, lost: FakeChannel())
    role, reactor = JoiningRole(), MemoryReactorClock()
    child = supervisor.WorkerChildService(role, reactor, report_fd=write_end, worker=(1, 2))
    try:
        assert role.context is not None and (role.context.index, role.context.count) == (1, 2)
        child.startService()
        child._started()  # the reactor's "after startup" trigger
        role.context.share("k", [1])
        role.listening.callback(None)
        lines = [json.loads(line) for line in os.read(read_end, 4096).splitlines()]
        assert lines[0] == {"share": {"k": [1]}} and lines[1]["ready"] is True, "ready only once listening"
        got: list[Any] = []
        role.context.on_shared("k", got.append)
        child._command({"shared": {"k": [2]}})
        assert got == [[2]]
    finally:
        child._loop.stop()
        os.close(read_end)
        os.close(write_end)


class FakeChannel:
    def startReading(self) -> None:
        pass


def test_a_killed_load_generator_keeps_its_rtts_and_counts_in_the_merged_summary() -> None:
    service, reactor, _ = make_supervisor(is_server=False)
    service.startService()
    first, second = (spawned[0] for spawned in reactor.spawned)

    def rtts(count: int) -> dict[str, Any]:
        histogram = RttHistogram()
        for _ in range(count):
            histogram.record(0.004)
        return histogram.to_dict()

    report(first, summary={"requests": 5, "rtt_max_ms": 4.0}, metrics=[], rtt=rtts(5))
    report(second, summary={"requests": 3, "rtt_max_ms": 4.0}, metrics=[], rtt=rtts(3))
    first.processEnded(Failure(ProcessTerminated(signal=9)))
    reactor.advance(supervisor.RESTART_DELAY)
    again = reactor.spawned[2][0]
    assert reactor.spawned[2][2][workers.WORKER_ENV] == "0/2", "its clients run again"
    report(again, summary={"requests": 1, "rtt_max_ms": 4.0}, metrics=[], rtt=rtts(1))
    merged = service.merged_rtt()
    assert merged is not None and merged.count == 9
    assert service.summary() == {"requests": 9, "rtt_max_ms": 4.0, "processes": 2, "restarts": 1}
