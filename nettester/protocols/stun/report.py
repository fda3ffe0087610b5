"""``stun-report``: join a stun-server journal with stun-client JSON logs by transaction id.

For every TrID a client logged as unanswered (``response_missing``), the
journal says whether the server received it, how often, when and from which
source address and port: a TrID the server never received was lost on the way
out (``forward``), one whose every unanswered transmission reached it was lost
on the way back (``return``), one in between lost some each way (``both``).
Each comes with the Wireshark display filter that finds it in a capture.

Exit status: 0 when no TrID was lost, 1 when a path loss was found, 2 when an
input cannot be read or is not a journal / JSON log (the message names the
file and the line).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

FORWARD = "forward"
RETURN = "return"
BOTH = "both"
DIRECTIONS = (FORWARD, RETURN, BOTH)


class ReportInputError(ValueError):
    """An input line that is not what the report reads: names the file and the line."""


@dataclass
class Reception:
    """One request as the server's journal recorded it."""

    time: float
    source: str
    listening: str


@dataclass
class LostTransaction:
    """One TrID a client logged as unanswered, and what its logs add."""

    client: str
    transaction_id: str
    misses: int = 0
    sent: int = 0  # transmissions unanswered at the last miss
    answered: bool = False  # a later transmission was answered
    first_logged: str = ""

    def verdict(self, receptions: list[Reception]) -> tuple[str, int]:
        """(direction, unanswered transmissions that reached the server)."""
        reached = max(0, min(self.sent, len(receptions) - (1 if self.answered else 0)))
        if reached == 0:
            return FORWARD, 0
        return (RETURN if reached >= self.sent else BOTH), reached


@dataclass
class StunReport:
    receptions: dict[str, list[Reception]] = field(default_factory=dict)
    lost: dict[tuple[str, str], LostTransaction] = field(default_factory=dict)
    journal_lines: int = 0


def _records(path: str, lines: Iterable[str], what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ReportInputError(f"{path}: line {number} is not JSON: {what}")
        yield number, record


def add_journal(report: StunReport, path: str, lines: Iterable[str]) -> None:
    """The server's journal lines (``stun-server --journal``)."""
    what = "give the file stun-server --journal wrote"
    for number, record in _records(path, lines, what):
        trid, when, source = record.get("trid"), record.get("t"), record.get("from")
        if not isinstance(trid, str) or not isinstance(when, int | float) or not isinstance(source, str):
            raise ReportInputError(f"{path}: line {number} is not a stun-server journal line: {what}")
        report.receptions.setdefault(trid.upper(), []).append(Reception(float(when), source, str(record.get("to"))))
        report.journal_lines += 1


def add_client_log(report: StunReport, path: str, lines: Iterable[str]) -> None:
    """One client's JSON log (``stun-client --log-format json``)."""
    what = "give the log of stun-client --log-format json"
    for number, record in _records(path, lines, what):
        event = record.get("event")
        if not isinstance(event, str) or "ts" not in record:
            raise ReportInputError(f"{path}: line {number} is not a nettester JSON log line: {what}")
        if event not in ("response_missing", "loss_attributed", "loss_unattributed"):
            continue
        trid, client = record.get("trid"), record.get("client")
        if not isinstance(trid, str) or client is None:
            raise ReportInputError(f"{path}: line {number}: a {event} record without trid or client")
        key = (str(client), trid.upper())
        lost = report.lost.get(key)
        if lost is None:
            lost = report.lost[key] = LostTransaction(str(client), trid.upper(), first_logged=str(record["ts"]))
        if event == "response_missing":
            lost.misses += 1
            sent = record.get("sent")
            lost.sent = max(lost.sent, sent if isinstance(sent, int) else lost.misses)
        else:
            lost.answered = bool(record.get("answered"))


def wireshark_filter(transaction_id: str) -> str:
    """The display filter finding every copy of a TrID: the STUN dissector's field, or the raw bytes."""
    return f"stun.id == 0x{transaction_id.replace(':', '').lower()} || frame contains {transaction_id}"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((seconds % 1) * 1000):03d}Z"


def format_report(report: StunReport) -> tuple[str, int]:
    """The text, and how many lost TrIDs it found."""
    lines: list[str] = []
    totals = dict.fromkeys(DIRECTIONS, 0)
    by_client: dict[str, dict[str, int]] = {}
    for lost in sorted(report.lost.values(), key=lambda lost: (lost.first_logged, lost.client)):
        receptions = sorted(report.receptions.get(lost.transaction_id, []), key=lambda r: r.time)
        direction, reached = lost.verdict(receptions)
        totals[direction] += 1
        counts = by_client.setdefault(lost.client, dict.fromkeys(DIRECTIONS, 0))
        counts[direction] += 1
        if receptions:
            first, last = receptions[0], receptions[-1]
            seen = (
                f"the server received it {len(receptions)} times, first {_when(first.time)} "
                f"(UDP {first.source} -> {first.listening})"
            )
            if len(receptions) > 1:
                seen += f", last {_when(last.time)} (UDP {last.source} -> {last.listening})"
        else:
            seen = "the server never received it"
        meaning = {
            FORWARD: "lost on the way out",
            RETURN: "the server received every unanswered request: the responses were lost on the way back",
            BOTH: f"{reached} reached the server (responses lost on the way back), "
            f"{lost.sent - reached} were lost on the way out",
        }[direction]
        answered = ", answered later" if lost.answered else ""
        lines.append(
            f"client {lost.client} TrID {lost.transaction_id}: {lost.sent} unanswered{answered}; {seen}; "
            f"{direction}: {meaning}"
        )
        lines.append(f"    wireshark: {wireshark_filter(lost.transaction_id)}")
    found = len(report.lost)
    lines.append(
        f"lost TrIDs: {found} forward={totals[FORWARD]} return={totals[RETURN]} both={totals[BOTH]} "
        f"(server journal: {report.journal_lines} requests)"
    )
    for client, counts in sorted(by_client.items(), key=lambda item: _client_order(item[0])):
        lines.append(
            f"client {client}: forward={counts[FORWARD]} return={counts[RETURN]} both={counts[BOTH]}"
        )
    if not found:
        lines.append("no path loss: every request the clients sent was answered")
    return "\n".join(lines) + "\n", found


def _client_order(client: str) -> tuple[int, str]:
    return (int(client), "") if client.isdigit() else (1 << 62, client)


def _journal_paths(path: str) -> list[str]:
    """The rotated journal first (``FILE.1``, when it exists), then ``FILE``."""
    rotated = path + ".1"
    return [rotated, path] if os.path.exists(rotated) else [path]


def run_report(journal_path: str, client_paths: list[str], stdout: IO[str]) -> int:
    """Read the files, print the verdicts; the exit status (0 no loss, 1 loss found, 2 bad input)."""
    report = StunReport()
    try:
        for path in _journal_paths(journal_path):
            with open(path, encoding="utf-8", errors="replace") as journal:
                add_journal(report, path, journal)
        for path in client_paths:
            with open(path, encoding="utf-8", errors="replace") as log:
                add_client_log(report, path, log)
    except OSError as error:
        stdout.write(f"stun-report: cannot read {error.filename}: {error.strerror}\n")
        return 2
    except ReportInputError as error:
        stdout.write(f"stun-report: {error}\n")
        return 2
    text, found = format_report(report)
    stdout.write(text)
    return 1 if found else 0
