"""The ``plot`` role: JSON run reports to one self-contained HTML page."""

from __future__ import annotations

import os
from typing import IO, Any, ClassVar

from twisted.python import usage

from nettester.module import CommandRole
from nettester.options import RoleOptions
from nettester.report.model import EXIT_PASS, EXIT_USAGE

SUMMARY = "Run results for pipelines and people: JSON reports drawn as one HTML page."


class PlotOptions(RoleOptions):
    """Options of ``nettester plot``."""

    serves_metrics = False

    synopsis = "[-o report.html] REPORT.json [REPORT.json ...]"
    longdesc = ("Draw one self-contained HTML page (no network needed to view it) from the JSON reports that "
                "client roles write with --report: the loss timeline by client and direction, loss per minute, "
                "RTT p50/p99 over time, NAT mapping changes, and for keep-alive the connections open over time "
                "and closes by cause. Needs matplotlib: pip install 'nettester[plots]'. Exit status: 0 the page "
                "was written; 2 a bad command line, a report that cannot be read, or matplotlib missing.")
    optParameters: ClassVar[list[list[Any]]] = [
        ["output", "o", "report.html", "The HTML file to write."],
    ]

    def parseArgs(self, *reports: str) -> None:
        if not reports:
            raise usage.UsageError("give at least one JSON report (written by a client role's --report FILE)")
        self["reports"] = list(reports)

    def postOptions(self) -> None:
        directory = os.path.dirname(os.path.abspath(self["output"]))
        if not os.path.isdir(directory):
            raise usage.UsageError(f"--output {self['output']}: the directory {directory} does not exist")
        super().postOptions()


def run_plot(options: RoleOptions, stdout: IO[str]) -> int:
    """Read every report, render the page, write it; the exit status."""
    from nettester.logs import Logger
    from nettester.report.plot import PlotUnavailableError, render_page
    from nettester.report.writer import ReportError, read_report

    log = Logger()
    try:
        reports = [(os.path.basename(path), read_report(path)) for path in options["reports"]]
        page = render_page(reports)
    except (ReportError, PlotUnavailableError) as error:
        log.critical("{reason}", event="plot_failed", reason=str(error))
        return EXIT_USAGE
    output = options["output"]
    try:
        with open(output, "w") as stream:
            stream.write(page)
    except OSError as error:
        log.critical("--output {output}: cannot write it: {reason}; choose a writable path", event="plot_failed",
                     output=output, reason=error.strerror or str(error))
        return EXIT_USAGE
    stdout.write(f"wrote {output} ({len(reports)} reports)\n")
    return EXIT_PASS


ROLES = (CommandRole("plot", "Draw JSON run reports (--report) as one self-contained HTML page.", PlotOptions,
                     run_plot),)
