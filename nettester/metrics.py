"""Counters, periodic summary lines and Prometheus exposition.

Counters are plain objects with an integer ``value``: a hot path does
``counter.value += 1`` (no lock, no label lookup). Prometheus reads them only
when scraped, through a custom collector, so exporting costs nothing per packet.

The conventions (https://prometheus.io/docs/practices/naming/) are applied
here, once, for every role:

- every count is a counter, exported as ``nettester_<prefix>_<name>_total``;
  counts that a role reads from its endpoints at scrape time are declared in
  ``COUNTS_READ_AT_SCRAPE`` and exported as counters too;
- a labelled counter exports a 0 sample for every documented label value
  (``LABEL_VALUES``) before the first event, so ``rate()`` has a series;
- durations are histograms in seconds, built at scrape time from the delay
  histograms the roles keep (nothing extra per packet);
- the summary line's keys are the metric names without ``nettester_<prefix>_``
  (and a counter's ``_total``);
- every registry also exports the process collector (CPU, memory, open
  descriptors) and ``nettester_build_info{version}``;
- a scrape of ``/metrics`` or a probe of ``/ready`` writes no log line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.application.internet import TCPServer
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import nettester
from nettester.logs import ALWAYS, Logger

log = Logger()

#: Values a role reads at scrape time (``MetricSet.gauge``) that are counts,
#: by ``<prefix>_<name>``: exported as counters (``_total``), not gauges.
COUNTS_READ_AT_SCRAPE = frozenset((
    "coap_server_received",
    "coap_server_duplicates",
    "coap_server_retransmissions",
    "coap_server_malformed",
    "coap_server_dedup_evicted",
    "coap_server_forwarded",
    "nat_violations",
    "stun_server_sessions_evicted",
    "keepalive_local_keepalives",
    "keepalive_local_errors",
))

#: The documented values of each labelled counter, by ``<prefix>_<name>``
#: (``_total`` stripped): each gets a 0 sample from the start. Labels whose
#: values are free text (a DTLS handshake failure's reason) have no entry.
LABEL_VALUES: Mapping[str, tuple[str, ...]] = {
    "keepalive_server_closes": ("closed_by_server", "peer_closed", "peer_reset", "tls_error"),
    "keepalive_client_closes": ("closed_by_client", "peer_closed", "peer_reset", "tls_error"),
    "stun_server_errors": ("400", "420"),
    "stun_server_dropped": ("not_stun", "not_request", "bad_fingerprint", "send_failed"),
    "nat_dropped": ("backward_random", "forward_random", "no_destination", "no_socket", "not_dtls", "send_error",
                    "size_limit", "unknown_entry"),
    "dtls_dropped": (
        "bad_cookie", "bad_mac", "bad_snapshot", "closed", "epoch", "fragment", "malformed", "max_connections",
        "no_cookie", "not_client_hello", "replay", "send_error", "send_not_established", "unauthenticated_alert",
        "unexpected", "unknown_cid", "unknown_peer",
    ),
    "coap_server_tcp_refused": (
        "bad_signal", "csm_not_first", "format", "max_connections", "no_csm", "slowloris", "too_large",
    ),
    "coap_server_router_dropped": ("truncated_cid_record", "unknown_node"),
    "coap_server_management_dropped": (
        "bad_state_record", "ping_on_sibling_worker", "send_error", "stale_state", "state_not_replicating",
        "state_without_secret", "static_cluster_ping",
    ),
}

#: Upper bounds (seconds) of the exported duration histograms: loopback to intercontinental round trips.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class DelayBuckets(Protocol):
    """A role's delay histogram, as the exporter reads it."""

    def buckets(self) -> Iterable[tuple[float, int]]:
        """``(upper bound in seconds, count)`` of every fine bucket, in increasing order."""
        ...


class Counter:
    """A monotonically increasing count."""

    __slots__ = ("name", "help", "value")

    def __init__(self, name: str, help: str) -> None:
        self.name = name
        self.help = help
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LabeledCounter:
    """Counts per label value, e.g. closes per cause or drops per reason."""

    __slots__ = ("name", "help", "label", "values")

    def __init__(self, name: str, help: str, label: str) -> None:
        self.name = name
        self.help = help
        self.label = label
        self.values: dict[str, int] = {}

    def inc(self, label_value: str, amount: int = 1) -> None:
        self.values[label_value] = self.values.get(label_value, 0) + amount

    def get(self, label_value: str) -> int:
        return self.values.get(label_value, 0)

    @property
    def total(self) -> int:
        return sum(self.values.values())


class Gauge:
    """A value read from a callable when exported (live connections, table sizes)."""

    __slots__ = ("name", "help", "read")

    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name = name
        self.help = help
        self.read = read


class Histogram:
    """A duration histogram read from a role's delay histogram when exported."""

    __slots__ = ("name", "help", "read")

    def __init__(self, name: str, help: str, read: Callable[[], DelayBuckets | None]) -> None:
        self.name = name
        self.help = help
        self.read = read


def histogram_family(name: str, help: str, source: DelayBuckets | None,
                     bounds: Sequence[float] = DURATION_BUCKETS) -> HistogramMetricFamily:
    """Fold fine delay buckets into Prometheus buckets: a fine bucket counts under the
    first bound not below its own upper bound, so every ``le`` count is exact or low,
    never high. The sum is left out: the fine buckets do not keep it."""
    cumulative = [0] * (len(bounds) + 1)
    for upper, count in source.buckets() if source is not None else ():
        index = next((i for i, bound in enumerate(bounds) if upper <= bound), len(bounds))
        cumulative[index] += count
    running = 0
    samples: list[tuple[str, float]] = []
    for bound, count in zip([*map(float, bounds), float("inf")], cumulative, strict=True):
        running += count
        samples.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, help, buckets=samples)


class MetricSet(Collector):
    """The counters of one role, exported under ``nettester_<prefix>_*``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.replace("-", "_")
        self._metrics: list[Counter | LabeledCounter | Gauge | Histogram] = []

    def counter(self, name: str, help: str) -> Counter:
        metric = Counter(name, help)
        self._metrics.append(metric)
        return metric

    def labeled_counter(self, name: str, help: str, label: str) -> LabeledCounter:
        metric = LabeledCounter(name, help, label)
        self._metrics.append(metric)
        return metric

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        """A value read when scraped; a count (``COUNTS_READ_AT_SCRAPE``) is exported as a counter."""
        metric = Gauge(name, help, read)
        self._metrics.append(metric)
        return metric

    def histogram(self, name: str, help: str, read: Callable[[], DelayBuckets | None]) -> Histogram:
        """A duration histogram (``name`` ends in ``_seconds``) folded from ``read()`` when scraped."""
        metric = Histogram(name, help, read)
        self._metrics.append(metric)
        return metric

    def collect(self) -> Iterable[Metric]:
        for metric in self._metrics:
            full_name = f"nettester_{self.prefix}_{metric.name}"
            key = f"{self.prefix}_{metric.name.removesuffix('_total')}"
            if isinstance(metric, Counter):
                yield CounterMetricFamily(full_name, metric.help, value=metric.value)
            elif isinstance(metric, LabeledCounter):
                family = CounterMetricFamily(full_name, metric.help, labels=[metric.label])
                values = dict.fromkeys(LABEL_VALUES.get(key, ()), 0)
                values.update(metric.values)
                for label_value, count in sorted(values.items()):
                    family.add_metric([label_value], count)
                yield family
            elif isinstance(metric, Histogram):
                yield histogram_family(full_name, metric.help, metric.read())
            elif key in COUNTS_READ_AT_SCRAPE:
                yield CounterMetricFamily(full_name, metric.help, value=metric.read())
            else:
                yield GaugeMetricFamily(full_name, metric.help, value=metric.read())


class BuildInfo(Collector):
    """``nettester_build_info{version="..."} 1``."""

    def collect(self) -> Iterable[Metric]:
        yield InfoMetricFamily("nettester_build", "The running nettester's version.",
                               value={"version": nettester.__version__})


def format_summary(fields: Mapping[str, Any]) -> str:
    """``key=value`` pairs separated by spaces, in the mapping's order."""
    return " ".join(f"{key}={value}" for key, value in fields.items())


class SummaryReporter(Service):
    """Logs ``<role> summary: k=v ...`` every interval and ``final summary`` on stop.

    Each field is also a field of the log event, so the JSON line is flat.
    Summaries are info lines shown at every --log-level: they are the result.
    With ``refresh`` (``IReportingService.refresh_summary``), a periodic line
    waits for it, so it shows counts taken now; none is printed when it says
    False (the run is over: the final summary follows).
    """

    def __init__(
        self,
        clock: IReactorTime,
        role: str,
        summary: Callable[[], Mapping[str, Any]],
        interval: float,
        refresh: Callable[[], Deferred[bool]] | None = None,
    ) -> None:
        self._role = role
        self._summary = summary
        self._interval = interval
        self._refresh = refresh
        self._loop = LoopingCall(self._periodic)
        self._loop.clock = clock

    def _periodic(self) -> None:
        if self._refresh is None:
            self.report()
            return
        self._refresh().addCallback(lambda fresh: self.report() if fresh and self.running else None)

    def report(self, final: bool = False) -> None:
        fields = dict(self._summary())
        label = "final summary" if final else "summary"
        log.info(
            "{role} {label}: {text}",
            event="final_summary" if final else "summary",
            role=self._role,
            label=label,
            text=format_summary(fields),
            **{ALWAYS: True},
            **{key: value for key, value in fields.items() if key not in ("role", "label", "text", "event")},
        )

    def startService(self) -> None:
        super().startService()
        if self._interval > 0:
            self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self.report(final=True)


def new_registry(*metric_sets: MetricSet) -> CollectorRegistry:
    """A Prometheus registry holding these metric sets, the process collector and the build info."""
    registry = CollectorRegistry(auto_describe=False)
    for metric_set in metric_sets:
        registry.register(metric_set)
    ProcessCollector(registry=registry)
    registry.register(BuildInfo())
    return registry


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text exposition of a registry."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


class ReadyResource(Resource):
    """``GET /ready``: 200 while ``is_ready()``, else 503; for Kubernetes readiness probes."""

    isLeaf = True

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        super().__init__()
        self._is_ready = is_ready

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self._is_ready():
            return b"ready\n"
        request.setResponseCode(503)
        return b"not ready\n"


class QuietSite(Site):
    """A Site that writes no access-log line: a scrape or probe every few seconds is not news."""

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


def metrics_site(
    registry: CollectorRegistry,
    extra: Mapping[bytes, Resource] | None = None,
    is_ready: Callable[[], bool] | None = None,
) -> Site:
    """An HTTP site serving ``/metrics``, ``/ready`` when ``is_ready`` is given, and ``extra`` children."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    if is_ready is not None:
        root.putChild(b"ready", ReadyResource(is_ready))
    for path, resource in (extra or {}).items():
        root.putChild(path, resource)
    return QuietSite(root)


def metrics_http_service(
    port: int,
    registry: CollectorRegistry,
    interface: str = "",
    extra: Mapping[bytes, Resource] | None = None,
    is_ready: Callable[[], bool] | None = None,
) -> TCPServer:
    """A TCP service serving ``metrics_site`` on ``port``."""
    return TCPServer(port, metrics_site(registry, extra, is_ready), interface=interface)
