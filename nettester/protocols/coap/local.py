"""The CoAP part of ``nettester local``: the server on 127.0.0.1 and short benches against it, over
UDP (coap) and over TCP (coap+tcp, RFC 8323)."""

from __future__ import annotations

import io
from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from zope.interface import implementer

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.module import Verdict
from nettester.protocols.coap.bench import BenchConfig, CoapBenchService
from nettester.protocols.coap.client import parse_uri
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.coap.tcplink import TcpLink
from nettester.udplink import UdpLink

LOCAL_CLIENTS = 20
LOCAL_TCP_CLIENTS = 4
LOCAL_INTERVAL = 0.1


@implementer(IReportingService)
class _ServerAndBench(Service):
    """Starts the server, then the bench against the extended port it really got."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.server = CoapServerService(reactor, 0, ["127.0.0.1"], benchmark=True, tcp=True)
        self.bench: CoapBenchService | None = None
        self.tcp_bench: CoapBenchService | None = None
        self.bench_output = io.StringIO()
        self.metrics = self.server.metrics

    def startService(self) -> None:
        super().startService()
        self.server.startService()
        if self.server.failed is not None:
            return
        ports = {scheme: p for scheme, _, p, name in self.server.listening if name == "extended"}
        config = BenchConfig(parse_uri(f"coap://127.0.0.1:{ports['coap']}/benchmark?rlen=40"), clients=LOCAL_CLIENTS,
                             interval=LOCAL_INTERVAL, report_interval=0)
        self.bench = CoapBenchService(self._reactor, config, UdpLink, self.bench_output)
        self.bench.startService()
        tcp_config = BenchConfig(parse_uri(f"coap+tcp://127.0.0.1:{ports['coap+tcp']}/benchmark?rlen=40"),
                                 clients=LOCAL_TCP_CLIENTS, interval=LOCAL_INTERVAL, report_interval=0)
        self.tcp_bench = CoapBenchService(self._reactor, tcp_config, lambda: TcpLink(self._reactor),
                                          self.bench_output)
        self.tcp_bench.startService()

    @inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
        super().stopService()
        for bench in (self.bench, self.tcp_bench):
            if bench is not None and bench.running:
                yield maybeDeferred(bench.stopService)
        yield maybeDeferred(self.server.stopService)

    def summary(self) -> dict[str, Any]:
        """The server's counters plus the bench's answers, failures and p99 RTT."""
        fields = dict(self.server.summary())
        if self.bench is not None:
            stats = self.bench.stats
            p99 = stats.percentile(99)  # None: no responses
            fields.update(bench_responses=stats.responses, bench_failures=stats.failures,
                          rtt_p99_ms=None if p99 is None else round(p99 * 1000, 2))
        if self.tcp_bench is not None:
            fields.update(tcp_bench_responses=self.tcp_bench.stats.responses,
                          tcp_bench_failures=self.tcp_bench.stats.failures)
        return fields


@implementer(ILocalScenario)
class CoapLocalScenario:
    """20 bench clients over coap and 4 over coap+tcp, a request every 0.1 s each: every request
    must be answered."""

    name = "coap"

    def __init__(self, reactor: Any) -> None:
        self.service = _ServerAndBench(reactor)

    def verdict(self) -> Verdict:
        service = self.service
        if service.server.failed is not None or service.bench is None:
            return Verdict(False, {"error": service.server.failed or "not started"})
        summary = service.summary()
        passed = (summary["bench_responses"] > 0 and summary["bench_failures"] == 0 and summary["malformed"] == 0
                  and summary["tcp_bench_responses"] > 0 and summary["tcp_bench_failures"] == 0
                  and summary["tcp_refused"] == 0)
        evidence = {key: summary[key] for key in ("bench_responses", "bench_failures", "rtt_p99_ms", "duplicates",
                                                  "tcp_bench_responses", "tcp_bench_failures")}
        return Verdict(passed, evidence)
