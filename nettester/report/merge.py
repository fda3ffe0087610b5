"""The load generators' ``--processes`` run merged: run lines, verdict, ``--report``.

The parent (``nettester.supervisor``) feeds a role's
:class:`nettester.interfaces.MergedRun` (made by the role's options,
``merged_run()``) the children's merged tally, the lines they hand over and
their final results (the report document each would have written, and its
``judged`` counts ``[sent, lost, answered, resets]``). :class:`ProcessesRun`
is what the three roles share; each adds its own summary, progress and
final lines, so the wiring layer needs no report code.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nettester.logs import Logger
from nettester.report.model import MAX_EPISODES, MAX_MARKS, Thresholds, Verdict, judge
from nettester.report.writer import ReportError, write_report
from nettester.tally import Tally
from nettester.workers import current_worker, merge_exit_statuses

log = Logger()

#: What a start line gains with ``--processes``: ``... start delay 0-0 s, 2 processes``.
PROCESSES_SUFFIX = ", {processes} processes"


def new_run_id() -> str:
    """A run id: 6 hex digits, as keep-alive conn ids carry (``<run>-<client>-<attempt>``)."""
    return secrets.token_hex(3)


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


@dataclass(frozen=True)
class RunLine:
    """A line about the whole run, as one process logs it: ``twisted.logger`` format, event name, fields,
    and the namespace of the role's logger (so the parent's JSON line has the same ``module``)."""

    format: str
    event: str
    fields: Mapping[str, Any]
    namespace: str

    def log(self, suffix: str = "", **extra: Any) -> None:
        """Log it at info, ``suffix`` added to the format and ``extra`` to the fields.

        A ``--processes`` child does not: its parent prints the whole run's
        (:class:`ProcessesRun`), so the user sees one run, at every level.
        """
        if current_worker() is None:
            Logger(namespace=self.namespace).info(self.format + suffix, event=self.event, **self.fields, **extra)


class ProcessesRun(ABC):
    """The shared ground of the load generators' :class:`nettester.interfaces.MergedRun`.

    Prints the run's start line (naming the processes too) and its
    ``--duration`` line from the role's options, judges the whole run again
    on the summed counts (processes that each stayed under ``--max-loss``
    may not together, and the other way round) and writes the one
    ``--report``. A role adds its summary fields and final lines, and
    progress lines if it prints some of its own.
    """

    summary_lines = True
    first_progress = 0.0
    progress_interval = 0.0
    #: The report's ``rtt_ms`` percentiles, as one process writes them.
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)

    def __init__(self, report: str | None, start_line: RunLine | None = None, duration: float = 0.0,
                 duration_line: RunLine | None = None, run_id: str | None = None) -> None:
        """``report``: ``--report FILE``; ``start_line``: the role's, with the whole run's ``clients`` (a role
        printing its own way overrides :meth:`start`); ``duration``: ``--duration``, when the processes stop
        and ``duration_line`` (if the role prints one) is printed; ``run_id``: the one its start line names,
        if it does."""
        self.report = report
        self.start_line = start_line
        self.duration = duration
        self.duration_line = duration_line
        self.run_id = run_id or new_run_id()

    def start(self, processes: int) -> None:
        if self.start_line is not None:
            self.start_line.log(PROCESSES_SUFFIX, processes=processes)

    def duration_over(self) -> None:
        if self.duration_line is not None:
            self.duration_line.log()

    def progress(self, tally: Tally, now: float) -> None:
        """A role with progress lines of its own (``progress_interval`` > 0) prints one here."""
        raise NotImplementedError(f"{type(self).__name__} prints no progress lines: its progress_interval is 0")

    @abstractmethod
    def summary(self, tally: Tally) -> dict[str, Any]:
        """The role's summary fields (its summary line's, its report's ``counters``) for ``tally``."""

    @abstractmethod
    def final_lines(self, tally: Tally, verdict: Verdict, results: Sequence[Mapping[str, Any]]) -> None:
        """Print what one process prints at its end, the verdict included, from the merged run."""

    def conclude(self, tally: Tally, results: Sequence[Mapping[str, Any]], statuses: Sequence[int]) -> int:
        documents = [result["document"] for result in results]
        verdict = judge_merged(documents[0]["thresholds"], (result["judged"] for result in results))
        self.final_lines(tally, verdict, results)
        status = self.exit_status(tally, verdict, statuses)
        if self.report:
            rtt_ms = tally.histogram("rtt").percentiles_ms(self.percentiles)
            try:
                write_report(self.report, merge_documents(documents, self.summary(tally), rtt_ms, verdict))
            except ReportError as error:
                log.error("{reason}", event="report_failed", reason=str(error))
                status = max(status, 1)
        return status

    def exit_status(self, tally: Tally, verdict: Verdict, statuses: Sequence[int]) -> int:
        """The merged verdict's status (0 or 1), or the children's own when they agree on another."""
        return verdict.exit_status if set(statuses) <= {0, 1} else merge_exit_statuses(statuses)
