"""The ``coap-bench`` role: Californium's BenchmarkClient semantics, so results compare.

Each client has its own socket (its own source port) and runs a closed
loop: one request, wait for its response, the next one after ``interval``;
a failed request (timeout, reset, failed DTLS handshake) is a transmission
error and counts as one of the client's requests, the next one goes after
one second, so a run against a dead server ends too. A start-up line, a
first progress line after a second, then one every ``report_interval``; at
the end a summary with the overall rate, RTT percentiles (from a bounded
histogram), the loss by direction, the histogram of requests per client and
the verdict. With ``--log-format json`` these are JSON log lines too, so
stdout holds nothing else.

Every request carries the attribution tag (:mod:`.attribution`): against
nettester's extended server a failed request is told lost on the way out
(``lost_forward``) or back (``lost_return``); against others it stays
``lost_unattributed``.
"""

from __future__ import annotations

import random
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from nettester.interfaces import IDatagramLink
from nettester.logs import Logger
from nettester.protocols.coap.attribution import REPORT_OPTION, TAG_OPTION, Attributor
from nettester.protocols.coap.benchlines import (
    FIRST_PROGRESS,
    PERCENTILES,
    BenchPrinter,
    ProgressRate,
    counters_of,
)
from nettester.protocols.coap.client import (
    EXIT_ERROR_RESPONSE,
    EXIT_NO_RESPONSE,
    EXIT_SUCCESS,
    MAX_DATAGRAM,
    CoapUri,
    build_request,
    end_process,
    server_text,
)
from nettester.protocols.coap.endpoint import CoapRequestError
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.parameters import TransmissionParameters
from nettester.protocols.coap.tcplink import TcpLink, endpoint_class
from nettester.protocols.dtls.endpoint import DtlsConnectError, DtlsEndpoint
from nettester.report import (
    UNATTRIBUTED,
    LossEpisode,
    ReportError,
    RttHistogram,
    RunRecorder,
    Thresholds,
    Verdict,
    judge,
    write_report,
)
from nettester.tally import Tally

log = Logger()

RETRY_DELAY = 1.0


@dataclass(frozen=True)
class BenchConfig:
    """What ``coap-bench`` was asked to do."""

    uri: CoapUri
    clients: int = 2000
    requests: int = 0  # per client; 0 = until stopped
    nstart: int = 1
    confirmable: bool = True
    method: str = "GET"
    interval: float = 0.0
    timeout: float = 10.0
    payload_random: int = 0
    report_interval: float = 10.0
    duration: float = 0.0  # stop by itself after this many seconds; 0 = when --requests are done or stopped
    thresholds: Thresholds = field(default_factory=Thresholds)
    report: str | None = None  # --report FILE
    first_client: int = 0  # the number of client 0 in the lines (a --processes child's share starts there)

    def describe(self) -> dict[str, Any]:
        """The configuration as the report and the start-up line show it."""
        uri = self.uri
        path = "/" + "/".join(uri.path) + ("?" + "&".join(uri.query) if uri.query else "")
        return {"target": server_text(uri.address), "scheme": uri.scheme, "resource": path,
                "clients": self.clients, "requests_per_client": self.requests, "nstart": self.nstart,
                # RFC 8323: a reliable transport has no message types.
                "mode": "reliable" if uri.scheme.endswith("+tcp") else "CON" if self.confirmable else "NON",
                "method": self.method, "interval_s": self.interval,
                "timeout_s": self.timeout, "payload_random": self.payload_random, "duration_s": self.duration}


class BenchStatistics:
    """Counts and RTTs of a run: pure bookkeeping, fed with times from outside.

    RTTs go into a bounded histogram (``rtt``, merged from the one of the
    current progress interval), so memory stays flat however long the run.
    Its lines are ``benchlines``', printed from the service's tally.
    """

    def __init__(self, clients: int, started: float) -> None:
        self.started = started
        self.responses = 0
        self.failures = 0
        self.per_client = [0] * clients
        self.rtt = RttHistogram()
        self.interval_rtt = RttHistogram()

    def record_response(self, client: int, rtt: float | None) -> None:
        """One answered request of ``client`` (RTT None: not measured)."""
        self.responses += 1
        self.per_client[client] += 1
        if rtt is not None:
            self.interval_rtt.record(rtt)

    def record_failure(self) -> None:
        """One request that ended without an answer (it is retried)."""
        self.failures += 1

    def end_interval(self) -> RttHistogram:
        """The RTTs since the last call (merged into ``rtt``), for a time-series sample."""
        interval, self.interval_rtt = self.interval_rtt, RttHistogram()
        self.rtt.merge(interval)
        return interval

    def all_rtts(self) -> RttHistogram:
        """Every RTT so far, the current interval's included, leaving the interval as it is."""
        histogram = RttHistogram()
        histogram.merge(self.rtt)
        histogram.merge(self.interval_rtt)
        return histogram

    def requests_per_client(self) -> dict[int, int]:
        """Californium's histogram: how many clients completed how many requests."""
        return dict(sorted(Counter(self.per_client).items()))

    def percentile(self, percent: float) -> float | None:
        """The RTT at ``percent`` in seconds, None without samples."""
        self.end_interval()
        return self.rtt.percentile(percent)

    def verdict(self, thresholds: Thresholds, sent: int = 0) -> Verdict:
        """The run judged by ``thresholds`` (``--max-loss``); ``sent``: requests started, those
        still in flight at the stop included (neither answered nor failed)."""
        return judge(thresholds, max(sent, self.responses + self.failures), self.failures, self.responses)

    def exit_status(self, thresholds: Thresholds | None = None, sent: int = 0) -> int:
        """0 passed, 1 failed (more failed requests than ``--max-loss``, default none), 3 none answered."""
        if not self.responses:
            return EXIT_NO_RESPONSE
        return EXIT_SUCCESS if self.verdict(thresholds or Thresholds(), sent).passed else EXIT_ERROR_RESPONSE


class BenchClient:
    """One closed-loop client: its own link, endpoint and attribution session."""

    def __init__(self, index: int, bench: CoapBenchService, link: IDatagramLink) -> None:
        self.index = index
        self.number = bench.config.first_client + index  # in the lines: one number per client in the whole run
        self.bench = bench
        self.link = link
        rng = random.Random(bench.rng.random())
        self.endpoint = endpoint_class(link)(link, bench.reactor, params=bench.params, rng=rng)
        self.attribution = Attributor(rng.randbytes(8))
        #: False once the server answered without a report: it does not attribute (a third-party server).
        self.attributing = True
        self.peer: Any = None
        self.sent = 0
        self.active = True
        self.port: Any = None

    def start(self) -> None:
        """Connect (DTLS handshake for coaps), then start the closed loop; a handshake that
        does not complete within ``--timeout`` is a failed request like any other."""
        started = self.bench.reactor.seconds()
        timeout = self.bench.config.timeout
        connecting = self.link.connect(self.bench.config.uri.address)
        if isinstance(self.link, DtlsEndpoint):
            reason = (f"no DTLS handshake within --timeout {timeout:g} s: is a coaps server listening on "
                      f"{self.bench.server}?")
            connecting.addTimeout(timeout, self.bench.reactor,
                                  onTimeoutCancel=lambda result, _: Failure(DtlsConnectError(reason)))
        connecting.addCallbacks(self._connected, self._connect_failed, errbackArgs=(started,))

    def _connected(self, peer: Any) -> None:
        self.peer = peer
        for _ in range(self.bench.config.nstart):
            self._send()

    def _connect_failed(self, failure: Any, started: float) -> None:
        """A failed handshake (or resolution) is a failed request too: counted, retried after 1 s."""
        if not self.active or not self.bench.running:
            return
        reason = failure.getErrorMessage()
        log.warn("client {client}: connecting to {server} failed: {reason}; retry in 1 s",
                 event="coap_bench_connect_failure", client=self.number, server=self.bench.server, reason=reason)
        self.bench.stats.record_failure()
        # No request went out: where the handshake was lost is not known.
        self.bench.loss(LossEpisode(str(self.number), "handshake", started, self.bench.reactor.seconds(),
                                    UNATTRIBUTED, 1, None, {"reason": reason}))
        self.sent += 1
        if self._requests_left():
            self.bench.reactor.callLater(RETRY_DELAY, self.start)

    def _requests_left(self) -> bool:
        """Whether ``--requests`` leaves another one; when not, the client is done."""
        requests = self.bench.config.requests
        if requests and self.sent >= requests:
            self.active = False
            self.bench.client_finished()
            return False
        return True

    def _send(self) -> None:
        config = self.bench.config
        if not self.active or not self.bench.running or not self._requests_left():
            return
        self.sent += 1
        payload = self.bench.rng.randbytes(config.payload_random) if config.payload_random else b""
        request = build_request(config.uri, config.method, payload, config.confirmable)
        sequence, tag = self.attribution.next_tag()
        request.options.append((TAG_OPTION, tag))
        retransmitted = self.endpoint.stats.retransmissions
        sending = self.endpoint.request(self.peer, request, timeout=config.timeout)
        sending.addCallbacks(self._answered, self._failed,
                             errbackArgs=(sequence, self.bench.reactor.seconds(), retransmitted))

    def _answered(self, event: ResponseReceived) -> None:
        if not self.bench.running:
            return  # after the summary: not counted
        self.bench.stats.record_response(self.index, event.rtt)
        report = event.response.option(REPORT_OPTION)
        self.attributing = report is not None
        now = self.bench.reactor.seconds()
        for episode, direction in self.attribution.answered(report):
            self.bench.loss(LossEpisode(episode.client, episode.key, episode.start, now, direction,
                                        episode.transmissions, episode.reached, episode.detail))
        self._next(self.bench.config.interval)

    def _failed(self, failure: Any, sequence: int, started: float, retransmitted: int) -> None:
        failure.trap(CoapRequestError)
        if not self.bench.running:
            return
        outgoing = failure.value.request
        reason = failure.value.reason
        # MID and token find the exchange in a capture (coap.mid == N, coap.token == X).
        log.warn("client {client}: request to {peer} failed: {reason} (MID {mid}, token {token}); retry in 1 s",
                 event="coap_bench_failure", client=self.number, peer=self.bench.server, reason=reason,
                 mid=outgoing.mid, token=outgoing.token.hex())
        self.bench.stats.record_failure()
        # With one request in flight, the endpoint's retransmissions since the send are this request's.
        retransmissions = self.endpoint.stats.retransmissions - retransmitted if self.bench.config.nstart == 1 else 0
        episode = LossEpisode(str(self.number), outgoing.token.hex(), started, None, UNATTRIBUTED,
                              1 + retransmissions, None, {"mid": outgoing.mid, "reason": reason, "sequence": sequence})
        if self.attributing:
            self.attribution.failed(sequence, episode)
        else:
            self.bench.loss(LossEpisode(episode.client, episode.key, started, self.bench.reactor.seconds(),
                                        UNATTRIBUTED, episode.transmissions, None, episode.detail))
        self._next(RETRY_DELAY)

    def _next(self, delay: float) -> None:
        if delay > 0:
            self.bench.reactor.callLater(delay, self._send)
        else:
            self._send()


class CoapBenchService(Service):
    """Starts the clients, prints progress lines, a final summary and the verdict."""

    def __init__(self, reactor: Any, config: BenchConfig, link_factory: Any, stdout: IO[str],
                 rng: random.Random | None = None, json_lines: bool = False) -> None:
        self.reactor = reactor
        self.config = config
        self.link_factory = link_factory
        self.printer = BenchPrinter(stdout, json_lines)
        self.rng = rng or random.Random()
        self.params = TransmissionParameters(nstart=config.nstart)
        self.server = server_text(config.uri.address)
        self.clients: list[BenchClient] = []
        self.stats = BenchStatistics(config.clients, reactor.seconds())
        self.recorder = RunRecorder("coap-bench", config.describe(), reactor.seconds())
        self.verdict: Verdict | None = None
        #: One of ``--processes``: no lines of its own; the parent prints the merged ones (``worker_report``).
        self.worker = self.printer.silent
        self.worker_result: dict[str, Any] | None = None
        self.ended: float | None = None
        self._rate = ProgressRate(reactor.seconds())
        self.done: defer.Deferred[int] = defer.Deferred()
        self._finished_clients = 0
        self._reporter: LoopingCall | None = None
        self._pending: list[Any] = []

    def startService(self) -> None:
        super().startService()
        config = self.config
        _raise_file_limit(config.clients + 64)
        now = self.reactor.seconds()
        self.stats = BenchStatistics(config.clients, now)
        self.recorder = RunRecorder("coap-bench", config.describe(), now)
        self._rate = ProgressRate(now)
        self.printer.start(config.describe())
        for index in range(config.clients):
            link = self.link_factory()
            client = BenchClient(index, self, link)
            if not isinstance(link, TcpLink):  # a TcpLink opens its connection in connect
                client.port = self.reactor.listenUDP(0, link, interface="::" if ":" in config.uri.host else "",
                                                     maxPacketSize=MAX_DATAGRAM)
            self.clients.append(client)
        for client in self.clients:
            client.start()
        if config.report_interval:
            self._pending.append(self.reactor.callLater(min(FIRST_PROGRESS, config.report_interval),
                                                        self._start_reporting))
        if config.duration:
            self._pending.append(self.reactor.callLater(config.duration, self.stopService))

    def _start_reporting(self) -> None:
        self._reporter = LoopingCall(self._report)
        self._reporter.clock = self.reactor
        self._reporter.start(self.config.report_interval, now=True)

    def retransmissions(self) -> int:
        """CON retransmissions of every client so far."""
        return sum(client.endpoint.stats.retransmissions for client in self.clients)

    def loss(self, episode: LossEpisode) -> None:
        """A failed request, resolved (or open at stop)."""
        self.recorder.episode(episode)

    def _sample(self, now: float) -> None:
        interval = self.stats.end_interval()
        p50, p99 = interval.percentile(50), interval.percentile(99)
        self.recorder.sample(now, rtt_p50_ms=None if p50 is None else round(p50 * 1000, 3),
                             rtt_p99_ms=None if p99 is None else round(p99 * 1000, 3),
                             responses=self.stats.responses, failures=self.stats.failures)

    def _report(self) -> None:
        now = self.reactor.seconds()
        self._sample(now)
        self.printer.progress(self.tally(now), self._rate.rate(now, self.stats.responses))

    def client_finished(self) -> None:
        """A client sent its ``--requests``; the run ends with the last one."""
        self._finished_clients += 1
        if self._finished_clients == len(self.clients):
            self.reactor.callLater(0, self.stopService)

    def stopService(self) -> defer.Deferred[Any]:
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        for call in self._pending:
            if call.active():
                call.cancel()
        if self._reporter is not None and self._reporter.running:
            self._reporter.stop()
        status = self._conclude(self.reactor.seconds())
        stopping = []
        for client in self.clients:
            client.active = False
            client.endpoint.stop()
            if isinstance(client.link, TcpLink):
                client.link.release_all("the benchmark is done")
            else:
                stopping.append(defer.maybeDeferred(client.port.stopListening))
        finished = defer.gatherResults(stopping)
        finished.addCallback(lambda _: self.done.callback(status))
        return finished

    def _conclude(self, now: float) -> int:
        """Close open episodes, print the summary and verdict, write the report; the exit status."""
        self.ended = now
        for client in self.clients:
            for episode in client.attribution.open():
                self.recorder.episode(episode)  # still unresolved at stop: unattributed, end None
        self._sample(now)
        tally = self.tally(now)
        thresholds = self.config.thresholds
        started = sum(client.sent for client in self.clients)
        self.verdict = verdict = self.stats.verdict(thresholds, started)
        status = self.stats.exit_status(thresholds, started)
        counters = counters_of(tally)
        rtt = self.stats.rtt.percentiles_ms(PERCENTILES)
        if self.worker:  # the parent judges, prints and reports the whole run
            stats = self.stats
            self.worker_result = {"document": self.recorder.document(now, counters, rtt, thresholds, verdict),
                                  "judged": [max(started, stats.responses + stats.failures), stats.failures,
                                             stats.responses, None]}
            return status
        self.printer.final(tally, verdict)
        if self.config.report:
            try:
                write_report(self.config.report, self.recorder.document(now, counters, rtt, thresholds, verdict))
            except ReportError as error:
                log.error("{reason}", event="report_failed", reason=str(error))
                status = max(status, EXIT_ERROR_RESPONSE)
        return status

    def tally(self, now: float) -> Tally:
        """The run so far (every RTT, the current interval's included), as the lines and a ``--processes``
        parent read it."""
        stats = self.stats
        counts = {"requests": stats.responses, "transmission_errors": stats.failures,
                  "retransmissions": self.retransmissions(),
                  "attribution_invalid": sum(client.attribution.invalid for client in self.clients),
                  **self.recorder.loss_fields()}
        levels = {"clients": len(self.clients), "active": sum(1 for client in self.clients if client.active)}
        return Tally(counts, levels, {"rtt": stats.all_rtts()}, stats.requests_per_client(), stats.started, now)

    def worker_report(self, final: bool) -> dict[str, Any]:
        """A ``--processes`` child's report line: its counters (for the parent's log) and its tally."""
        tally = self.tally(self.ended if self.ended is not None else self.reactor.seconds())
        report: dict[str, Any] = {"summary": counters_of(tally), "tally": tally.to_dict()}
        if final and self.worker_result is not None:
            report["result"] = self.worker_result
        return report


def _raise_file_limit(wanted: int) -> None:
    """One socket per client: lift the soft descriptor limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def bench_config(options: Any) -> BenchConfig:
    """The run parsed :class:`CoapBenchOptions` ask for (a ``--processes`` child's: its share)."""
    return BenchConfig(
        uri=options["uri"], clients=options["clients"], requests=options["requests"], nstart=options["nstart"],
        confirmable=not options["non"], method=options["method"], interval=options["interval"],
        timeout=options["timeout"], payload_random=options["payload-random"],
        report_interval=options["report-interval"], duration=options["duration"],
        thresholds=options.thresholds(), report=options["report"], first_client=options.first_client,
    )


def make_bench_service(reactor: Any, options: Any, stdout: IO[str]) -> CoapBenchService:
    """The role's service from parsed :class:`CoapBenchOptions`; ends the process when done."""
    from nettester.protocols.coap.client import link_for_options

    service = CoapBenchService(reactor, bench_config(options),
                               lambda: link_for_options(reactor, options, one_shot=False),
                               stdout, json_lines=options["log-format"] == "json")
    service.done.addCallback(lambda status: end_process(service, reactor, status))
    return service
