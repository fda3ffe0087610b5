"""keepalive-report: joining both ends' JSON logs and classing every connection."""

import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.protocols.keepalive.report import build_report, format_report, path_findings, run_report


def rec(ts: str, event: str, **fields: Any) -> str:
    return json.dumps({"ts": f"2026-01-01T00:00:{ts}Z", "level": "info", "module": "keepalive", "event": event,
                       "msg": "-", **fields})


def opened(ts: str, conn: str, server: bool) -> str:
    return rec(ts, "session_established" if server else "conn_open", conn=conn)


def closed(ts: str, conn: str, cause: str, detail: str = "") -> str:
    return rec(ts, "conn_closed", conn=conn, cause=cause, detail=detail)


SERVER = [
    "12:00:00.000 [info] a human line that is not JSON",
    opened("01", "a", True), opened("01", "b", True), opened("02", "c", True), opened("02", "d", True),
    opened("03", "e", True), opened("03", "f", True), opened("04", "g", True), opened("04", "h", True),
    closed("10", "a", "closed_by_server", "keep_alive_missing"),
    closed("11", "b", "peer_closed", "FIN"),
    closed("12", "c", "peer_reset", "lost"),
    closed("13", "d", "peer_reset", "lost"),
    closed("20", "f", "peer_closed", "FIN"),
    closed("21", "g", "closed_by_server", "shutdown"),
    closed("22", "-", "peer_closed", "FIN"),
]
CLIENT_1 = [
    opened("01", "a", False), opened("01", "b", False), opened("02", "c", False), opened("02", "d", False),
    closed("10", "a", "peer_closed", "FIN"),
    closed("11", "b", "closed_by_client", "response_missing"),
    closed("12", "c", "peer_reset", "lost"),
    rec("14", "server_unavailable", conn="x"),
]
CLIENT_2 = [
    opened("03", "e", False), opened("04", "h", False),
    closed("15", "e", "peer_reset", "lost"),
    closed("19", "h", "peer_closed", "FIN"),
]


def test_every_class_is_counted_with_its_first_and_last_time() -> None:
    report = build_report(SERVER, [CLIENT_1, CLIENT_2])
    counts = {name: stats.count for name, stats in report.classes.items()}
    assert counts == {"closed_by_server": 1, "closed_by_client": 1, "middlebox_reset": 3, "middlebox_fin": 1,
                      "tls_error": 0, "still_open": 1, "one_side_only": 1}
    reset = report.classes["middlebox_reset"]
    assert (reset.first, reset.last) == ("2026-01-01T00:00:12Z", "2026-01-01T00:00:15Z")
    assert reset.reasons == {"seen by both ends": 1, "seen by server": 1, "seen by client": 1}
    assert report.classes["closed_by_server"].reasons == {"keep_alive_missing": 1}
    assert report.seen.count == 8
    assert report.connect_failures.count == 1 and report.without_session.count == 1
    assert report.skipped_lines == 1


def test_the_table_names_each_class() -> None:
    table = format_report(build_report(SERVER, [CLIENT_1, CLIENT_2]))
    rows = {line[:37].strip(): line[37:].split() for line in table.splitlines()}
    assert rows["reset by a middlebox"] == ["3", "2026-01-01T00:00:12Z", "2026-01-01T00:00:15Z"]
    assert rows["seen by both ends"] == ["1"]
    for label in ("connections seen", "closed by the server", "closed by the client", "still open",
                  "closed by a middlebox (FIN)", "  keep_alive_missing", "connect failures (server unavailable)"):
        assert label in table
    assert "1 lines were not JSON log records" in table


def test_run_report_reads_files_and_reports_unreadable_ones(tmp_path: Path) -> None:
    server, client = tmp_path / "server.jsonl", tmp_path / "client.jsonl"
    server.write_text("\n".join(SERVER[1:]) + "\n\n")
    client.write_text("\n".join(CLIENT_1))
    out = io.StringIO()
    assert run_report(str(server), [str(client)], out) == 1  # the path reset and starved connections
    assert out.getvalue().startswith("class ")
    out = io.StringIO()
    assert run_report(str(server), [str(tmp_path / "missing.jsonl")], out) == 2
    assert "cannot read" in out.getvalue() and "missing.jsonl" in out.getvalue()


def test_the_verdict_names_what_the_path_did_and_sets_the_exit_status(tmp_path: Path) -> None:
    report = build_report(SERVER, [CLIENT_1, CLIENT_2])
    assert path_findings(report) == [
        "3 connections reset by a middlebox", "1 connection closed by a middlebox (FIN)",
        "1 connection closed by the server: a keep-alive never arrived",
        "1 connection closed by the client: a keep-alive response never arrived"]
    server, client = tmp_path / "server.jsonl", tmp_path / "client.jsonl"
    server.write_text("\n".join(SERVER[1:]))
    client.write_text("\n".join(CLIENT_1 + CLIENT_2))
    out = io.StringIO()
    assert run_report(str(server), [str(client)], out) == 1
    assert out.getvalue().splitlines()[-1] == "verdict: FAIL: " + "; ".join(path_findings(report))
    # Connections that lived until a role was stopped, or that an end closed for another reason: a pass.
    quiet = [opened("01", "a", True), opened("01", "b", True), closed("09", "a", "closed_by_server", "shutdown"),
             closed("09", "b", "closed_by_server", "invalid_message")]
    server.write_text("\n".join(quiet))
    client.write_text("\n".join([opened("01", "a", False), opened("01", "b", False)]))
    out = io.StringIO()
    assert run_report(str(server), [str(client)], out) == 0
    assert out.getvalue().splitlines()[-1] == "verdict: pass"


_values = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.sampled_from(
    ["conn_closed", "conn_open", "session_established", "server_unavailable", "peer_reset", "closed_by_server",
     "shutdown", "-", "a"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.text(max_size=40),
    st.dictionaries(st.sampled_from(["ts", "event", "conn", "cause", "detail"]), _values).map(json.dumps),
), max_size=20))
def test_arbitrary_log_lines_never_break_the_report(lines: list[str]) -> None:
    half = len(lines) // 2
    format_report(build_report(lines[:half], [lines[half:]]))


@pytest.mark.parametrize("line", ["[]", "1", '"x"', '{"event": 3}', "{"])
def test_json_that_is_not_a_record_is_skipped(line: str) -> None:
    assert build_report([line], []).skipped_lines == 1


@pytest.mark.parametrize("which", ["server", "client"])
def test_a_file_that_is_not_a_json_log_is_named_with_its_line_and_exit_status_2(tmp_path: Path, which: str) -> None:
    server, client = tmp_path / "server.jsonl", tmp_path / "client.log"
    server.write_text("\n".join(SERVER[1:]))
    client.write_text("\n".join(CLIENT_1))
    human = "12:00:02.310 [info] Client 17: connected 10.1.0.7:40112 -> 203.0.113.10:49665, conn=3f9a2c-17-1"
    bad = server if which == "server" else client
    bad.write_text(bad.read_text() + "\n" + human + "\n")
    line = len(bad.read_text().splitlines())
    out = io.StringIO()
    assert run_report(str(server), [str(client)], out) == 2
    assert out.getvalue() == (f"keepalive-report: {bad}: line {line} is not a nettester JSON log record: "
                              f"{human!r}; run both roles with --log-format json and give their logs\n")


def test_a_tls_failure_before_establish_session_is_one_connection_in_one_class() -> None:
    """The client refuses the server's certificate: the client logs its conn id, the server cannot
    (no Establish Session yet); the 4-tuple makes them one connection."""
    server = [rec("01", "conn_attempt", peer="127.0.0.1:40000", local="127.0.0.1:49665"),
              rec("02", "conn_closed", conn="-", peer="127.0.0.1:40000", local="127.0.0.1:49665", cause="tls_error",
                  detail="unknown CA"),
              rec("03", "conn_closed", conn="-", peer="10.0.0.9:1234", local="127.0.0.1:49665", cause="peer_closed")]
    client = [rec("01", "conn_open", conn="r-1-1", local="127.0.0.1:40000", peer="127.0.0.1:49665"),
              rec("02", "conn_closed", conn="r-1-1", local="127.0.0.1:40000", peer="127.0.0.1:49665",
                  cause="tls_error", detail="not trusted")]
    report = build_report(server, [client])
    assert report.classes["tls_error"].count == 1
    assert report.without_session.count == 1 and report.without_session.reasons == {"peer_closed": 1}
    assert report.seen.count == 1
