"""The ``coap-bench`` role: Californium's BenchmarkClient semantics, so results compare.

Each client has its own socket (its own source port) and runs a closed
loop: one request, wait for its response, the next one after ``interval``;
a failed request (timeout, reset, failed DTLS handshake) is a transmission
error and counts as one of the client's requests, the next one goes after
one second, so a run against a dead server ends too. Every
``report_interval`` a progress line, at the end a summary with the overall
rate, RTT percentiles and the histogram of requests per client.
"""

from __future__ import annotations

import math
import random
import resource
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from nettester.interfaces import IDatagramLink
from nettester.logs import Logger
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
from nettester.protocols.coap.endpoint import CoapEndpoint, CoapRequestError
from nettester.protocols.coap.layer import ResponseReceived, TransmissionParameters

log = Logger()

RETRY_DELAY = 1.0
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


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


class BenchStatistics:
    """Counts and RTTs of a run: pure bookkeeping, fed with times from outside."""

    def __init__(self, clients: int, started: float) -> None:
        self.started = started
        self.responses = 0
        self.failures = 0
        self.per_client = [0] * clients
        self.rtts = array("d")
        self._last_time = started
        self._last_responses = 0

    def record_response(self, client: int, rtt: float | None) -> None:
        """One answered request of ``client`` (RTT None: not measured)."""
        self.responses += 1
        self.per_client[client] += 1
        if rtt is not None:
            self.rtts.append(rtt)

    def record_failure(self) -> None:
        """One request that ended without an answer (it is retried)."""
        self.failures += 1

    def progress_line(self, now: float, retransmissions: int, active_clients: int) -> str:
        """``N requests (R reqs/s, X retransmissions (p%), Y transmission errors (q%), C clients)``."""
        elapsed = now - self._last_time
        rate = (self.responses - self._last_responses) / elapsed if elapsed > 0 else 0.0
        self._last_time, self._last_responses = now, self.responses
        sent = max(self.responses + self.failures, 1)
        return (f"{self.responses} requests ({rate:.0f} reqs/s, {retransmissions} retransmissions "
                f"({retransmissions * 100 / sent:.2f}%), {self.failures} transmission errors "
                f"({self.failures * 100 / sent:.2f}%), {active_clients} clients)")

    def percentile(self, percent: float) -> float:
        """The RTT at ``percent`` (nearest rank), seconds; 0 without samples."""
        if not self.rtts:
            return 0.0
        ordered = sorted(self.rtts)
        rank = math.ceil(percent / 100 * len(ordered))
        return ordered[max(0, min(len(ordered), rank) - 1)]

    def summary_lines(self, now: float, retransmissions: int) -> list[str]:
        """The final summary: overall rate, RTT percentiles, requests-per-client histogram."""
        elapsed = max(now - self.started, 1e-9)
        lines = [
            f"{self.responses} requests in {elapsed:.1f} s: {self.responses / elapsed:.0f} reqs/s, "
            f"{retransmissions} retransmissions, {self.failures} transmission errors, "
            f"{len(self.per_client)} clients",
            "RTT ms: " + ", ".join(f"p{p:g}={self.percentile(p) * 1000:.2f}" for p in PERCENTILES)
            + (f", max={max(self.rtts) * 1000:.2f}" if self.rtts else ""),
            "requests per client (requests: clients):",
        ]
        histogram = Counter(self.per_client)
        lines += [f"  {count}: {clients}" for count, clients in sorted(histogram.items())]
        return lines

    def exit_status(self) -> int:
        """0 every request answered, 1 some failed, 3 none answered (see ``coap-bench --help``)."""
        if not self.responses:
            return EXIT_NO_RESPONSE
        return EXIT_ERROR_RESPONSE if self.failures else EXIT_SUCCESS


class BenchClient:
    """One closed-loop client: its own link and endpoint."""

    def __init__(self, index: int, bench: CoapBenchService, link: IDatagramLink) -> None:
        self.index = index
        self.bench = bench
        self.link = link
        self.endpoint = CoapEndpoint(link, bench.reactor, params=bench.params, rng=random.Random(bench.rng.random()))
        self.peer: Any = None
        self.sent = 0
        self.active = True
        self.port: Any = None

    def start(self) -> None:
        """Connect (DTLS handshake for coaps), then start the closed loop."""
        connecting = self.link.connect(self.bench.config.uri.address)
        connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, peer: Any) -> None:
        self.peer = peer
        for _ in range(self.bench.config.nstart):
            self._send()

    def _connect_failed(self, failure: Any) -> None:
        """A failed handshake (or resolution) is a failed request too: counted, retried after 1 s."""
        if not self.active or not self.bench.running:
            return
        log.warn("client {client}: connecting to {server} failed: {reason}; retry in 1 s",
                 event="coap_bench_connect_failure", client=self.index,
                 server=server_text(self.bench.config.uri.address), reason=failure.getErrorMessage())
        self.bench.stats.record_failure()
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
        sending = self.endpoint.request(self.peer, request, timeout=config.timeout)
        sending.addCallbacks(self._answered, self._failed)

    def _answered(self, event: ResponseReceived) -> None:
        self.bench.stats.record_response(self.index, event.rtt)
        self._next(self.bench.config.interval)

    def _failed(self, failure: Any) -> None:
        failure.trap(CoapRequestError)
        outgoing = failure.value.request
        # MID and token find the exchange in a capture (coap.mid == N, coap.token == X).
        log.warn("client {client}: request to {peer} failed: {reason} (MID {mid}, token {token}); retry in 1 s",
                 event="coap_bench_failure", client=self.index, peer=outgoing.peer, reason=failure.value.reason,
                 mid=outgoing.mid, token=outgoing.token.hex())
        self.bench.stats.record_failure()
        self._next(RETRY_DELAY)

    def _next(self, delay: float) -> None:
        if delay > 0:
            self.bench.reactor.callLater(delay, self._send)
        else:
            self._send()


class CoapBenchService(Service):
    """Starts the clients, prints progress lines and a final summary."""

    def __init__(self, reactor: Any, config: BenchConfig, link_factory: Any, stdout: IO[str],
                 rng: random.Random | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.link_factory = link_factory
        self.stdout = stdout
        self.rng = rng or random.Random()
        self.params = TransmissionParameters(nstart=config.nstart)
        self.clients: list[BenchClient] = []
        self.stats = BenchStatistics(config.clients, reactor.seconds())
        self.done: defer.Deferred[int] = defer.Deferred()
        self._finished_clients = 0
        self._reporter: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        _raise_file_limit(self.config.clients + 64)
        self.stats = BenchStatistics(self.config.clients, self.reactor.seconds())
        for index in range(self.config.clients):
            link = self.link_factory()
            client = BenchClient(index, self, link)
            client.port = self.reactor.listenUDP(0, link, interface="::" if ":" in self.config.uri.host else "",
                                                 maxPacketSize=MAX_DATAGRAM)
            self.clients.append(client)
        for client in self.clients:
            client.start()
        if self.config.report_interval:
            self._reporter = LoopingCall(self._report)
            self._reporter.clock = self.reactor
            self._reporter.start(self.config.report_interval, now=False)

    def retransmissions(self) -> int:
        """CON retransmissions of every client so far."""
        return sum(client.endpoint.stats.retransmissions for client in self.clients)

    def _report(self) -> None:
        active = sum(1 for client in self.clients if client.active)
        self._print(self.stats.progress_line(self.reactor.seconds(), self.retransmissions(), active))

    def client_finished(self) -> None:
        """A client sent its ``--requests``; the run ends with the last one."""
        self._finished_clients += 1
        if self._finished_clients == len(self.clients):
            self.reactor.callLater(0, self.stopService)

    def stopService(self) -> defer.Deferred[Any]:
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        if self._reporter is not None and self._reporter.running:
            self._reporter.stop()
        for line in self.stats.summary_lines(self.reactor.seconds(), self.retransmissions()):
            self._print(line)
        stopping = []
        for client in self.clients:
            client.active = False
            client.endpoint.stop()
            stopping.append(defer.maybeDeferred(client.port.stopListening))
        finished = defer.gatherResults(stopping)
        finished.addCallback(lambda _: self.done.callback(self.stats.exit_status()))
        return finished

    def _print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()


def _raise_file_limit(wanted: int) -> None:
    """One socket per client: lift the soft descriptor limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def make_bench_service(reactor: Any, options: Any, stdout: IO[str]) -> CoapBenchService:
    """The role's service from parsed :class:`CoapBenchOptions`; ends the process when done."""
    from nettester.protocols.coap.client import make_link

    uri = options["uri"]
    config = BenchConfig(
        uri=uri, clients=options["clients"], requests=options["requests"], nstart=options["nstart"],
        confirmable=not options["non"], method=options["method"], interval=options["interval"],
        timeout=options["timeout"], payload_random=options["payload-random"],
        report_interval=options["report-interval"],
    )
    service = CoapBenchService(reactor, config, lambda: make_link(reactor, uri, options["dtls"], one_shot=False), stdout)
    service.done.addCallback(lambda status: end_process(service, reactor, status))
    return service
