"""What ``stun-client`` prints about its whole run, alone or as the parent of ``--processes``.

The summary fields are a pure function of a :class:`nettester.tally.Tally`
(:func:`summary_of`): one process applies it to its own tally, the parent
of ``--processes N`` to its children's merged, so the merged summary line
is the line one process running every client would print (counts summed,
RTT and timer-lag percentiles from the summed histograms, ``loss_pct`` from
the summed counts). The start, ``--duration``, open-episodes and verdict
lines are shared the same way; :class:`StunProcessesRun` is the parent's
``MergedRun``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nettester.logs import ALWAYS, Logger
from nettester.protocols.stun.fleet import loss_percent
from nettester.report.merge import ProcessesRun, RunLine
from nettester.report.model import Verdict
from nettester.tally import Tally

log = Logger()

#: A tally's running totals shown as they are, in the summary's order.
SHOWN_COUNTS = ("timeouts", "consecutive_failure_errors", "mapping_changes", "unexpected", "refused",
                "socket_errors", "lost_forward", "lost_return", "lost_unattributed", "attribution_invalid")


def start_line(clients: int, server: str, interval: float, start_delay: tuple[float, float],
               rfc_retransmit: bool) -> RunLine:
    """``Starting N STUN clients against host:port, interval ...``."""
    return RunLine("Starting {clients} STUN clients against {server}, interval {interval:g} s, "
                   "start delay {low:g}-{high:g} s{rfc}", "clients_start",
                   {"clients": clients, "server": server, "interval": interval, "low": start_delay[0],
                    "high": start_delay[1], "rfc": ", RFC 8489 retransmissions" if rfc_retransmit else ""},
                   log.namespace)


def duration_line(duration: float) -> RunLine:
    """``--duration S s is over: stopping``."""
    return RunLine("--duration {duration:g} s is over: stopping", "duration_over", {"duration": duration},
                   log.namespace)


def summary_of(tally: Tally) -> dict[str, int | float]:
    """The ``stun-client summary:`` fields of ``tally``."""
    count = tally.count
    lag = tally.histogram("timer_lag").percentile(99)
    rtt = tally.histogram("rtt")
    return {
        "clients": tally.level("clients"),
        "requests": count("requests"),
        "responses": count("responses"),
        "loss_pct": round(loss_percent(count("timeouts"), count("responses"), count("error_responses")), 3),
        "rtt_p50_ms": rtt.field("rtt_p50_ms") or 0.0,
        "rtt_p99_ms": rtt.field("rtt_p99_ms") or 0.0,
        "timer_lag_p99_ms": round(lag * 1000, 3) if lag is not None else 0.0,
        **{name: count(name) for name in SHOWN_COUNTS},
    }


def log_open_at_stop(count: int) -> None:
    """Loss episodes still unresolved when the run stopped (each one's own line is not printed)."""
    log.info("{count} loss episodes still unresolved at stop: counted as lost_unattributed",
             event="loss_open_at_stop", count=count)


def log_verdict(verdict: Verdict) -> None:
    """The run's verdict, at every ``--log-level`` (as the summaries and the other client roles' verdicts)."""
    log.info("{verdict}", event="verdict", verdict=verdict.line(), passed=verdict.passed,
             reasons=list(verdict.reasons), **{ALWAYS: True})


class StunProcessesRun(ProcessesRun):
    """The parent of ``stun-client --processes``: summary lines, open episodes and verdict, merged."""

    def summary(self, tally: Tally) -> dict[str, Any]:
        return summary_of(tally)

    def final_lines(self, tally: Tally, verdict: Verdict, results: Sequence[Mapping[str, Any]]) -> None:
        if tally.count("open_at_stop"):
            log_open_at_stop(tally.count("open_at_stop"))
        log_verdict(verdict)
