"""What ``keepalive-client`` prints about its whole run, alone or as the parent of ``--processes``.

The summary fields are a pure function of a :class:`nettester.tally.Tally`
(:func:`summary_of`): one process applies it to its own tally, the parent
of ``--processes N`` to its children's merged, so the merged summary line
is the line one process holding every connection would print (counts
summed, ``open`` summed over the processes running, the RTT mean and
maximum from the summed histograms). :class:`KeepaliveProcessesRun` is the
parent's ``MergedRun``; the processes share one run id, so the verdict line
names the run every conn id carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nettester.logs import ALWAYS, Logger
from nettester.protocols.keepalive.adapter import TLS_ERROR
from nettester.report.merge import ProcessesRun, RunLine
from nettester.report.model import Verdict
from nettester.tally import Tally

log = Logger()

#: Failures a healthy path never shows (the summary's ``errors`` is their sum).
ERRORS = ("server_unavailable", "server_closed", "resets", "responses_missing", TLS_ERROR, "protocol_errors")


def target(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port``: the server as every line names it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_line(run: str, clients: int, server: str, tls: bool, ramp_up: float) -> RunLine:
    """``keepalive-client run R: N clients to host:port (TCP) over S s``."""
    return RunLine("keepalive-client run {run}: {clients} clients to {server} ({transport}) over {ramp:g} s",
                   "fleet_start", {"run": run, "clients": clients, "server": server,
                                   "transport": "TLS" if tls else "TCP", "ramp": ramp_up}, log.namespace)


def duration_line(run: str, duration: float) -> RunLine:
    """``keepalive-client run R: --duration S s reached, stopping``."""
    return RunLine("keepalive-client run {run}: --duration {duration:g} s reached, stopping", "duration_reached",
                   {"run": run, "duration": duration}, log.namespace)


def summary_of(tally: Tally) -> dict[str, int | float]:
    """The ``keepalive-client summary:`` fields of ``tally``."""
    count = tally.count
    rtt = tally.histogram("rtt")
    return {
        "clients": tally.level("clients"),
        "open": tally.level("open"),
        "connections": count("connections"),
        "keepalives": count("keepalives"),
        "rtt_avg_ms": round(1000 * rtt.total / rtt.count, 2) if rtt.count else 0.0,
        "rtt_max_ms": round(1000 * rtt.maximum, 2),
        "dummies": count("dummies"),
        **{name: count(name) for name in ERRORS},
        "errors": sum(count(name) for name in ERRORS),
    }


def log_verdict(run: str, verdict: Verdict) -> None:
    """The run's verdict, at every ``--log-level``."""
    log.info("keepalive-client run {run}: {verdict}", event="verdict", run=run, verdict=verdict.line(),
             passed=verdict.passed, reasons=list(verdict.reasons), **{ALWAYS: True})


class KeepaliveProcessesRun(ProcessesRun):
    """The parent of ``keepalive-client --processes``: summary lines and verdict, merged."""

    def summary(self, tally: Tally) -> dict[str, Any]:
        return summary_of(tally)

    def final_lines(self, tally: Tally, verdict: Verdict, results: Sequence[Mapping[str, Any]]) -> None:
        log_verdict(self.run_id, verdict)
