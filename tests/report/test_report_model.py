"""The report model: episodes, bounded recorder, verdicts, the JSON document."""

from __future__ import annotations

import itertools
import json
import math
import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage

from nettester.options import RoleOptions
from nettester.report import (
    FORWARD,
    RETURN,
    SCHEMA,
    UNATTRIBUTED,
    LossEpisode,
    ReportError,
    RttHistogram,
    RunRecorder,
    Thresholds,
    judge,
    read_report,
    write_report,
)
from nettester.report.options import ResultOptionsMixin


def episode(direction: str, key: str = "ab", start: float = 10.0) -> LossEpisode:
    return LossEpisode("c1", key, start, start + 1, direction, transmissions=5, reached=5 if direction == RETURN else 0)


def test_episode_direction_is_checked() -> None:
    with pytest.raises(ValueError, match="direction must be one of forward, return, unattributed"):
        LossEpisode("c1", "ab", 1.0, None, "sideways", 1)


def test_recorder_counts_by_direction_past_its_bound() -> None:
    recorder = RunRecorder("stun-client", {"clients": 1}, 0.0, max_episodes=2)
    for direction in (FORWARD, RETURN, RETURN, UNATTRIBUTED):
        recorder.episode(episode(direction))
    assert recorder.loss_fields() == {"lost_forward": 1, "lost_return": 2, "lost_unattributed": 1}
    assert len(recorder.episodes) == 2
    assert recorder.episodes_dropped == 2


def test_samples_are_thinned_evenly_when_full() -> None:
    recorder = RunRecorder("coap-bench", {}, 0.0, max_samples=10)
    for second in range(1000):
        recorder.sample(float(second), rtt_p50_ms=1.0)
    times = [sample["t"] for sample in recorder.samples]
    assert len(times) < 10
    assert times[0] == 0.0 and times[-1] > 500  # the whole run stays covered
    gaps = {b - a for a, b in itertools.pairwise(times)}
    assert len(gaps) == 1  # evenly spaced


def test_marks_are_bounded() -> None:
    recorder = RunRecorder("keepalive-client", {}, 0.0, max_marks=1)
    recorder.mark(1.0, "close", "3", cause="peer_reset")
    recorder.mark(2.0, "close", "4", cause="peer_reset")
    assert recorder.marks == [{"t": 1.0, "kind": "close", "client": "3", "detail": {"cause": "peer_reset"}}]
    assert recorder.marks_dropped == 1


@pytest.mark.parametrize(("sent", "lost", "answered", "resets", "passed", "reason"), [
    (100, 0, 100, 0, True, None),
    (100, 2, 98, None, False, "loss 2.00% (2 of 100) is above --max-loss 1%"),
    (100, 1, 99, None, True, None),
    (0, 0, 0, None, False, "nothing was sent"),
    (5, 5, 0, None, False, "no responses: all 5 requests were lost"),
    (10, 0, 10, 3, False, "3 connections reset or dropped, above --max-resets 2"),
])
def test_judge(sent: int, lost: int, answered: int, resets: int | None, passed: bool, reason: str | None) -> None:
    verdict = judge(Thresholds(max_loss_percent=1.0, max_resets=2), sent, lost, answered, resets)
    assert verdict.passed is passed
    assert verdict.exit_status == (0 if passed else 1)
    if reason is None:
        assert verdict.reasons == () and verdict.line() == "verdict: pass"
    else:
        assert reason in verdict.reasons[0] and verdict.line().startswith("verdict: FAIL: ")


def test_refusals_name_the_likely_cause() -> None:
    verdict = judge(Thresholds(), 0, 0, 0, refused=4)
    assert not verdict.passed and "refused the requests (ICMP port unreachable, 4 times)" in verdict.reasons[0]
    assert judge(Thresholds(), 10, 0, 10, refused=1).passed  # answered after all: the refusal was passing


def test_unjudged_thresholds_pass_losses() -> None:
    assert judge(Thresholds(None, None), 10, 9, 1, 50).passed


def test_document_round_trips_through_the_file(tmp_path: os.PathLike[str]) -> None:
    recorder = RunRecorder("coap-bench", {"target": "127.0.0.1:5783"}, 100.0)
    recorder.episode(episode(FORWARD, start=101.0))
    recorder.sample(102.0, rtt_p50_ms=1.5, rtt_p99_ms=None)
    recorder.mark(103.0, "nat_mapping_change", "c1", old="1.2.3.4:5", new="1.2.3.4:6")
    thresholds = Thresholds()
    verdict = judge(thresholds, 10, 1, 9)
    histogram = RttHistogram()
    histogram.record(0.002)
    document = recorder.document(110.0, {"requests": 10}, histogram.percentiles_ms((50, 99)), thresholds, verdict)
    path = os.path.join(tmp_path, "run.json")
    write_report(path, document)
    read = read_report(path)
    assert read == json.loads(json.dumps(document))
    assert read["schema"] == SCHEMA
    assert read["loss"] == {"lost_forward": 1, "lost_return": 0, "lost_unattributed": 0}
    assert read["episodes"][0]["key"] == "ab"
    assert read["verdict"] == {"passed": False, "exit_status": 1, "reasons": list(verdict.reasons)}
    assert read["duration_s"] == 10.0
    assert read["rtt_ms"]["samples"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_report_has_the_mode_the_umask_gives(tmp_path: os.PathLike[str], umask: int) -> None:
    """Not mkstemp's 0600: a report written by root must be readable by ``nettester plot`` as uid 10001."""
    path = os.path.join(tmp_path, "run.json")
    previous = os.umask(umask)
    try:
        write_report(path, {"schema": SCHEMA})
        left = os.umask(umask)
    finally:
        os.umask(previous)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert left == umask  # the process's umask is as it was


def test_write_report_names_the_file_it_cannot_write(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(ReportError, match="--report .*/missing/run.json: cannot write it"):
        write_report(os.path.join(tmp_path, "missing", "run.json"), {"schema": SCHEMA})
    with pytest.raises(ReportError, match="JSON cannot carry"):
        write_report(os.path.join(tmp_path, "nan.json"), {"value": math.nan})
    assert os.listdir(tmp_path) == []  # no temporary file left behind


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not a JSON document"),
    ('{"schema": "other/1"}', "not a nettester report"),
    ("[1, 2]", "not a nettester report"),
    (b"\xff\xfe", "not a JSON document"),
])
def test_read_report_refuses_what_is_not_one(tmp_path: os.PathLike[str], content: str | bytes, message: str) -> None:
    path = os.path.join(tmp_path, "bad.json")
    with open(path, "wb") as stream:
        stream.write(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ReportError, match=message) as raised:
        read_report(path)
    assert path in str(raised.value)


class Options(ResultOptionsMixin, RoleOptions):
    pass


def test_options_give_thresholds_and_check_the_report_directory(tmp_path: os.PathLike[str]) -> None:
    options = Options()
    options.parseOptions(["--duration", "5", "--max-loss", "2.5", "--max-resets", "3",
                          "--report", os.path.join(tmp_path, "r.json")])
    assert options["duration"] == 5.0
    assert options.thresholds() == Thresholds(2.5, 3)
    assert Options().thresholds() == Thresholds(0.0, 0)
    with pytest.raises(usage.UsageError, match="--max-loss: expected a percentage 0-100, got '101'"):
        Options().parseOptions(["--max-loss", "101"])
    with pytest.raises(usage.UsageError, match="--report .*: the directory .* does not exist"):
        Options().parseOptions(["--report", os.path.join(tmp_path, "no", "r.json")])


def test_histogram_percentiles_stay_within_three_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-6, 1.5) for _ in range(5000)]
    histogram = RttHistogram()
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for percent in (1, 50, 90, 99, 99.9):
        exact = ordered[math.ceil(percent / 100 * len(ordered)) - 1]
        got = histogram.percentile(percent)
        assert got is not None
        assert abs(got - exact) <= exact * 0.032 + 1e-6
    assert histogram.percentile(100) == max(values)
    assert len(histogram.counts) < 600  # bounded, whatever the number of samples


def test_histogram_without_samples() -> None:
    assert RttHistogram().percentile(50) is None
    assert RttHistogram().percentiles_ms((50,)) is None


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=50),
       st.lists(st.floats(0, 100, allow_nan=False), max_size=50))
def test_merged_histogram_equals_one_histogram_of_both(left: list[float], right: list[float]) -> None:
    one, two, both = RttHistogram(), RttHistogram(), RttHistogram()
    for value in left:
        one.record(value)
        both.record(value)
    for value in right:
        two.record(value)
        both.record(value)
    one.merge(RttHistogram.from_dict(json.loads(json.dumps(two.to_dict()))))
    assert one.counts == both.counts and one.count == both.count
    for percent in (50, 99):
        assert one.percentile(percent) == both.percentile(percent)


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=4), st.none(),
                                                       st.dictionaries(st.text(max_size=3), st.integers()))))
def test_histogram_from_garbage_is_a_value_error(data: dict[str, object]) -> None:
    try:
        RttHistogram.from_dict(data)
    except ValueError:
        pass


def test_histogram_buckets_fold_into_prometheus_and_name_summary_fields() -> None:
    from nettester.metrics import histogram_family

    histogram = RttHistogram()
    for seconds in (0.0001, 0.002, 0.002, 0.3):
        histogram.record(seconds)
    uppers = [upper for upper, _ in histogram.buckets()]
    assert uppers == sorted(uppers) and sum(count for _, count in histogram.buckets()) == 4
    assert all(upper > 0 for upper in uppers)
    cumulative = {sample.labels["le"]: sample.value for sample in histogram_family("x", "h", histogram).samples
                  if sample.name.endswith("_bucket")}
    assert cumulative["+Inf"] == 4 and cumulative["0.005"] == 3
    assert histogram.field("rtt_max_ms") == 300.0 and histogram.field("rtt_min_ms") == 0.1
    assert histogram.field("rtt_avg_ms") == pytest.approx(76.025, abs=0.001)
    assert histogram.field("rtt_p50_ms") == pytest.approx(2.0, rel=1 / 32)
    with pytest.raises(KeyError):
        histogram.field("requests")
    assert RttHistogram().field("rtt_p99_ms") is None
    assert RttHistogram().line([50]) == "RTT ms: no responses"
    assert histogram.line([50]).startswith("RTT ms: p50=") and histogram.line([50]).endswith("max=300.00")
