"""What ``coap-bench`` prints (Californium's BenchmarkClient lines), alone or as the parent of ``--processes``.

Every line is a pure function of plain counts or of a
:class:`nettester.tally.Tally`: one process applies them to its own, the
parent of ``--processes N`` to its children's merged, so the user sees the
lines of one run: one start line (the whole run's clients, and how many
processes), progress lines whose counts and rates are the sums over the
same interval, and the final summary with RTT percentiles from the summed
histograms and Californium's requests-per-client histogram summed bucket
by bucket. :class:`BenchProcessesRun` is the parent's ``MergedRun``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import IO, Any

from nettester.histogram import requests_per_client_lines
from nettester.logs import ALWAYS, Logger
from nettester.protocols.coap.client import EXIT_NO_RESPONSE
from nettester.report.merge import PROCESSES_SUFFIX, ProcessesRun
from nettester.report.model import LOSS_KEYS, Verdict
from nettester.tally import Tally
from nettester.workers import current_worker

log = Logger()

FIRST_PROGRESS = 1.0  # seconds to the first progress line: a short run shows one too
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
START = "coap_bench_start"


def start_text(described: Mapping[str, Any]) -> str:
    """``coap-bench: N clients to host:port (scheme, CON GET /path, for 10 s)`` from ``BenchConfig.describe()``."""
    requests, duration = described["requests_per_client"], described["duration_s"]
    until = (f"{requests} requests each" if requests else f"for {duration:g} s" if duration else "until stopped")
    return (f"coap-bench: {described['clients']} clients to {described['target']} ({described['scheme']}, "
            f"{described['mode']} {described['method']} {described['resource']}, {until})")


def progress_text(responses: int, rate: float, retransmissions: int, failures: int, active: int) -> str:
    """``N requests (R reqs/s, X retransmissions (p%), Y transmission errors (q%), C clients)``."""
    sent = max(responses + failures, 1)
    return (f"{responses} requests ({rate:.0f} reqs/s, {retransmissions} retransmissions "
            f"({retransmissions * 100 / sent:.2f}%), {failures} transmission errors "
            f"({failures * 100 / sent:.2f}%), {active} clients)")


class ProgressRate:
    """Answers per second since the previous progress line."""

    def __init__(self, started: float) -> None:
        self._time = started
        self._responses = 0

    def rate(self, now: float, responses: int) -> float:
        elapsed = now - self._time
        rate = (responses - self._responses) / elapsed if elapsed > 0 else 0.0
        self._time, self._responses = now, responses
        return rate


def summary_lines(tally: Tally) -> list[str]:
    """The final summary: overall rate, loss by direction, RTT percentiles, requests-per-client histogram."""
    responses, failures = tally.count("requests"), tally.count("transmission_errors")
    elapsed = max(tally.at - tally.started, 1e-9)
    directions = "".join(f", {key}={tally.count(key)}" for key in LOSS_KEYS.values())
    return [
        f"{responses} requests in {elapsed:.1f} s: {responses / elapsed:.0f} reqs/s, "
        f"{tally.count('retransmissions')} retransmissions, {failures} transmission errors{directions}, "
        f"{tally.level('clients')} clients",
        tally.histogram("rtt").line(PERCENTILES),
        *requests_per_client_lines(tally.per_client),
    ]


def counters_of(tally: Tally) -> dict[str, Any]:
    """The summary counters (the JSON summary line's fields, the report's ``counters``)."""
    responses = tally.count("requests")
    return {"requests": responses, "transmission_errors": tally.count("transmission_errors"),
            "retransmissions": tally.count("retransmissions"), "clients": tally.level("clients"),
            "reqs_per_s": round(responses / max(tally.at - tally.started, 1e-9), 1),
            "attribution_invalid": tally.count("attribution_invalid"),
            **{key: tally.count(key) for key in LOSS_KEYS.values()}}


class BenchPrinter:
    """A result line: plain text on stdout, or with ``--log-format json`` a JSON log line.

    A ``--processes`` child prints none: its parent prints the run's.
    """

    def __init__(self, stdout: IO[str], json_lines: bool) -> None:
        self.stdout = stdout
        self.json_lines = json_lines
        self.silent = current_worker() is not None

    def print(self, text: str, event: str, **fields: Any) -> None:
        if self.silent:
            return
        if self.json_lines:
            log.info("{text}", event=event, text=text, **{ALWAYS: True}, **fields)
            return
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def start(self, described: Mapping[str, Any], processes: int | None = None) -> None:
        """The start line (``processes``: the parent of ``--processes`` names them)."""
        if processes is None:
            self.print(start_text(described), START, **described)
        else:
            self.print(start_text(described) + PROCESSES_SUFFIX.format(processes=processes), START, **described,
                       processes=processes)

    def progress(self, tally: Tally, rate: float) -> None:
        """One progress line, with the loss by direction so far."""
        loss = {key: tally.count(key) for key in LOSS_KEYS.values()}
        line = progress_text(tally.count("requests"), rate, tally.count("retransmissions"),
                             tally.count("transmission_errors"), tally.level("active"))
        self.print(line + " " + " ".join(f"{key}={value}" for key, value in loss.items()), "coap_bench_progress",
                   requests=tally.count("requests"), failures=tally.count("transmission_errors"),
                   clients=tally.level("active"), **loss)

    def final(self, tally: Tally, verdict: Verdict) -> None:
        """The summary line, the RTT line, requests per client and the verdict."""
        lines = summary_lines(tally)
        self.print(lines[0], "coap_bench_summary", **counters_of(tally))
        self.print(lines[1], "coap_bench_rtt", rtt_ms=tally.histogram("rtt").percentiles_ms(PERCENTILES))
        self.print("\n".join(lines[2:]), "coap_bench_histogram",
                   requests_per_client={str(count): clients for count, clients in tally.per_client.items()})
        self.print(verdict.line(), "verdict", passed=verdict.passed, reasons=list(verdict.reasons))


class BenchProcessesRun(ProcessesRun):
    """The parent of ``coap-bench --processes``: Californium's lines for the whole run."""

    summary_lines = False  # one process prints progress lines, not summary lines
    percentiles = PERCENTILES

    def __init__(self, described: Mapping[str, Any], report: str | None, report_interval: float,
                 printer: BenchPrinter) -> None:
        """``described``: the whole run's ``BenchConfig.describe()`` (its ``duration_s`` too);
        ``report_interval``: ``--report-interval``."""
        super().__init__(report, duration=float(described.get("duration_s", 0.0)))
        self.described = described
        self.first_progress = min(FIRST_PROGRESS, report_interval)
        self.progress_interval = report_interval
        self.printer = printer
        self._rate: ProgressRate | None = None

    def start(self, processes: int) -> None:
        self.printer.start(self.described, processes)

    def progress(self, tally: Tally, now: float) -> None:
        if self._rate is None:
            self._rate = ProgressRate(tally.started)
        self.printer.progress(tally, self._rate.rate(now, tally.count("requests")))

    def summary(self, tally: Tally) -> dict[str, Any]:
        return counters_of(tally)

    def final_lines(self, tally: Tally, verdict: Verdict, results: Sequence[Mapping[str, Any]]) -> None:
        self.printer.final(tally, verdict)

    def exit_status(self, tally: Tally, verdict: Verdict, statuses: Sequence[int]) -> int:
        """As one process's: 3 when nothing at all was answered, else the merged verdict's."""
        if set(statuses) <= {0, 1, EXIT_NO_RESPONSE}:
            return EXIT_NO_RESPONSE if not tally.count("requests") else verdict.exit_status
        return super().exit_status(tally, verdict, statuses)
