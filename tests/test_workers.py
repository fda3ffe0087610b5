"""--workers / --processes: options, merging, and the supervisor driven by a fake reactor (no processes)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
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
from nettester.protocols.stun.runlines import summary_of
from nettester.report import LossEpisode, RttHistogram, RunRecorder, Thresholds, read_report
from nettester.report import Verdict as RunVerdict
from nettester.tally import Tally
from tests.logcapture import log_events


def test_worker_count_accepts_numbers_and_auto() -> None:
    assert workers.worker_count("3") == 3
    assert workers.worker_count("auto") >= 1
    with pytest.raises(ValueError, match="at least 1 or 'auto'"):
        workers.worker_count("0")


def test_shares_add_up_to_the_total() -> None:
    assert [workers.share(10, index, 3) for index in range(3)] == [4, 3, 3]


def test_a_child_runs_its_share_of_the_clients_numbered_as_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    shares = []
    for index in range(3):
        monkeypatch.setenv(workers.WORKER_ENV, f"{index}/3")
        options = StunClientOptions()
        options.parseOptions(["--server", "127.0.0.1", "--clients", "10", "--processes", "3"])
        shares.append((options["clients"], options.first_client))
        assert options.role_argv == ["--server", "127.0.0.1", "--clients", "10", "--processes", "3"]
    assert shares == [(4, 0), (3, 4), (3, 7)]  # clients 0-3, 4-6, 7-9: each number once in the run


def test_a_seeded_child_draws_its_own_transaction_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettester.protocols.stun.roles import build_client

    def first_draw(worker: str | None) -> float:
        if worker is None:
            monkeypatch.delenv(workers.WORKER_ENV, raising=False)
        else:
            monkeypatch.setenv(workers.WORKER_ENV, worker)
        options = StunClientOptions()
        options.parseOptions(["--server", "127.0.0.1", "--clients", "4", "--processes", "2", "--seed", "7"])
        return build_client(Clock(), options)._rng.random()  # type: ignore[attr-defined]

    alone = first_draw(None)
    assert alone == first_draw(None), "--seed repeats a run"
    assert len({alone, first_draw("0/2"), first_draw("1/2")}) == 3, "the same seed would repeat ids across processes"


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


def make_supervisor(is_server: bool = True, output: Any = None
                    ) -> tuple[supervisor.SupervisorService, FakeReactor, dict[str, int]]:
    reactor = FakeReactor()
    status: dict[str, int] = {}
    service = supervisor.SupervisorService(reactor, "coap-server", ["--port", "5683"], 2, is_server,
                                           frozenset({"open"}), lambda _, code: status.__setitem__("code", code),
                                           executable=["python", "-m", "nettester"], output=output)
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


# -- the load generators' merged run

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


def stun_run(*arguments: str) -> Any:
    """The parent's ``MergedRun`` of ``stun-client --processes 2 ...``."""
    options = StunClientOptions()
    options.parseOptions(["--server", "127.0.0.1", "--clients", "4", "--processes", "2", *arguments])
    return options.merged_run()


def stun_tally(clients: int, responses: int, timeouts: int, rtts: list[float], at: float = 1010.0) -> dict[str, Any]:
    histogram = RttHistogram()
    for value in rtts:
        histogram.record(value)
    counts = {"requests": responses + timeouts, "responses": responses, "timeouts": timeouts}
    return Tally(counts, {"clients": clients}, {"rtt": histogram}, {}, 1000.0, at).to_dict()


def test_load_generators_print_and_report_the_merged_run(tmp_path: Any) -> None:
    path = tmp_path / "run.json"
    output = stun_run("--report", str(path), "--max-loss", "5")
    service, reactor, status = make_supervisor(is_server=False, output=output)
    service.startService()
    children = [spawned[0] for spawned in reactor.spawned]
    samples = ([0.001, 0.002, 0.003], [0.010, 0.020])
    for child, values in zip(children, samples, strict=True):
        report(child, ready=True)
        report(child, summary={"requests": 10, "rtt_p50_ms": 99.0}, metrics=[],
               tally=stun_tally(2, len(values), 0, values))
    union = RttHistogram()
    for value in samples[0] + samples[1]:
        union.record(value)
    # The summary is stun-client's own, from the merged tally: the union's median, not a process's.
    assert list(service.summary()) == list(summary_of(Tally()))
    assert service.summary()["rtt_p50_ms"] == union.field("rtt_p50_ms") == pytest.approx(3.0, rel=1 / SUB_BUCKETS)
    # Each process lost 1 of 10 (10 % > 5 %): the parent judges the sum (2 of 20), not the parts.
    documents = [_document(1000.0, 2, 1, 1, {"p50": 2.0, "p99": 3.0}),
                 _document(1002.0, 2, 1, 1, {"p50": 15.0, "p99": 20.0})]
    with log_events() as events:
        for child, document, values in zip(children, documents, samples, strict=True):
            report(child, summary={"requests": 10}, metrics=[], final=True,
                   tally=stun_tally(2, len(values), 1, values),
                   result={"document": document, "judged": [10, 1, 9, None]})
            child.processEnded(Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(0)
    assert reactor.stopped and status == {"code": 1}
    [verdict] = [event for event in events if event.get("event") == "verdict"]
    assert verdict["verdict"] == "verdict: FAIL: loss 10.00% (2 of 20) is above --max-loss 5%"
    assert verdict["log_namespace"] == "nettester.protocols.stun.runlines"  # JSON module "stun", as one process's
    merged = read_report(str(path))
    assert merged["configuration"] == {"server": "127.0.0.1", "clients": 4, "processes": 2}
    assert merged["counters"] == service.summary() and merged["counters"]["timeouts"] == 2
    assert merged["loss"]["lost_forward"] == 2 and merged["rtt_ms"] == union.percentiles_ms([50.0, 90.0, 99.0])
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

    def stopReading(self) -> None:
        pass


def test_a_killed_load_generator_keeps_its_rtts_and_counts_but_not_its_levels() -> None:
    service, reactor, _ = make_supervisor(is_server=False, output=stun_run())
    service.startService()
    first, second = (spawned[0] for spawned in reactor.spawned)
    report(first, summary={}, metrics=[], tally=stun_tally(2, 5, 0, [0.004] * 5))
    report(second, summary={}, metrics=[], tally=stun_tally(2, 3, 0, [0.004] * 3))
    first.processEnded(Failure(ProcessTerminated(signal=9)))
    reactor.advance(supervisor.RESTART_DELAY)
    again = reactor.spawned[2][0]
    assert reactor.spawned[2][2][workers.WORKER_ENV] == "0/2", "its clients run again"
    report(again, summary={}, metrics=[], tally=stun_tally(2, 1, 0, [0.004]))
    assert service.tally().histogram("rtt").count == 9
    summary = service.summary()
    # Answers of the dead process stay; its two clients run again in the new one, counted once.
    assert (summary["responses"], summary["clients"], summary["rtt_p99_ms"]) == (9, 4, 4.0)
    assert "processes" not in summary and "restarts" not in summary  # the keys one process prints
    assert service.restarts.value == 1


def ready_pair(service: supervisor.SupervisorService, reactor: FakeReactor) -> list[Any]:
    service.startService()
    children = [spawned[0] for spawned in reactor.spawned]
    for child in children:
        report(child, ready=True)
    return children


def test_a_refresh_asks_every_running_child_and_waits_for_all_answers() -> None:
    service, reactor, _ = make_supervisor(is_server=False, output=stun_run())
    first, second = ready_pair(service, reactor)
    refreshed = service.refresh_summary()
    assert first.transport.written[-1] == {"report": 1} == second.transport.written[-1]
    report(first, summary={}, metrics=[], tally=stun_tally(2, 5, 0, []), answer=1)
    report(second, summary={}, metrics=[], tally=stun_tally(2, 7, 0, []))  # its periodic line: not the answer
    assert not refreshed.called
    report(second, summary={}, metrics=[], tally=stun_tally(2, 8, 0, []), answer=1)
    assert refreshed.called and service.summary()["responses"] == 13
    # A child that does not answer holds the line back REFRESH_TIMEOUT at most; one that ends, not at all.
    late = service.refresh_summary()
    reactor.advance(supervisor.REFRESH_TIMEOUT - 0.01)
    assert not late.called
    reactor.advance(0.01)
    assert late.called and late.result is True
    ending = service.refresh_summary()
    report(first, summary={}, metrics=[], tally=stun_tally(2, 5, 0, []), answer=3)
    second.processEnded(Failure(ProcessTerminated(signal=9)))
    assert ending.called and ending.result is True
    assert [call.func for call in reactor.getDelayedCalls()] == [service._restart]  # no refresh timeout left


def test_the_periodic_summary_line_waits_for_the_refresh() -> None:
    from twisted.internet.defer import Deferred

    from nettester.metrics import SummaryReporter

    clock = Clock()
    pending: list[Deferred[bool]] = []

    def refresh() -> Deferred[bool]:
        pending.append(Deferred())
        return pending[-1]

    counted = {"requests": 1}
    reporter = SummaryReporter(clock, "stun-client", lambda: dict(counted), 1.0, refresh=refresh)
    with log_events() as events:
        reporter.startService()
        clock.advance(1.0)
        assert len(pending) == 1 and [event for event in events if event.get("event") == "summary"] == []
        counted["requests"] = 5  # what the children answered
        pending[0].callback(True)
        clock.advance(1.0)
        pending[1].callback(False)  # the run is over: its final summary comes next, no periodic line
        reporter.stopService()
        clock.advance(1.0)
    assert [(event["event"], event["requests"]) for event in events] == [("summary", 5), ("final_summary", 5)]


def test_a_load_generators_parent_prints_the_start_line_first_and_the_duration_line() -> None:
    from twisted.logger import LogLevel

    from nettester.logs import set_level

    output = stun_run("--duration", "2")
    service, reactor, _ = make_supervisor(is_server=False, output=output)
    set_level(LogLevel.debug)
    with log_events() as events:
        service.startService()
        assert [event["event"] for event in events if event["log_level"].name != "debug"] == ["clients_start"]
        assert len(reactor.spawned) == 2, "the start line came before the processes"
        envs = [spawned[2] for spawned in reactor.spawned]
        assert envs[0][workers.RUN_ENV] == envs[1][workers.RUN_ENV] == output.run_id
        for child in [spawned[0] for spawned in reactor.spawned]:
            report(child, ready=True)
        reactor.advance(2.0)
        over = service.refresh_summary()
    set_level(LogLevel.info)
    assert over.called and over.result is False, "no periodic summary after the --duration line"
    lines = [event for event in events if event["log_level"].name != "debug"]
    assert [event["event"] for event in lines] == ["clients_start", "duration_over"]
    assert lines[0]["clients"] == 4 and lines[0]["processes"] == 2
    # How the processes start and end is debug detail: the start line names them.
    assert {event["event"] for event in events if event["log_level"].name == "debug"} >= {
        "workers_starting", "worker_started"}


def test_coap_bench_s_parent_prints_progress_lines_merged_from_answers_then_californium_s_summary() -> None:
    import io

    from nettester.protocols.coap.benchlines import BenchPrinter, BenchProcessesRun

    options = CoapBenchOptions()
    options.parseOptions(["--clients", "4", "--processes", "2", "--report-interval", "2", "--duration", "5",
                          "coap://127.0.0.1:5783/benchmark"])
    out = io.StringIO()
    output = BenchProcessesRun(options.merged_run().described, None, 2.0, BenchPrinter(out, json_lines=False))
    service, reactor, status = make_supervisor(is_server=False, output=output)
    reactor.advance(1000.0)
    first, second = ready_pair(service, reactor)
    assert out.getvalue() == "coap-bench: 4 clients to 127.0.0.1:5783 (coap, CON GET /benchmark, for 5 s), " \
                             "2 processes\n"

    def bench_tally(requests: int, at: float, rtt: float = 0.001) -> dict[str, Any]:
        histogram = RttHistogram()
        for _ in range(requests):
            histogram.record(rtt)
        counts = {"requests": requests, "transmission_errors": 0, "retransmissions": 0, "lost_forward": 0}
        return Tally(counts, {"clients": 2, "active": 2}, {"rtt": histogram}, {requests // 2: 2}, 1000.0,
                     at).to_dict()

    reactor.advance(1.0)  # the first progress line a second in, as one process's
    assert first.transport.written[-1] == {"report": 1}
    report(first, summary={}, metrics=[], tally=bench_tally(300, 1001.0), answer=1)
    report(second, summary={}, metrics=[], tally=bench_tally(100, 1001.0), answer=1)
    reactor.advance(2.0)
    report(first, summary={}, metrics=[], tally=bench_tally(900, 1003.0), answer=2)
    report(second, summary={}, metrics=[], tally=bench_tally(300, 1003.0), answer=2)
    reactor.advance(2.0)  # --duration is over: no more progress lines
    assert len([line for line in first.transport.written if "report" in line]) == 2
    for child, requests, rtt in ((first, 1200, 0.001), (second, 400, 0.002)):
        report(child, summary={}, metrics=[], final=True, tally=bench_tally(requests, 1005.0, rtt),
               result={"document": _document(1000.0, 2, 0, 0, {}), "judged": [requests, 0, requests, None]})
        child.processEnded(Failure(ProcessDone(0)))
    assert status == {"code": 0}
    lines = out.getvalue().splitlines()
    assert lines[1:3] == [
        "400 requests (400 reqs/s, 0 retransmissions (0.00%), 0 transmission errors (0.00%), 4 clients) "
        "lost_forward=0 lost_return=0 lost_unattributed=0",
        "1200 requests (400 reqs/s, 0 retransmissions (0.00%), 0 transmission errors (0.00%), 4 clients) "
        "lost_forward=0 lost_return=0 lost_unattributed=0"]
    assert lines[3:] == [
        "1600 requests in 5.0 s: 320 reqs/s, 0 retransmissions, 0 transmission errors, lost_forward=0, "
        "lost_return=0, lost_unattributed=0, 4 clients",
        "RTT ms: p50=1.00, p90=2.00, p95=2.00, p99=2.00, p99.9=2.00, max=2.00",  # the union's, not a process's
        "requests per client (requests: clients):", "  200: 2", "  600: 2",
        "verdict: pass"]


def test_an_unreadable_tally_is_named_and_the_last_one_kept() -> None:
    service, reactor, _ = make_supervisor(is_server=False, output=stun_run())
    first, _ = ready_pair(service, reactor)
    report(first, summary={}, metrics=[], tally=stun_tally(2, 5, 0, []))
    with log_events() as events:
        report(first, summary={}, metrics=[], tally={"counts": "many"})
    [warning] = [event for event in events if event.get("event") == "worker_bad_report"]
    assert "its tally is unreadable (not a tally: " in warning["log_format"].format(**warning)
    assert service.summary()["responses"] == 5


def test_load_generator_processes_start_together_once_every_one_is_ready() -> None:
    output = stun_run("--duration", "2")
    service, reactor, _ = make_supervisor(is_server=False, output=output)
    service.startService()
    first, second = (spawned[0] for spawned in reactor.spawned)
    report(first, ready=True)
    reactor.advance(3.0)  # longer than --duration: it counts from the go, not from the spawn
    assert {"go": True} not in first.transport.written, "the first waits for its sibling"
    assert not service._over
    report(second, ready=True)
    assert first.transport.written[-1] == {"go": True} == second.transport.written[-1]
    reactor.advance(1.9)
    assert not service._over
    reactor.advance(0.1)
    assert service._over, "the --duration line, 2 s after the go"


def test_a_process_late_past_the_go_timeout_or_ended_early_holds_the_others_back_no_longer() -> None:
    service, reactor, _ = make_supervisor(is_server=False, output=stun_run())
    service.startService()
    first, second = (spawned[0] for spawned in reactor.spawned)
    report(first, ready=True)
    reactor.advance(supervisor.GO_TIMEOUT)
    assert first.transport.written[-1] == {"go": True}
    report(second, ready=True)
    assert second.transport.written[-1] == {"go": True}, "a late one joins the run at once"

    service, reactor, _ = make_supervisor(is_server=False, output=stun_run())
    service.startService()
    first, second = (spawned[0] for spawned in reactor.spawned)
    report(first, ready=True)
    second.processEnded(Failure(ProcessDone(0)))
    assert first.transport.written[-1] == {"go": True}, "one that ended before it was ready no longer counts"


class CountingRole(Service):
    def __init__(self) -> None:
        self.starts = self.stops = 0

    def startService(self) -> None:
        super().startService()
        self.starts += 1

    def stopService(self) -> None:
        super().stopService()
        self.stops += 1


def test_a_load_generator_process_starts_its_role_on_the_go_and_reports_nothing_if_stopped_before(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "_ParentChannel", lambda reactor, received, lost: FakeChannel())
    for told in (True, False):
        read_end, write_end = os.pipe()
        role, reactor = CountingRole(), MemoryReactorClock()
        child = supervisor.WorkerChildService(role, reactor, report_fd=write_end)
        try:
            child.startService()
            child._started()
            assert role.starts == 0, "ready, waiting for the parent's go"
            assert json.loads(os.read(read_end, 4096).splitlines()[0])["ready"] is True
            if told:
                child._command({"go": True})
                child._command({"go": True})
                assert role.starts == 1
            child.stopService()
            assert role.stops == (1 if told else 0)
            os.close(write_end)
            lines = [json.loads(line) for line in os.read(read_end, 65536).splitlines()]
            assert any(line.get("final") for line in lines) is told, "a final report only from a role that ran"
        finally:
            if child._loop.running:
                child._loop.stop()
            os.close(read_end)
