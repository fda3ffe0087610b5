"""stun-client's run lines: the summary of merged tallies is the summary one process would print."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.histogram import RttHistogram
from nettester.protocols.stun.runlines import SHOWN_COUNTS, StunProcessesRun, start_line, summary_of
from nettester.report import Verdict
from nettester.tally import Tally
from tests.logcapture import log_events

COUNTED = ("requests", "responses", "error_responses", "open_at_stop", *SHOWN_COUNTS)
# RTTs and timer lags in whole microseconds, as the histogram counts them.
delays = st.lists(st.integers(min_value=0, max_value=5_000_000).map(lambda micros: micros / 1e6), max_size=30)
processes = st.lists(st.tuples(st.dictionaries(st.sampled_from(COUNTED), st.integers(0, 10_000)),
                               st.integers(0, 1000), delays, delays), min_size=1, max_size=4)


def histogram_of(samples: list[float]) -> RttHistogram:
    histogram = RttHistogram()
    for value in samples:
        histogram.record(value)
    return histogram


def tally(counts: dict[str, int], clients: int, rtts: list[float], lags: list[float]) -> Tally:
    return Tally(counts, {"clients": clients}, {"rtt": histogram_of(rtts), "timer_lag": histogram_of(lags)})


@settings(max_examples=80, deadline=None)
@given(processes)
def test_the_merged_summary_is_the_summary_of_the_union(parts: list[tuple[dict[str, int], int, Any, Any]]) -> None:
    tallies = [tally(*part) for part in parts]
    union_counts = {name: sum(counts.get(name, 0) for counts, *_ in parts) for name in COUNTED}
    union = tally(union_counts, sum(clients for _, clients, _, _ in parts),
                  [value for *_, rtts, _ in parts for value in rtts], [value for *_, lags in parts for value in lags])
    assert summary_of(Tally.merge(tallies, tallies)) == summary_of(union)


def test_loss_comes_from_the_summed_counts_not_the_worst_process() -> None:
    lossy = tally({"requests": 2, "responses": 1, "timeouts": 1}, 1, [0.001], [])
    clean = tally({"requests": 98, "responses": 98}, 1, [0.001] * 98, [])
    summary = summary_of(Tally.merge([lossy, clean], [lossy, clean]))
    assert (summary["loss_pct"], summary["requests"], summary["clients"]) == (1.0, 100, 2)  # 1 of 100, not 50 %
    assert list(summary) == list(summary_of(Tally()))  # the keys one process prints, in its order


def test_the_parent_prints_the_open_episodes_and_the_verdict_as_one_process() -> None:
    run = StunProcessesRun(None, start_line(4, "127.0.0.1:3478", 10.0, (1.0, 10.0), False))
    with log_events() as events:
        run.start(2)
        run.final_lines(tally({"open_at_stop": 3}, 4, [], []), Verdict(True), [])
    texts = [(event["event"], event["log_format"].format(**event)) for event in events]
    assert texts == [
        ("clients_start", "Starting 4 STUN clients against 127.0.0.1:3478, interval 10 s, start delay 1-10 s, "
                          "2 processes"),
        ("loss_open_at_stop", "3 loss episodes still unresolved at stop: counted as lost_unattributed"),
        ("verdict", "verdict: pass"),
    ]
    assert all(event["log_namespace"].startswith("nettester.protocols.stun.") for event in events)
