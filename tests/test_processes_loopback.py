"""``--processes 2`` on loopback: the parent prints the lines of one run, in the shape one process prints.

Each load generator runs twice against a real server on 127.0.0.1: alone,
then with ``--processes 2`` and ``--log-level debug`` (the parent's debug
``worker_report`` lines show what each child reported, ``worker_ended`` its
last one). Both runs' result lines must match the same shapes (``SHAPES``)
and carry the same JSON keys; the merged run has one start line naming the
whole run, periodic lines whose counts are the sums of what the children
reported just before, and a final summary that is the sum of the children's
last reports. Every wait is bounded (``--duration`` 3 s, 20 s at most).
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable
from typing import Any

import pytest

from tests.processes import LoggedProcess

DURATION = "3"  # seconds: room for the children to start and two periodic lines on a busy machine
START_EVENTS = {"stun-client": "clients_start", "keepalive-client": "fleet_start", "coap-bench": "coap_bench_start"}
NUMBERS = r"(?: \w+=-?\d+(?:\.\d+)?)+"
#: The text (JSON ``msg``) of every result line, as one process prints it; a start line of
#: ``--processes N`` adds ``, N processes``.
SHAPES: dict[str, dict[str, re.Pattern[str]]] = {
    "stun-client": {
        "clients_start": re.compile(r"Starting \d+ STUN clients against 127\.0\.0\.1:\d+, interval 0\.2 s, "
                                    r"start delay 0-0 s(, \d+ processes)?"),
        "summary": re.compile(r"stun-client summary:" + NUMBERS),
        "duration_over": re.compile(rf"--duration {DURATION} s is over: stopping"),
        "verdict": re.compile(r"verdict: pass"),
        "final_summary": re.compile(r"stun-client final summary:" + NUMBERS),
    },
    "keepalive-client": {
        "fleet_start": re.compile(r"keepalive-client run [0-9a-f]{6}: \d+ clients to 127\.0\.0\.1:\d+ \(TCP\) "
                                  r"over 0 s(, \d+ processes)?"),
        "summary": re.compile(r"keepalive-client summary:" + NUMBERS),
        "duration_reached": re.compile(rf"keepalive-client run [0-9a-f]{{6}}: --duration {DURATION} s reached, "
                                       r"stopping"),
        "verdict": re.compile(r"keepalive-client run [0-9a-f]{6}: verdict: pass"),
        "final_summary": re.compile(r"keepalive-client final summary:" + NUMBERS),
    },
    "coap-bench": {
        "coap_bench_start": re.compile(r"coap-bench: \d+ clients to 127\.0\.0\.1:\d+ \(coap, CON GET /test, "
                                       rf"for {DURATION} s\)(, \d+ processes)?"),
        "coap_bench_progress": re.compile(r"\d+ requests \(\d+ reqs/s, \d+ retransmissions \(\d+\.\d\d%\), \d+ "
                                          r"transmission errors \(\d+\.\d\d%\), \d+ clients\) lost_forward=\d+ "
                                          r"lost_return=\d+ lost_unattributed=\d+"),
        "coap_bench_summary": re.compile(r"\d+ requests in \d+\.\d s: \d+ reqs/s, \d+ retransmissions, \d+ "
                                         r"transmission errors, lost_forward=\d+, lost_return=\d+, "
                                         r"lost_unattributed=\d+, \d+ clients"),
        "coap_bench_rtt": re.compile(r"RTT ms: p50=\d+\.\d\d, p90=\d+\.\d\d, p95=\d+\.\d\d, p99=\d+\.\d\d, "
                                     r"p99\.9=\d+\.\d\d, max=\d+\.\d\d"),
        "coap_bench_histogram": re.compile(r"requests per client \(requests: clients\):(\n  \d+: \d+)+"),
        "verdict": re.compile(r"verdict: pass"),
    },
}
#: The periodic line of each role and the counts it carries, by the name the children's reports use.
PERIODIC = {
    "stun-client": ("summary", {"requests": "requests", "responses": "responses", "timeouts": "timeouts"}),
    "keepalive-client": ("summary", {"keepalives": "keepalives", "connections": "connections"}),
    "coap-bench": ("coap_bench_progress", {"requests": "requests", "failures": "transmission_errors"}),
}
#: The final line whose counts are the sum of the children's last reports.
FINAL = {"stun-client": ("final_summary", ("clients", "requests", "responses", "timeouts", "lost_unattributed")),
         "keepalive-client": ("final_summary", ("clients", "connections", "keepalives", "errors")),
         "coap-bench": ("coap_bench_summary", ("requests", "transmission_errors", "retransmissions", "clients"))}


def listening(*arguments: str) -> tuple[LoggedProcess, int]:
    """A server on a port of the OS's choice, and that port, once it listens."""
    server = LoggedProcess(*arguments, "--port", "0", "--stats-interval", "0")
    try:
        server.wait(lambda: bool(server.of("listening") or server.of("coap_listening")))
    except AssertionError:
        server.stop()
        raise
    record = (server.of("listening") or server.of("coap_listening"))[0]
    return server, int(record.get("port") or str(record.get("address") or record.get("addresses")).rsplit(":")[-1])


@pytest.fixture
def stun_server() -> Generator[int, None, None]:
    server, port = listening("stun-server", "--interface", "127.0.0.1")
    yield port
    server.stop()


@pytest.fixture
def keepalive_server() -> Generator[int, None, None]:
    server, port = listening("keepalive-server", "--interface", "127.0.0.1")
    yield port
    server.stop()


@pytest.fixture
def coap_server() -> Generator[int, None, None]:
    server, port = listening("coap-server", "--interfaces", "127.0.0.1")
    yield port
    server.stop()


def run(role: str, *arguments: str) -> LoggedProcess:
    """One finished run of ``role``; it passed, and wrote JSON lines only."""
    process = LoggedProcess(role, "--duration", DURATION, *arguments)
    assert process.finish() == 0, process.events[-10:]
    assert process.other == [], "--log-format json: nothing but JSON lines on stdout"
    return process


def results(process: LoggedProcess, role: str) -> list[dict[str, Any]]:
    """The result lines (those ``SHAPES`` knows), in order."""
    return [record for record in process.events if record.get("event") in SHAPES[role]]


def keys(records: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for record in records:
        found.setdefault(record["event"], set()).update(set(record) - {"ts"})
    return found


def check_merged_run(role: str, alone: LoggedProcess, merged: LoggedProcess, clients: int) -> None:
    shapes = SHAPES[role]
    for process in (alone, merged):
        lines = results(process, role)
        assert {record["event"] for record in lines} == set(shapes), [record["event"] for record in lines]
        for record in lines:
            assert shapes[record["event"]].fullmatch(record["msg"]), record["msg"]
    start = START_EVENTS[role]
    # The same JSON keys one process prints; the start line names the processes too.
    expected = keys(results(alone, role))
    expected[start] |= {"processes"}
    assert keys(results(merged, role)) == expected
    # One start line for the whole run, before any other of nettester's info lines (the parent prints it
    # before it starts the processes; at debug, twistd's banners come first).
    [line] = merged.of(start)
    assert (line["clients"], line["processes"]) == (clients, 2) and line["msg"].endswith(", 2 processes")
    assert next(record for record in merged.events if record["level"] != "debug" and record["module"] != "twisted"
                ) is line
    # Each periodic line: the sums of what each child reported last before it.
    periodic, counts = PERIODIC[role]
    latest: dict[int, dict[str, Any]] = {}
    checked = 0
    for record in merged.events:
        if record.get("event") == "worker_report":
            latest[record["index"]] = record["worker_summary"]
        elif record.get("event") == periodic and len(latest) == 2:
            for field, reported in counts.items():
                assert record[field] == sum(part[reported] for part in latest.values()), (field, record["msg"])
            checked += 1
    assert checked >= 2, f"periodic lines merged from both processes: {checked}"
    # The final summary: the sums of the children's last reports.
    final_event, fields = FINAL[role]
    parts = [record["worker_summary"] for record in merged.of("worker_ended")]
    [final] = merged.of(final_event)
    assert len(parts) == 2 and {field: final[field] for field in fields} == {
        field: sum(part[field] for part in parts) for field in fields}


def test_stun_client_processes_print_one_runs_lines(stun_server: int) -> None:
    arguments = ("--server", "127.0.0.1", "--port", str(stun_server), "--clients", "4", "--interval", "0.2",
                 "--start-delay", "0", "--stats-interval", "0.5")
    alone = run("stun-client", *arguments)
    merged = run("stun-client", *arguments, "--processes", "2", "--log-level", "debug")
    check_merged_run("stun-client", alone, merged, clients=4)
    final = merged.of("final_summary")[0]
    assert final["responses"] >= 8 and final["rtt_p99_ms"] > 0


def test_keepalive_client_processes_print_one_runs_lines_and_number_clients_once(keepalive_server: int) -> None:
    arguments = ("--server", "127.0.0.1", "--port", str(keepalive_server), "--clients", "4", "--ramp-up", "0",
                 "--keepalive-interval", "0.2", "--stats-interval", "0.5")
    alone = run("keepalive-client", *arguments)
    merged = run("keepalive-client", *arguments, "--processes", "2", "--log-level", "debug")
    check_merged_run("keepalive-client", alone, merged, clients=4)
    # One run id and one number per client in the whole run: conn ids stay unique across the processes.
    run_id = merged.of("fleet_start")[0]["run"]
    opened = merged.of("conn_open")
    assert sorted(record["client"] for record in opened) == [1, 2, 3, 4]
    assert sorted(record["conn"] for record in opened) == [f"{run_id}-{client}-1" for client in (1, 2, 3, 4)]
    assert merged.of("verdict")[0]["run"] == run_id


def test_coap_bench_processes_print_one_runs_lines(coap_server: int) -> None:
    arguments = ("--clients", "4", "--interval", "0.01", "--report-interval", "0.5",
                 f"coap://127.0.0.1:{coap_server}/test")
    alone = run("coap-bench", *arguments)
    merged = run("coap-bench", *arguments, "--processes", "2", "--log-level", "debug")
    check_merged_run("coap-bench", alone, merged, clients=4)
    [histogram] = merged.of("coap_bench_histogram")
    assert sum(histogram["requests_per_client"].values()) == 4, "every client of both processes, once"
    [rtt] = merged.of("coap_bench_rtt")
    assert rtt["rtt_ms"]["samples"] == merged.of("coap_bench_summary")[0]["requests"]
