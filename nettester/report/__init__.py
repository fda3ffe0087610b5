"""Run results for pipelines and people: loss episodes, verdicts, JSON reports, plots.

Twisted-free (times come from the caller). The API the client roles use:

- :class:`LossEpisode`, :data:`FORWARD` / :data:`RETURN` / :data:`UNATTRIBUTED`
- :class:`RunRecorder`: episodes, samples and marks of one run, bounded
- :class:`Thresholds`, :func:`judge` -> :class:`Verdict` (``exit_status`` 0 / 1)
- :class:`RttHistogram`: bounded, mergeable RTT percentiles
- :func:`write_report` / :func:`read_report`: the JSON document (schema in :mod:`nettester.report.writer`)
- :class:`nettester.report.options.ResultOptionsMixin`: ``--duration``, ``--report``, ``--max-loss``, ``--max-resets``
"""

from nettester.histogram import RttHistogram
from nettester.report.model import (
    CLOSE,
    DIRECTIONS,
    EXIT_FAIL,
    EXIT_PASS,
    EXIT_USAGE,
    FORWARD,
    LOSS_KEYS,
    MAPPING_CHANGE,
    RETURN,
    UNATTRIBUTED,
    LossEpisode,
    RunRecorder,
    Thresholds,
    Verdict,
    judge,
)
from nettester.report.writer import SCHEMA, ReportError, read_report, write_report

__all__ = [
    "CLOSE", "DIRECTIONS", "EXIT_FAIL", "EXIT_PASS", "EXIT_USAGE", "FORWARD", "LOSS_KEYS", "MAPPING_CHANGE",
    "RETURN", "SCHEMA", "UNATTRIBUTED", "LossEpisode", "ReportError", "RttHistogram", "RunRecorder",
    "Thresholds", "Verdict", "judge", "read_report", "write_report",
]
