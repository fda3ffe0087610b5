"""What a load-generator process has counted, in a form that merges across ``--processes``.

A load generator's result lines (progress, summary, final summary) are pure
functions of its :class:`Tally`. The parent of ``--processes N`` applies the
same functions to the children's tallies merged, so a merged line is the line
one process would have printed had it run every client itself: counts add
up, RTT percentiles come from the summed histograms (never from averaged
percentiles), Californium's requests-per-client histogram adds up bucket by
bucket.

Twisted-free and clock-free: times go in as plain floats.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nettester.histogram import RttHistogram


@dataclass
class Tally:
    """One process's counters, levels and histograms (or several processes' merged).

    ``counts`` are running totals (requests sent, losses): merged, they add
    up over every process that ran, ended ones included, so they stay
    monotonic. ``levels`` say how things stand now (clients started,
    connections open): merged, they add up over the newest process of each
    slot only, so a process started again after it died is not counted
    twice. ``per_client`` maps completed requests to how many clients
    completed that many. ``started`` and ``at`` are when the run began and
    when the tally was taken (epoch seconds; merged: the earliest start and
    the latest tally).
    """

    counts: dict[str, int] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, RttHistogram] = field(default_factory=dict)
    per_client: dict[int, int] = field(default_factory=dict)
    started: float = 0.0
    at: float = 0.0

    def count(self, name: str) -> int:
        """The running total ``name``, 0 when never counted."""
        return self.counts.get(name, 0)

    def level(self, name: str) -> int:
        """The level ``name``, 0 when never reported."""
        return self.levels.get(name, 0)

    def histogram(self, name: str) -> RttHistogram:
        """The histogram ``name``, an empty one when none was kept."""
        return self.histograms.get(name) or RttHistogram()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (a child's report line to its parent)."""
        return {"counts": dict(self.counts), "levels": dict(self.levels),
                "histograms": {name: histogram.to_dict() for name, histogram in self.histograms.items()},
                "per_client": {str(requests): clients for requests, clients in self.per_client.items()},
                "started": self.started, "at": self.at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tally:
        """The inverse of :meth:`to_dict`; ValueError naming what is wrong when ``data`` is not one."""
        try:
            counts = {str(name): _whole(value) for name, value in data["counts"].items()}
            levels = {str(name): _whole(value) for name, value in data["levels"].items()}
            histograms = {str(name): RttHistogram.from_dict(value) for name, value in data["histograms"].items()}
            per_client = {int(requests): _whole(clients) for requests, clients in data["per_client"].items()}
            started, at = float(data["started"]), float(data["at"])
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"not a tally: {error!r}") from None
        return cls(counts, levels, histograms, per_client, started, at)

    @classmethod
    def merge(cls, ran: Iterable[Tally], current: Iterable[Tally]) -> Tally:
        """The tally of a whole run.

        ``ran``: the last tally of every process that ran, ended ones
        included (counts, histograms and requests per client add up over
        them); ``current``: the last tally of the newest process of each
        slot (levels add up over them). Names keep the order they first
        appear in.
        """
        merged = cls()
        per_client: Counter[int] = Counter()
        starts: list[float] = []
        for part in ran:
            for name, value in part.counts.items():
                merged.counts[name] = merged.counts.get(name, 0) + value
            for name, histogram in part.histograms.items():
                merged.histograms.setdefault(name, RttHistogram()).merge(histogram)
            per_client.update(part.per_client)
            starts.append(part.started)
            merged.at = max(merged.at, part.at)
        for part in current:
            for name, value in part.levels.items():
                merged.levels[name] = merged.levels.get(name, 0) + value
        merged.per_client = dict(sorted(per_client.items()))
        merged.started = min(starts, default=0.0)
        return merged


def _whole(value: Any) -> int:
    """A count from a report line: a whole number, not a bool or a float."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected a whole number, got {value!r}")
    return value
