"""The counters of the server and of the tester, sans-IO.

They are created from a ``nettester.metrics.MetricSet`` (summaries and
Prometheus) but only need its two factory methods, so the sans-IO cores
stay free of Twisted. A hot path does ``counter.value += 1``.
"""

from __future__ import annotations

from typing import Protocol


class Count(Protocol):
    value: int


class LabeledCount(Protocol):
    def inc(self, label_value: str, amount: int = 1) -> None: ...

    def get(self, label_value: str) -> int: ...

    @property
    def total(self) -> int: ...


class MetricFactory(Protocol):
    """What the counter sets need from a ``nettester.metrics.MetricSet`` (duck-typed: no Twisted here)."""

    def counter(self, name: str, help: str) -> Count: ...

    def labeled_counter(self, name: str, help: str, label: str) -> LabeledCount: ...


class ServerCounters:
    """The server's counters; shared by its UDP and TCP responders."""

    def __init__(self, metrics: MetricFactory) -> None:
        self.requests = metrics.counter("requests", "Binding requests received")
        self.responses = metrics.counter("responses", "Binding success responses sent")
        self.errors = metrics.labeled_counter("errors", "Error responses sent, by error code", "code")
        self.dropped = metrics.labeled_counter("dropped", "Datagrams dropped without an answer, by reason", "reason")
        self.changed = metrics.counter("changed", "Responses sent from another address (RFC 5780)")
        self.attributed = metrics.counter("attributed", "Success responses carrying NETTESTER-RECEIVED")
        self.attribution_invalid = metrics.counter(
            "attribution_invalid", "Malformed NETTESTER-SEQUENCE attributes (answered as if absent)"
        )


class FleetCounters:
    """The tester's counters (see ``nettester.metrics.MetricSet``)."""

    def __init__(self, metrics: MetricFactory) -> None:
        self.requests = metrics.counter("requests", "Binding requests sent, re-sends included")
        self.responses = metrics.counter("responses", "Matching success responses received")
        self.timeouts = metrics.counter("timeouts", "Waits that ended without an answer")
        self.failures = metrics.counter("consecutive_failure_errors", "Times a client hit N consecutive misses")
        self.mapping_changes = metrics.counter("mapping_changes", "Mapped address changes seen on one socket")
        self.unexpected = metrics.counter("unexpected", "Responses matching no outstanding request")
        self.error_responses = metrics.counter("error_responses", "Error responses received")
        self.malformed = metrics.counter("malformed", "Datagrams received that are not a STUN response")
        self.reopens = metrics.counter("reopens", "Sockets reopened (failures or periodic)")
        self.lost = metrics.labeled_counter(
            "lost", "Loss episodes by direction (forward, return, unattributed)", "direction"
        )
        for direction in ("forward", "return", "unattributed"):
            self.lost.inc(direction, 0)  # every direction exported, zeros included
        self.attribution_invalid = metrics.counter(
            "attribution_invalid", "NETTESTER-RECEIVED attributes that were malformed or impossible (ignored)"
        )
