"""The load generators' ``--processes`` run merged: RTT and requests-per-client lines, verdict, ``--report``.

The parent (``nettester.supervisor``) collects every process's final result
(the report document it would have written, and its ``judged`` counts
``[sent, lost, answered, resets]``) and hands them here through the role's
options (:meth:`nettester.report.options.ResultOptionsMixin.merge_results`),
so the wiring layer needs no report code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nettester.histogram import RttHistogram, requests_per_client_lines
from nettester.logs import ALWAYS, Logger
from nettester.report.model import MAX_EPISODES, MAX_MARKS, Thresholds, Verdict, judge
from nettester.report.writer import ReportError, write_report
from nettester.workers import merge_exit_statuses, merge_summaries

log = Logger()

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def merge_documents(documents: Sequence[Mapping[str, Any]], counters: Mapping[str, Any],
                    rtt_ms: Mapping[str, float] | None, verdict: Verdict) -> dict[str, Any]:
    """One ``--report`` document from the load-generator processes' own (schema in ``nettester.report.writer``).

    The configuration is the first process's with the summed ``clients`` and
    ``processes``; loss adds up by direction; episodes, series points and
    marks of every process, in time order and each with its ``process``
    index, within the recorder's bounds (the rest counted as dropped).
    """
    first = documents[0]

    def tagged(key: str, order: str) -> list[dict[str, Any]]:
        items = [{**item, "process": index} for index, document in enumerate(documents) for item in document[key]]
        return sorted(items, key=lambda item: item[order] if item[order] is not None else 0.0)

    episodes, marks = tagged("episodes", "start"), tagged("marks", "t")
    configuration = dict(first["configuration"])
    if all(isinstance(document["configuration"].get("clients"), int) for document in documents):
        configuration["clients"] = sum(document["configuration"]["clients"] for document in documents)
    configuration["processes"] = len(documents)
    started = min(document["started"] for document in documents)
    ended = max(document["ended"] for document in documents)
    return {
        **first,
        "started": started,
        "ended": ended,
        "duration_s": round(ended - started, 3),
        "configuration": configuration,
        "counters": dict(counters),
        "loss": {key: sum(document["loss"].get(key, 0) for document in documents) for key in first["loss"]},
        "rtt_ms": dict(rtt_ms) if rtt_ms is not None else None,
        "episodes": episodes[:MAX_EPISODES],
        "episodes_dropped": sum(document["episodes_dropped"] for document in documents)
        + max(0, len(episodes) - MAX_EPISODES),
        "series": tagged("series", "t"),
        "marks": marks[:MAX_MARKS],
        "marks_dropped": sum(document["marks_dropped"] for document in documents) + max(0, len(marks) - MAX_MARKS),
        "verdict": verdict.to_json(),
    }


def judge_merged(thresholds: Mapping[str, Any], judged: Iterable[Sequence[int | None]]) -> Verdict:
    """The verdict of the whole run from each process's ``(sent, lost, answered, resets)`` (resets None: not judged)."""
    rows = list(judged)
    sent, lost, answered = (sum(int(row[column] or 0) for row in rows) for column in range(3))
    resets = None if all(row[3] is None for row in rows) else sum(int(row[3] or 0) for row in rows)
    return judge(Thresholds(**thresholds), sent, lost, answered, resets)


def conclude_processes(role: str, results: Sequence[Mapping[str, Any]], rtt: RttHistogram | None,
                       per_client: Mapping[int, int], statuses: Sequence[int], report: str | None) -> int:
    """Log the merged RTT line, requests per client (when counted) and verdict, write ``report``; the exit status.

    The verdict is judged again on the summed counts: processes that each
    stayed under ``--max-loss`` may not together, and the other way round.
    A status other than pass or fail (coap-bench's 3, nothing answered)
    stands when every process agrees.
    """
    documents = [result["document"] for result in results]
    percents = [float(key[1:]) for key in documents[0].get("rtt_ms") or {} if key.startswith("p")]
    percents = percents or list(DEFAULT_PERCENTILES)
    rtt = rtt or RttHistogram()
    rtt_ms = rtt.percentiles_ms(percents)
    log.info("{role} {text}", event="merged_rtt", role=role, text=rtt.line(percents), rtt_ms=rtt_ms,
             **{ALWAYS: True})
    if per_client:
        log.info("{role} {text}", event="merged_requests_per_client", role=role,
                 text="\n".join(requests_per_client_lines(per_client)),
                 requests_per_client={str(count): clients for count, clients in per_client.items()}, **{ALWAYS: True})
    verdict = judge_merged(documents[0]["thresholds"], (result["judged"] for result in results))
    log.info("{role} {verdict}", event="verdict", role=role, verdict=verdict.line(), passed=verdict.passed,
             reasons=list(verdict.reasons), **{ALWAYS: True})
    status = verdict.exit_status if set(statuses) <= {0, 1} else merge_exit_statuses(statuses)
    if report:
        counters = merge_summaries([document["counters"] for document in documents], rtt=rtt)
        try:
            write_report(report, merge_documents(documents, counters, rtt_ms, verdict))
        except ReportError as error:
            log.error("{reason}", event="report_failed", reason=str(error))
            status = max(status, 1)
    return status
