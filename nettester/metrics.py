"""Counters, periodic summary lines and Prometheus exposition.

Counters are plain objects with an integer ``value``: a hot path does
``counter.value += 1`` (no lock, no label lookup). Prometheus reads them only
when scraped, through a custom collector, so exporting costs nothing per packet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from twisted.application.internet import TCPServer
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nettester.logs import ALWAYS, Logger

log = Logger()


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


class MetricSet(Collector):
    """The counters of one role, exported under ``nettester_<prefix>_*``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.replace("-", "_")
        self._metrics: list[Counter | LabeledCounter | Gauge] = []

    def counter(self, name: str, help: str) -> Counter:
        metric = Counter(name, help)
        self._metrics.append(metric)
        return metric

    def labeled_counter(self, name: str, help: str, label: str) -> LabeledCounter:
        metric = LabeledCounter(name, help, label)
        self._metrics.append(metric)
        return metric

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        metric = Gauge(name, help, read)
        self._metrics.append(metric)
        return metric

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        for metric in self._metrics:
            full_name = f"nettester_{self.prefix}_{metric.name}"
            if isinstance(metric, Counter):
                yield CounterMetricFamily(full_name, metric.help, value=metric.value)
            elif isinstance(metric, LabeledCounter):
                family = CounterMetricFamily(full_name, metric.help, labels=[metric.label])
                for label_value, count in sorted(metric.values.items()):
                    family.add_metric([label_value], count)
                yield family
            else:
                yield GaugeMetricFamily(full_name, metric.help, value=metric.read())


def format_summary(fields: Mapping[str, Any]) -> str:
    """``key=value`` pairs separated by spaces, in the mapping's order."""
    return " ".join(f"{key}={value}" for key, value in fields.items())


class SummaryReporter(Service):
    """Logs ``<role> summary: k=v ...`` every interval and ``final summary`` on stop.

    Each field is also a field of the log event, so the JSON line is flat.
    Summaries are info lines shown at every --log-level: they are the result.
    """

    def __init__(
        self,
        clock: IReactorTime,
        role: str,
        summary: Callable[[], Mapping[str, Any]],
        interval: float,
    ) -> None:
        self._role = role
        self._summary = summary
        self._interval = interval
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock

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
    """A Prometheus registry holding exactly these metric sets."""
    registry = CollectorRegistry(auto_describe=False)
    for metric_set in metric_sets:
        registry.register(metric_set)
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


def metrics_site(registry: CollectorRegistry, extra: Mapping[bytes, Resource] | None = None) -> Site:
    """An HTTP site serving ``/metrics`` (and ``extra`` children, e.g. ``/ready``)."""
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    for path, resource in (extra or {}).items():
        root.putChild(path, resource)
    site = Site(root)
    site.noisy = False
    return site


def metrics_http_service(
    port: int,
    registry: CollectorRegistry,
    interface: str = "",
    extra: Mapping[bytes, Resource] | None = None,
) -> TCPServer:
    """A TCP service serving ``metrics_site`` on ``port``."""
    return TCPServer(port, metrics_site(registry, extra), interface=interface)
