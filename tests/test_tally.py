"""Tally: what a load-generator process counted, merged across ``--processes`` as if one process had run."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.histogram import SUB_BUCKETS, RttHistogram
from nettester.tally import Tally


def histogram_of(samples: list[float]) -> RttHistogram:
    histogram = RttHistogram()
    for value in samples:
        histogram.record(value)
    return histogram


def test_a_tally_goes_through_a_report_line_unchanged() -> None:
    tally = Tally({"requests": 7}, {"clients": 2}, {"rtt": histogram_of([0.001, 0.004])}, {3: 2}, 100.0, 103.5)
    again = Tally.from_dict(json.loads(json.dumps(tally.to_dict())))
    assert (again.counts, again.levels, again.per_client, again.started, again.at) == (
        {"requests": 7}, {"clients": 2}, {3: 2}, 100.0, 103.5)
    assert again.histogram("rtt").to_dict() == tally.histogram("rtt").to_dict()
    assert again.histogram("absent").count == 0 and again.count("absent") == 0 and again.level("absent") == 0


@pytest.mark.parametrize("broken", [
    {},
    {"counts": {"requests": 1.5}, "levels": {}, "histograms": {}, "per_client": {}, "started": 0, "at": 0},
    {"counts": {"requests": True}, "levels": {}, "histograms": {}, "per_client": {}, "started": 0, "at": 0},
    {"counts": [], "levels": {}, "histograms": {}, "per_client": {}, "started": 0, "at": 0},
    {"counts": {}, "levels": {}, "histograms": {"rtt": {"counts": {}}}, "per_client": {}, "started": 0, "at": 0},
    {"counts": {}, "levels": {}, "histograms": {}, "per_client": {"x": 1}, "started": 0, "at": 0},
    {"counts": {}, "levels": {}, "histograms": {}, "per_client": {}, "started": "soon", "at": 0},
])
def test_what_is_not_a_tally_is_refused_by_name(broken: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a tally: "):
        Tally.from_dict(broken)


def test_counts_add_over_every_process_levels_over_the_newest_of_each() -> None:
    dead = Tally({"requests": 5}, {"clients": 2, "open": 2}, {"rtt": histogram_of([0.001])}, {5: 2}, 100.0, 104.0)
    again = Tally({"requests": 1}, {"clients": 2, "open": 1}, {"rtt": histogram_of([0.002])}, {1: 2}, 105.0, 106.0)
    other = Tally({"requests": 3, "timeouts": 1}, {"clients": 2, "open": 2}, {}, {4: 2}, 101.0, 106.5)
    merged = Tally.merge([dead, again, other], [again, other])
    assert merged.counts == {"requests": 9, "timeouts": 1}
    assert merged.levels == {"clients": 4, "open": 3}  # the dead process's two clients run again: counted once
    assert merged.histogram("rtt").count == 2 and merged.per_client == {1: 2, 4: 2, 5: 2}
    assert (merged.started, merged.at) == (100.0, 106.5)
    assert Tally.merge([], []) == Tally()


def _exact_nearest_rank(samples: list[float], percent: float) -> float:
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(percent / 100 * len(ordered))) - 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(min_value=0.0, max_value=30.0), min_size=0, max_size=80), min_size=1, max_size=4))
def test_merged_percentiles_are_those_of_the_union_of_samples(parts: list[list[float]]) -> None:
    tallies = [Tally(histograms={"rtt": histogram_of(samples)}) for samples in parts]
    merged = Tally.merge(tallies, tallies).histogram("rtt")
    union = [value for samples in parts for value in samples]
    assert merged.count == len(union)
    if not union:
        return
    for percent in (50.0, 90.0, 99.0, 99.9, 100.0):
        got, exact = merged.percentile(percent), _exact_nearest_rank(union, percent)
        # the histogram's resolution: 1/32 of the value, and values are counted in whole microseconds
        assert got == pytest.approx(exact, rel=1 / SUB_BUCKETS, abs=2e-6), percent
    # and exactly the histogram one process recording every sample would hold
    assert merged.counts == histogram_of(union).counts
    assert merged.field("rtt_max_ms") == round(max(union) * 1000, 3)
    assert merged.field("rtt_avg_ms") == pytest.approx(round(sum(union) / len(union) * 1000, 3), abs=1e-3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=50), max_size=20), min_size=1, max_size=4))
def test_requests_per_client_add_up_to_the_union_of_the_clients(parts: list[list[int]]) -> None:
    """Each process's clients with the requests each completed: merged, Californium's histogram of all."""
    def per_client(clients: list[int]) -> dict[int, int]:
        histogram: dict[int, int] = {}
        for requests in clients:
            histogram[requests] = histogram.get(requests, 0) + 1
        return dict(sorted(histogram.items()))

    tallies = [Tally(per_client=per_client(clients)) for clients in parts]
    assert Tally.merge(tallies, tallies).per_client == per_client([value for clients in parts for value in clients])
