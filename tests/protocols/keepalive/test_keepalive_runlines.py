"""keepalive-client's run lines: the summary of merged tallies is the summary one process would print."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.histogram import RttHistogram
from nettester.protocols.keepalive.runlines import ERRORS, KeepaliveProcessesRun, start_line, summary_of
from nettester.report import Verdict
from nettester.tally import Tally
from tests.logcapture import log_events

COUNTED = ("connections", "keepalives", "dummies", *ERRORS)
# Keep-alive RTTs in 1/1024 s steps: their float sums are exact in any order, so the mean of the merged
# histogram is the union's to the last bit (real RTTs differ in the 16th digit at most, far below the 2 shown).
rtts = st.lists(st.integers(min_value=0, max_value=20_000).map(lambda steps: steps / 1024), max_size=30)
processes = st.lists(st.tuples(st.dictionaries(st.sampled_from(COUNTED), st.integers(0, 10_000)),
                               st.integers(0, 500), st.integers(0, 500), rtts), min_size=1, max_size=4)


def tally(counts: dict[str, int], clients: int, open_connections: int, samples: list[float]) -> Tally:
    histogram = RttHistogram()
    for value in samples:
        histogram.record(value)
    return Tally(counts, {"clients": clients, "open": open_connections}, {"rtt": histogram})


@settings(max_examples=80, deadline=None)
@given(processes)
def test_the_merged_summary_is_the_summary_of_the_union(parts: list[tuple[dict[str, int], int, int, Any]]) -> None:
    tallies = [tally(*part) for part in parts]
    union = tally({name: sum(counts.get(name, 0) for counts, *_ in parts) for name in COUNTED},
                  sum(part[1] for part in parts), sum(part[2] for part in parts),
                  [value for *_, samples in parts for value in samples])
    merged = summary_of(Tally.merge(tallies, tallies))
    assert merged == summary_of(union)
    assert merged["errors"] == sum(merged[name] for name in ERRORS)


def test_the_mean_rtt_weighs_every_keepalive_not_every_process() -> None:
    busy = tally({"keepalives": 3}, 1, 1, [0.001, 0.001, 0.001])
    idle = tally({"keepalives": 1}, 1, 1, [0.009])
    summary = summary_of(Tally.merge([busy, idle], [busy, idle]))
    assert (summary["rtt_avg_ms"], summary["rtt_max_ms"], summary["open"]) == (3.0, 9.0, 2)  # not (1 + 9) / 2
    assert list(summary) == list(summary_of(Tally()))  # the keys one process prints, in its order


def test_the_parent_names_the_shared_run_in_its_start_and_verdict_lines() -> None:
    run = KeepaliveProcessesRun(None, start_line("abc123", 4, "127.0.0.1:49665", False, 10.0), run_id="abc123")
    with log_events() as events:
        run.start(2)
        run.final_lines(Tally(), Verdict(True), [])
    assert [event["log_format"].format(**event) for event in events] == [
        "keepalive-client run abc123: 4 clients to 127.0.0.1:49665 (TCP) over 10 s, 2 processes",
        "keepalive-client run abc123: verdict: pass",
    ]
