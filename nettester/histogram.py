"""A bounded log-linear RTT histogram that merges across processes.

Values are kept in microseconds. Below ``2 * SUB_BUCKETS`` microseconds
every value has its own bucket; above, each power of two is split into
``SUB_BUCKETS`` equal buckets, so a percentile is off by at most
``1 / SUB_BUCKETS`` (about 3 %) whatever the range, and a histogram of any
number of samples holds at most a few hundred counts (the HdrHistogram
idea, sized for RTTs from 1 us to hours). Merging two histograms adds their
counts, so merged percentiles are exact histogram percentiles, not averages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping

SUB_BUCKET_BITS = 5
SUB_BUCKETS = 1 << SUB_BUCKET_BITS

#: Summary fields an RTT histogram computes: ``rtt_p50_ms``, ``rtt_p99.9_ms``, ``rtt_avg_ms``, ``rtt_min_ms``...
RTT_FIELD = re.compile(r"^rtt_(?:p(?P<percent>\d+(?:\.\d+)?)|(?P<statistic>avg|min|max))_ms$")


def _index(micros: int) -> int:
    if micros < 2 * SUB_BUCKETS:
        return micros
    shift = micros.bit_length() - (SUB_BUCKET_BITS + 1)
    return SUB_BUCKETS * shift + (micros >> shift)


def _bounds(index: int) -> tuple[int, int]:
    """The lowest and highest microsecond value counted in bucket ``index``."""
    if index < 2 * SUB_BUCKETS:
        return index, index
    shift = index // SUB_BUCKETS - 1
    top = index - SUB_BUCKETS * shift
    return top << shift, ((top + 1) << shift) - 1


class RttHistogram:
    """Counts of RTTs (seconds in, seconds out); percentiles by nearest rank."""

    __slots__ = ("count", "counts", "maximum", "minimum", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.minimum = math.inf
        self.maximum = 0.0

    def record(self, seconds: float) -> None:
        """One RTT; negative values (a clock step) count as 0."""
        seconds = max(seconds, 0.0)
        index = _index(int(seconds * 1_000_000))
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        self.minimum = min(self.minimum, seconds)
        self.maximum = max(self.maximum, seconds)

    def merge(self, other: RttHistogram) -> None:
        """Add ``other``'s samples to this histogram."""
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.count += other.count
        self.total += other.total
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    def percentile(self, percent: float) -> float | None:
        """The RTT at ``percent`` (nearest rank) in seconds, None without samples.

        The bucket's midpoint, clamped to the smallest and largest RTT seen,
        so p0 and p100 are exact.
        """
        if not self.count:
            return None
        rank = max(1, math.ceil(percent / 100 * self.count))
        if rank >= self.count:
            return self.maximum
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                low, high = _bounds(index)
                middle = (low + high) / 2 / 1_000_000
                return min(max(middle, self.minimum), self.maximum)
        return self.maximum  # not reached: the counts add up to ``count``

    def percentiles_ms(self, percents: Iterable[float]) -> dict[str, float] | None:
        """``{"p50": ms, ..., "max": ms, "samples": n}`` rounded to 0.01 ms, None without samples."""
        if not self.count:
            return None
        result: dict[str, float] = {}
        for percent in percents:
            value = self.percentile(percent)
            assert value is not None
            result[f"p{percent:g}"] = round(value * 1000, 2)
        result["max"] = round(self.maximum * 1000, 2)
        result["samples"] = self.count
        return result

    def buckets(self) -> Iterator[tuple[float, int]]:
        """``(upper bound in seconds, count)`` of every bucket used, increasing (``DelayBuckets``, for /metrics)."""
        for index in sorted(self.counts):
            yield (_bounds(index)[1] + 1) / 1_000_000, self.counts[index]

    def field(self, name: str) -> float | None:
        """The summary field ``name`` (see :data:`RTT_FIELD`) in ms rounded to 0.001, None without samples.

        :raises KeyError: when ``name`` is not an RTT field.
        """
        match = RTT_FIELD.match(name)
        if match is None:
            raise KeyError(name)
        if not self.count:
            return None
        statistic = match["statistic"]
        if statistic is None:
            seconds = self.percentile(float(match["percent"]))
        else:
            seconds = {"avg": self.total / self.count, "min": self.minimum, "max": self.maximum}[statistic]
        assert seconds is not None
        return round(seconds * 1000, 3)

    def line(self, percents: Iterable[float]) -> str:
        """``RTT ms: p50=..., ..., max=...``, or ``RTT ms: no responses``."""
        percentiles = self.percentiles_ms(percents)
        if percentiles is None:
            return "RTT ms: no responses"
        return "RTT ms: " + ", ".join(f"{name}={value:.2f}" for name, value in percentiles.items()
                                      if name != "samples")

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form (for merging the histograms of ``--processes`` workers)."""
        return {"counts": {str(index): count for index, count in self.counts.items()}, "count": self.count,
                "total": self.total, "min": self.minimum if self.count else None, "max": self.maximum}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> RttHistogram:
        """The inverse of :meth:`to_dict`; ValueError when ``data`` is not one."""
        histogram = cls()
        try:
            counts = data["counts"]
            if not isinstance(counts, Mapping):
                raise TypeError("counts is not a mapping")
            histogram.counts = {int(index): int(count) for index, count in counts.items()}
            histogram.count = int(data["count"])  # type: ignore[call-overload]
            histogram.total = float(data["total"])  # type: ignore[arg-type]
            minimum = data["min"]
            histogram.minimum = math.inf if minimum is None else float(minimum)  # type: ignore[arg-type]
            histogram.maximum = float(data["max"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not an RTT histogram: {error}") from None
        if any(count < 0 for count in histogram.counts.values()) or sum(histogram.counts.values()) != histogram.count:
            raise ValueError("not an RTT histogram: the counts do not add up")
        return histogram


def requests_per_client_lines(counts: Mapping[int, int]) -> list[str]:
    """Californium's BenchmarkClient histogram: ``requests per client (requests: clients):``, then ``  N: C``."""
    return ["requests per client (requests: clients):",
            *(f"  {requests}: {clients}" for requests, clients in sorted(counts.items()))]
