"""``--duration``, ``--report`` and the thresholds, shared by every client role (no reactor imports)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twisted.python import usage

from nettester.options import non_negative_float, non_negative_int, percentage
from nettester.report.model import Thresholds


class ResultOptionsMixin:
    """Mix into a client role's options (before ``RoleOptions``): CI-ready results.

    ``--duration S`` stops the run by itself; ``--report FILE`` writes the
    JSON report at the end; ``--max-loss PCT`` and ``--max-resets N`` set the
    verdict and so the exit status (0 pass, 1 fail, 2 bad command line).
    """

    optParameters: ClassVar[list[list[Any]]] = [
        ["duration", None, 0.0, "Stop by itself after this many seconds (0: run until stopped).",
         non_negative_float],
        ["report", None, None, ("Write the JSON run report (counters, loss by direction, RTTs, every loss "
         "episode, verdict) to FILE at the end.")],
        ["max-loss", None, 0.0, "Fail (exit 1) when more than PCT percent of the requests were lost.",
         percentage],
        ["max-resets", None, 0, ("Fail (exit 1) when more than N connections were reset, closed by the far end "
                                 "or refused (keep-alive)."),
         non_negative_int],
    ]

    def postOptions(self) -> None:
        report = self["report"]  # type: ignore[index]
        if report:
            directory = os.path.dirname(os.path.abspath(report))
            if not os.path.isdir(directory):
                raise usage.UsageError(f"--report {report}: the directory {directory} does not exist")
            if not os.access(directory, os.W_OK):
                raise usage.UsageError(f"--report {report}: the directory {directory} is not writable")
        super().postOptions()  # type: ignore[misc]

    def thresholds(self) -> Thresholds:
        """The limits given on the command line."""
        return Thresholds(max_loss_percent=self["max-loss"], max_resets=self["max-resets"])  # type: ignore[index]


@dataclass(frozen=True)
class ResultSettings:
    """What a role's service needs of the result options, without the options object."""

    duration: float = 0.0
    report: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)

    @classmethod
    def from_options(cls, options: Any) -> ResultSettings:
        """From options parsed with :class:`ResultOptionsMixin`."""
        return cls(options["duration"], options["report"], options.thresholds())
