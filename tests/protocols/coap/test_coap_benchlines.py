"""coap-bench's lines of a --processes run: those one process running every client would print."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.histogram import RttHistogram
from nettester.protocols.coap.bench import BenchConfig
from nettester.protocols.coap.benchlines import BenchPrinter, BenchProcessesRun, ProgressRate
from nettester.protocols.coap.client import parse_uri
from nettester.report import LOSS_KEYS, Verdict
from nettester.tally import Tally

COUNTED = ("requests", "transmission_errors", "retransmissions", "attribution_invalid", *LOSS_KEYS.values())
rtts = st.lists(st.integers(min_value=0, max_value=2_000_000).map(lambda micros: micros / 1e6), max_size=30)
processes = st.lists(st.tuples(st.dictionaries(st.sampled_from(COUNTED), st.integers(0, 100_000)),
                               st.integers(1, 200), rtts, st.dictionaries(st.integers(0, 99), st.integers(1, 9)),
                               st.floats(1000.0, 1001.0), st.floats(1010.0, 1020.0)),
                     min_size=1, max_size=4)


def tally(counts: dict[str, int], clients: int, samples: list[float], per_client: dict[int, int], started: float,
          at: float) -> Tally:
    histogram = RttHistogram()
    for value in samples:
        histogram.record(value)
    return Tally(counts, {"clients": clients}, {"rtt": histogram}, dict(sorted(per_client.items())), started, at)


def printed(run: Any) -> str:
    out = io.StringIO()
    run(BenchPrinter(out, json_lines=False))
    return out.getvalue()


@pytest.fixture(autouse=True)
def alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettester.workers import WORKER_ENV

    monkeypatch.delenv(WORKER_ENV, raising=False)  # the printers print: this process is a parent or alone


@settings(max_examples=80, deadline=None)
@given(processes)
def test_the_final_lines_are_those_of_the_union(parts: list[tuple[Any, ...]]) -> None:
    tallies = [tally(*part) for part in parts]
    per_client: dict[int, int] = {}
    for part in parts:
        for requests, clients in part[3].items():
            per_client[requests] = per_client.get(requests, 0) + clients
    union = tally({name: sum(part[0].get(name, 0) for part in parts) for name in COUNTED},
                  sum(part[1] for part in parts), [value for part in parts for value in part[2]], per_client,
                  min(part[4] for part in parts), max(part[5] for part in parts))
    verdict = Verdict(True)
    merged = Tally.merge(tallies, tallies)
    assert printed(lambda printer: printer.final(merged, verdict)) == printed(
        lambda printer: printer.final(union, verdict))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)), min_size=1, max_size=4),
       st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_a_progress_line_sums_the_counts_and_rates_of_the_same_interval(growth: list[tuple[int, int]],
                                                                        interval: float) -> None:
    """Each process answered ``first`` requests by t0, ``first + more`` by t1: the merged line's rate is the sum
    of the processes' rates over t0..t1 (intervals in powers of two: the rates are exact)."""
    out = io.StringIO()
    run = BenchProcessesRun({}, None, interval, BenchPrinter(out, json_lines=False))

    def merged(at: float, index: int) -> Tally:
        parts = [Tally({"requests": first + (more if index else 0)}, {"active": 1}, started=1000.0, at=at)
                 for first, more in growth]
        return Tally.merge(parts, parts)

    run.progress(merged(1001.0, 0), 1001.0)
    run.progress(merged(1001.0 + interval, 1), 1001.0 + interval)
    rates = []
    for first, more in growth:
        rate = ProgressRate(1000.0)
        rate.rate(1001.0, first)
        rates.append(rate.rate(1001.0 + interval, first + more))
    line = out.getvalue().splitlines()[1]
    total = sum(first + more for first, more in growth)
    assert line.startswith(f"{total} requests ({sum(rates):.0f} reqs/s, ") and f", {len(growth)} clients)" in line


def test_the_start_line_describes_the_whole_run_and_names_the_processes() -> None:
    described = BenchConfig(parse_uri("coap://127.0.0.1:5783/benchmark"), clients=2000, duration=30.0).describe()
    run = BenchProcessesRun(described, None, 10.0, BenchPrinter(io.StringIO(), json_lines=False))
    assert (run.first_progress, run.progress_interval, run.summary_lines) == (1.0, 10.0, False)
    assert printed(lambda printer: BenchProcessesRun(described, None, 10.0, printer).start(2)) == (
        "coap-bench: 2000 clients to 127.0.0.1:5783 (coap, CON GET /benchmark, for 30 s), 2 processes\n")


def test_nothing_answered_by_any_process_exits_3_as_one_process_would() -> None:
    run = BenchProcessesRun({}, None, 0.0, BenchPrinter(io.StringIO(), json_lines=False))
    failed = Verdict(False, ("loss",))
    assert run.exit_status(Tally({"transmission_errors": 4}), failed, [3, 3]) == 3
    assert run.exit_status(Tally({"requests": 1, "transmission_errors": 3}), failed, [1, 3]) == 1
    assert run.exit_status(Tally({"requests": 4}), Verdict(True), [0, 0]) == 0
    assert re.fullmatch(r"0 requests in \d+\.\d s: .*", printed(
        lambda printer: printer.final(Tally({"transmission_errors": 4}, {"clients": 2}), failed)).splitlines()[0])
