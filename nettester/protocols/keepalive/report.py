"""``keepalive-report``: join both ends' JSON logs by conn id and say who ended each connection.

Our two ends only ever close with a FIN, so a reset that neither end asked
for came from something in between (a load balancer, a NAT, a firewall): that
is a verdict here, not a guess. Classes, decided per connection:

- ``closed_by_server``: the server closed it (keep-alive missing, invalid message);
- ``closed_by_client``: the client closed it (response missing, invalid message);
- ``middlebox_reset``: one or both ends saw a RST and neither end closed it;
- ``middlebox_fin``: both ends saw a FIN and neither end sent one;
- ``tls_error``: the TLS layer failed (handshake, certificate, record);
- ``still_open``: no end closed it before its log ended, or it was closed
  because a role was stopped (``shutdown``);
- ``one_side_only``: closed by the peer as one end saw it, and the other
  end's log does not know the connection (give every client's log).

Connection attempts that never connected (``server_unavailable``) and
connections closed before ``Establish Session`` (no conn id) are counted apart.
A server close without a conn id whose 4-tuple is a client's connection (a
TLS handshake the client refused, say) is that connection's server side:
one connection, one class.

The command reads only JSON logs: a line that is not a nettester JSON record
is named (file and line) and the exit status is 2. Otherwise a verdict line
follows the table, and the exit status is 1 when the path ended or starved
a connection (a middlebox reset or FIN, a keep-alive or its response lost on
the way, as either end's close says), 0 when it did not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from nettester.protocols.keepalive.adapter import PEER_RESET, TLS_ERROR
from nettester.protocols.keepalive.client import CLOSED_BY_CLIENT
from nettester.protocols.keepalive.server import CLOSED_BY_SERVER
from nettester.report.model import Verdict

SHUTDOWN = "shutdown"
# Close details that mean a message was lost on the path (server.py, client.py).
KEEP_ALIVE_MISSING = "keep_alive_missing"
RESPONSE_MISSING = "response_missing"

CLASSES = (
    ("closed_by_server", "closed by the server"),
    ("closed_by_client", "closed by the client"),
    ("middlebox_reset", "reset by a middlebox"),
    ("middlebox_fin", "closed by a middlebox (FIN)"),
    ("tls_error", "TLS failure"),
    ("still_open", "still open"),
    ("one_side_only", "seen by one side only"),
)


@dataclass
class Close:
    """How one end saw a connection end."""

    cause: str
    detail: str
    ts: str


@dataclass
class Connection:
    """Everything both logs say about one conn id."""

    opened: str | None = None
    server: Close | None = None
    client: Close | None = None
    sides: set[str] = field(default_factory=set)
    # (client's local address, client's peer address), as the client logged them.
    client_tuple: tuple[str, str] | None = None


@dataclass
class ClassStats:
    """How many connections fell in a class, and when the first and last did."""

    count: int = 0
    first: str | None = None
    last: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, ts: str | None, reason: str | None = None) -> None:
        self.count += 1
        if ts is not None:
            self.first = ts if self.first is None or ts < self.first else self.first
            self.last = ts if self.last is None or ts > self.last else self.last
        if reason:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1


@dataclass
class Report:
    """The joined result."""

    connections: dict[str, Connection] = field(default_factory=dict)
    classes: dict[str, ClassStats] = field(default_factory=lambda: {name: ClassStats() for name, _ in CLASSES})
    seen: ClassStats = field(default_factory=ClassStats)
    connect_failures: ClassStats = field(default_factory=ClassStats)
    without_session: ClassStats = field(default_factory=ClassStats)
    skipped_lines: int = 0
    # Server closes without a conn id: (peer, local, close), matched to a client's connection by 4-tuple.
    unnamed_server_closes: list[tuple[str | None, str | None, Close]] = field(default_factory=list)


def _record(line: str) -> Mapping[str, Any] | None:
    """The nettester JSON record on ``line``, or None."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("event"), str) else None


def first_non_record(lines: Iterable[str]) -> tuple[int, str] | None:
    """(line number, text) of the first non-blank line that is not a nettester JSON record, or None."""
    for number, line in enumerate(lines, start=1):
        if line.strip() and _record(line) is None:
            return number, line.rstrip("\n")
    return None


def read_records(lines: Iterable[str], report: Report) -> list[Mapping[str, Any]]:
    """The JSON records among ``lines``; anything else is counted in ``report.skipped_lines``."""
    records = []
    for line in lines:
        record = _record(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            report.skipped_lines += 1
    return records


def _text(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    return value if isinstance(value, str) and value else None


def add_log(report: Report, side: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Fold one end's records (``side`` is ``server`` or ``client``) into ``report``."""
    for record in records:
        event, conn, ts = record["event"], _text(record, "conn"), _text(record, "ts")
        if event == "server_unavailable" and side == "client":
            report.connect_failures.add(ts)
            continue
        if event not in ("session_established", "conn_open", "conn_closed"):
            continue
        close = Close(_text(record, "cause") or "unknown", _text(record, "detail") or "", ts or "")
        if conn is None or conn == "-":
            if event == "conn_closed" and side == "server":
                report.unnamed_server_closes.append((_text(record, "peer"), _text(record, "local"), close))
            elif event == "conn_closed":
                report.without_session.add(ts, close.cause)
            continue
        connection = report.connections.setdefault(conn, Connection())
        connection.sides.add(side)
        local, peer = _text(record, "local"), _text(record, "peer")
        if side == "client" and local is not None and peer is not None:
            connection.client_tuple = (local, peer)
        if event == "conn_closed":
            setattr(connection, side, close)
        elif ts is not None and (connection.opened is None or ts < connection.opened):
            connection.opened = ts


def classify(connection: Connection) -> tuple[str, str | None, str | None]:
    """(class, reason, time) of one connection; see the module docstring."""
    server, client = connection.server, connection.client
    closes = [close for close in (server, client) if close is not None]
    if any(close.cause in (CLOSED_BY_SERVER, CLOSED_BY_CLIENT) and close.detail == SHUTDOWN for close in closes):
        return "still_open", None, connection.opened
    if not closes:
        return "still_open", None, connection.opened
    when = min(close.ts for close in closes)
    if server is not None and server.cause == CLOSED_BY_SERVER:
        return "closed_by_server", server.detail, server.ts
    if client is not None and client.cause == CLOSED_BY_CLIENT:
        return "closed_by_client", client.detail, client.ts
    if any(close.cause == TLS_ERROR for close in closes):
        return "tls_error", None, when
    if any(close.cause == PEER_RESET for close in closes):
        seen_by = "both ends" if len(closes) == 2 and all(c.cause == PEER_RESET for c in closes) else (
            "server" if server is not None and server.cause == PEER_RESET else "client")
        return "middlebox_reset", f"seen by {seen_by}", when
    if len(connection.sides) < 2:
        return "one_side_only", None, when
    return "middlebox_fin", "seen by both ends" if len(closes) == 2 else "seen by one end", when


def _match_unnamed_server_closes(report: Report) -> None:
    """A server close before Establish Session is the server side of the client connection with its
    4-tuple, when one is known (no NAT in between); else it is counted apart."""
    by_tuple = {connection.client_tuple: connection for connection in report.connections.values()
                if connection.client_tuple is not None and connection.server is None}
    for peer, local, close in report.unnamed_server_closes:
        connection = by_tuple.pop((peer, local), None) if peer is not None and local is not None else None
        if connection is None:
            report.without_session.add(close.ts or None, close.cause)
            continue
        connection.server = close
        connection.sides.add("server")


def build_report(server_lines: Iterable[str], client_logs: Iterable[Iterable[str]]) -> Report:
    """Join the server's log lines with every client's."""
    report = Report()
    add_log(report, "server", read_records(server_lines, report))
    for lines in client_logs:
        add_log(report, "client", read_records(lines, report))
    _match_unnamed_server_closes(report)
    for connection in report.connections.values():
        report.seen.add(connection.opened)
        name, reason, ts = classify(connection)
        report.classes[name].add(ts, reason)
    return report


def format_report(report: Report) -> str:
    """The table printed by ``nettester keepalive-report``."""
    rows: list[tuple[str, int, str, str]] = []

    def add(label: str, stats: ClassStats) -> None:
        rows.append((label, stats.count, stats.first or "-", stats.last or "-"))
        rows.extend((f"  {reason}", count, "", "") for reason, count in sorted(stats.reasons.items()))

    add("connections seen", report.seen)
    for name, label in CLASSES:
        add(label, report.classes[name])
    add("connect failures (server unavailable)", report.connect_failures)
    add("closed before Establish Session", report.without_session)
    width = max(len(row[0]) for row in rows)
    lines = [f"{'class':<{width}}  {'count':>7}  {'first':<24}  last"]
    lines += [f"{label:<{width}}  {count:>7}  {first:<24}  {last}".rstrip() for label, count, first, last in rows]
    if report.skipped_lines:
        lines.append(f"({report.skipped_lines} lines were not JSON log records and were skipped; "
                     "run the roles with --log-format json)")
    return "\n".join(lines) + "\n"


def path_findings(report: Report) -> list[str]:
    """What the path did, one reason each: connections a middlebox closed, messages it lost (empty: nothing)."""
    findings = [(report.classes["middlebox_reset"].count, "reset by a middlebox"),
                (report.classes["middlebox_fin"].count, "closed by a middlebox (FIN)"),
                (report.classes["closed_by_server"].reasons.get(KEEP_ALIVE_MISSING, 0),
                 "closed by the server: a keep-alive never arrived"),
                (report.classes["closed_by_client"].reasons.get(RESPONSE_MISSING, 0),
                 "closed by the client: a keep-alive response never arrived")]
    return [f"{count} connection{'s' if count > 1 else ''} {what}" for count, what in findings if count]


def run_report(server_path: str, client_paths: list[str], stdout: IO[str]) -> int:
    """Read the files, print the table and the verdict; the exit status (0 nothing found on the path, 1 a
    middlebox close or a lost keep-alive found, 2 a file cannot be read or is not a JSON log)."""
    logs = []
    for path in (server_path, *client_paths):
        try:
            with open(path, encoding="utf-8", errors="replace") as log_file:
                lines = log_file.readlines()
        except OSError as error:
            stdout.write(f"keepalive-report: cannot read {path}: {error.strerror}\n")
            return 2
        bad = first_non_record(lines)
        if bad is not None:
            number, text = bad
            excerpt = text if len(text) <= 120 else text[:117] + "..."
            stdout.write(f"keepalive-report: {path}: line {number} is not a nettester JSON log record: {excerpt!r}; "
                         "run both roles with --log-format json and give their logs\n")
            return 2
        logs.append(lines)
    report = build_report(logs[0], logs[1:])
    findings = path_findings(report)
    verdict = Verdict(not findings, tuple(findings))  # the client roles' verdict line
    stdout.write(format_report(report) + verdict.line() + "\n")
    return verdict.exit_status
