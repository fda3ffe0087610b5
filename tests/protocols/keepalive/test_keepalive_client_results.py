"""keepalive-client results: outages as loss episodes, close marks, --duration, the verdict, the report."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from test_keepalive_adapters import _connect
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from nettester.protocols.keepalive.client import KeepAliveClientService
from nettester.protocols.keepalive.options import ClientOptions
from nettester.protocols.keepalive.wire import ClientTiming
from nettester.report import Thresholds
from nettester.report.options import ResultSettings
from nettester.service import exit_status_of


def fleet(results: ResultSettings) -> tuple[MemoryReactorClock, KeepAliveClientService, list[str]]:
    reactor = MemoryReactorClock()
    stops: list[str] = []
    service = KeepAliveClientService(reactor, "10.0.0.1", 49665, 1, ClientTiming(5.0, 10.0, 0.0), ramp_up=0.0,
                                     reconnect_delay=2.0, rng=random.Random(7), run_id="run", results=results,
                                     stop=lambda: stops.append("stop"))
    service.startService()
    return reactor, service, stops


def answer_keepalives(reactor: MemoryReactorClock, protocol: Any, count: int) -> None:
    for seq in range(1, count + 1):
        reactor.advance(5.0)
        reactor.advance(0.01)
        protocol.dataReceived(f"Keep Alive Response {seq}\n".encode())


def stop(reactor: MemoryReactorClock, service: KeepAliveClientService) -> None:
    stopped = service.stopService()
    for protocol in list(service.open):
        protocol.connectionLost(Failure(ConnectionLost()))  # the FIN's answer, not a loss: we were closing
    reactor.advance(1.0)
    assert stopped.called


def test_a_reset_is_an_episode_a_mark_and_fails_the_run(tmp_path: Path, logged: Any) -> None:
    report = str(tmp_path / "keepalive.json")
    reactor, service, stops = fleet(ResultSettings(duration=60.0, report=report))
    reactor.advance(0.0)
    protocol, _ = _connect(reactor)
    answer_keepalives(reactor, protocol, 2)
    protocol.connectionLost(Failure(ConnectionLost()))  # a RST from the path
    reactor.advance(2.0)
    again, _ = _connect(reactor)  # the reconnect ends the outage
    answer_keepalives(reactor, again, 1)
    reactor.advance(60.0)
    assert stops == ["stop"]  # --duration asked the process to stop
    stop(reactor, service)
    assert service.verdict is not None and not service.verdict.passed
    assert service.verdict.reasons == ("1 connections reset or dropped, above --max-resets 0",)
    assert exit_status_of(service) == 1
    assert logged.lines("verdict") == [
        "keepalive-client run run: verdict: FAIL: 1 connections reset or dropped, above --max-resets 0"]
    document = json.loads(Path(report).read_text())
    [episode] = document["episodes"]
    assert episode["key"] == "run-1-1" and episode["client"] == "1" and episode["direction"] == "unattributed"
    assert episode["detail"]["cause"] == "peer_reset" and episode["end"] - episode["start"] == 2.0
    assert [mark["detail"]["cause"] for mark in document["marks"]] == ["peer_reset"]
    assert document["counters"]["resets"] == 1 and document["counters"]["keepalives"] == 3
    assert document["rtt_ms"]["samples"] == 3
    assert {sample["open_connections"] for sample in document["series"]} == {0, 1}
    assert document["configuration"]["target"] == "10.0.0.1:49665"


def test_a_clean_run_passes_and_an_open_outage_has_no_end() -> None:
    reactor, service, _ = fleet(ResultSettings(thresholds=Thresholds(max_loss_percent=0.0, max_resets=0)))
    reactor.advance(0.0)
    protocol, _ = _connect(reactor)
    answer_keepalives(reactor, protocol, 3)
    stop(reactor, service)
    assert service.verdict is not None and service.verdict.passed and exit_status_of(service) == 0

    reactor, service, _ = fleet(ResultSettings(thresholds=Thresholds(max_loss_percent=None, max_resets=None)))
    reactor.advance(0.0)
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
    reactor.advance(2.0)
    reactor.tcpClients[1][2].clientConnectionFailed(reactor.connectors[1], Failure(ConnectionRefusedError()))
    stop(reactor, service)
    assert service.recorder is not None
    [episode] = service.recorder.episodes
    assert episode.end is None and episode.detail["cause"] == "server_unavailable" and episode.transmissions == 2
    assert service.verdict is not None and service.verdict.reasons == (
        "nothing was sent (is --duration too short, or the server unreachable?)",)


def test_a_server_that_goes_away_fails_the_run(logged: Any) -> None:
    reactor, service, _ = fleet(ResultSettings())
    reactor.advance(0.0)
    protocol, _ = _connect(reactor)
    answer_keepalives(reactor, protocol, 2)
    protocol.connectionLost(Failure(ConnectionDone()))  # the server's FIN
    reactor.advance(2.0)
    reactor.tcpClients[1][2].clientConnectionFailed(reactor.connectors[1], Failure(ConnectionRefusedError()))
    stop(reactor, service)
    assert service.verdict is not None
    assert service.verdict.reasons == ("2 connections reset or dropped, above --max-resets 0",)


def test_without_result_settings_nothing_is_judged() -> None:
    reactor = MemoryReactorClock()
    service = KeepAliveClientService(reactor, "10.0.0.1", 49665, 1, ClientTiming(5.0, 10.0, 0.0), ramp_up=0.0)
    service.startService()
    stop(reactor, service)
    assert service.verdict is None and service.recorder is None


def test_client_options_take_the_result_options() -> None:
    options = ClientOptions()
    options.parseOptions(["--server", "127.0.0.1", "--duration", "30", "--max-resets", "2"])
    assert ResultSettings.from_options(options) == ResultSettings(30.0, None, Thresholds(0.0, 2))


def test_a_child_of_processes_numbers_its_clients_in_the_run_and_leaves_the_run_lines_to_its_parent(
        logged: Any, monkeypatch: Any) -> None:
    from nettester.protocols.keepalive.runlines import summary_of
    from nettester.tally import Tally
    from nettester.workers import WORKER_ENV

    monkeypatch.setenv(WORKER_ENV, "1/2")
    reactor = MemoryReactorClock()
    service = KeepAliveClientService(reactor, "10.0.0.1", 49665, 1, ClientTiming(5.0, 10.0, 0.0), ramp_up=0.0,
                                     rng=random.Random(7), run_id="shared", results=ResultSettings(duration=30.0),
                                     stop=lambda: None, first_client=3)
    service.startService()
    reactor.advance(0.0)
    protocol, _ = _connect(reactor)
    answer_keepalives(reactor, protocol, 2)
    # Its client 1 is client 4 of the whole run, its conn id the one the server logs for that client.
    assert logged.lines("conn_open") == ["Client 4: connected 10.0.0.2:40000 -> 10.0.0.1:49665, conn=shared-4-1"]
    reactor.advance(30.0)
    stop(reactor, service)
    assert [event for event in logged.events if event.get("event") in (
        "fleet_start", "duration_reached", "verdict")] == [], "the parent prints the whole run's"
    report = service.worker_report(final=True)
    tally = Tally.from_dict(report["tally"])
    assert summary_of(tally) == service.summary() and summary_of(tally)["keepalives"] == 2
    assert (tally.level("clients"), tally.level("open")) == (1, 0)
    assert report["result"]["judged"] == [2, 0, 2, 0]
