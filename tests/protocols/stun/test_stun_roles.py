"""The STUN roles run as a user runs them (``python -m nettester ...``): messages and exit statuses."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nettester.protocols.stun.journal import Journal
from nettester.protocols.stun.report import run_report

pytestmark = pytest.mark.integration
RUN_TIMEOUT = 60.0


def nettester(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nettester", *argv], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def dead_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed on return: nothing listens there any more


def test_stun_client_against_a_dead_port_counts_refused_and_fails(tmp_path: Path) -> None:
    port = dead_udp_port()
    report = tmp_path / "stun.json"
    result = nettester(
        "stun-client", "--server", "127.0.0.1", "--port", str(port), "--clients", "2", "--interval", "0.3",
        "--start-delay", "0", "--duration", "1.2", "--stats-interval", "0", "--report", str(report),
        "--log-level", "warn",
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"[error] Client 0: STUN server 127.0.0.1:{port} refused (ICMP port unreachable): is stun-server " \
           "running there?" in output  # fmt: skip
    final = next(line for line in output.splitlines() if "stun-client final summary:" in line)
    refused = int(final.split("refused=")[1].split()[0])
    assert refused >= 2 and "socket_errors=0" in final and "lost_unattributed=" in final
    assert "Bad file descriptor" not in output and "Traceback" not in output
    assert "verdict: FAIL: no responses" in output
    document = json.loads(report.read_text())
    assert document["role"] == "stun-client" and document["configuration"]["target"] == f"127.0.0.1:{port}"
    assert document["verdict"]["exit_status"] == 1 and document["loss"]["lost_unattributed"] >= 1


def test_stun_server_journal_that_cannot_be_written_is_one_clean_line() -> None:
    result = nettester("stun-server", "--port", "0", "--interface", "127.0.0.1", "--journal", "/proc/nope/j.jsonl")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "[critical] --journal /proc/nope/j.jsonl: cannot write it: " in output
    assert "choose a writable path" in output and "Traceback" not in output


def test_journal_rotates_to_file_dot_1_and_the_report_reads_both(tmp_path: Path) -> None:
    path = tmp_path / "server.jsonl"
    journal = Journal(str(path), max_bytes=1000)
    for n in range(30):
        journal.record(1_733_220_000.0 + n, bytes([n]) * 12, ("198.51.100.7", 40000 + n), "0.0.0.0:3478")
    journal.close()
    assert journal.rotations >= 1
    for part in (path, Path(f"{path}.1")):
        assert 0 < part.stat().st_size <= 1000
        for line in part.read_text().splitlines():
            record = json.loads(line)
            assert set(record) == {"t", "trid", "from", "to"}
    client = tmp_path / "client.jsonl"
    client.write_text("")
    out = io.StringIO()
    assert run_report(str(path), [str(client)], out) == 0
    assert "no path loss" in out.getvalue()
    assert "(server journal: " in out.getvalue()


def client_line(event: str, trid: str, **fields: object) -> str:
    return json.dumps({"ts": "2026-12-03T07:14:20.113Z", "level": "warn", "module": "stun", "event": event,
                       "msg": "...", "client": 17, "trid": trid, **fields})  # fmt: skip


def test_stun_report_verdicts_and_exit_status(tmp_path: Path) -> None:
    forward, back = "0A:" * 11 + "0A", "0B:" * 11 + "0B"
    journal = tmp_path / "server.jsonl"
    journal.write_text(
        "".join(
            f'{{"t":1733210060.{n},"trid":"{back}","from":"203.0.113.7:40211","to":"0.0.0.0:3478"}}\n'
            for n in range(3)
        )
    )
    client = tmp_path / "client.jsonl"
    client.write_text(
        "\n".join(
            [client_line("response_missing", forward, sent=1), client_line("response_missing", back, sent=1),
             client_line("response_missing", back, sent=2), client_line("loss_attributed", back, answered=True),
             json.dumps({"ts": "x", "event": "summary", "level": "info"})]  # fmt: skip
        )
        + "\n"
    )
    result = nettester("stun-report", str(journal), str(client))
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    assert f"client 17 TrID {forward}: 1 unanswered; the server never received it; forward: lost on the way out" in text
    assert (
        f"client 17 TrID {back}: 2 unanswered, answered later; the server received it 3 times, first "
        "2024-12-03T07:14:20.000Z (UDP 203.0.113.7:40211 -> 0.0.0.0:3478)"
    ) in text
    assert f"wireshark: stun.id == 0x{'0b' * 12} || frame contains {back}" in text
    assert "lost TrIDs: 2 forward=1 return=1 both=0" in text
    assert "client 17: forward=1 return=1 both=0" in text


@pytest.mark.parametrize(
    ("server_text", "client_text", "message"),
    [
        ("not json\n", "", "server.jsonl: line 1 is not JSON: give the file stun-server --journal wrote"),
        ('{"t": 1}\n', "", "server.jsonl: line 1 is not a stun-server journal line"),
        ("", '{"event": "x", "ts": "y"}\n07:14:20.113 [warn] Client 17: ...\n', "client.jsonl: line 2 is not JSON"),
        ("", '{"no": "event"}\n', "client.jsonl: line 1 is not a nettester JSON log line"),
    ],
)
def test_stun_report_names_the_file_and_line_it_cannot_read(
    tmp_path: Path, server_text: str, client_text: str, message: str
) -> None:
    (tmp_path / "server.jsonl").write_text(server_text)
    (tmp_path / "client.jsonl").write_text(client_text)
    out = io.StringIO()
    assert run_report(str(tmp_path / "server.jsonl"), [str(tmp_path / "client.jsonl")], out) == 2
    assert message in out.getvalue()


def test_stun_report_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_report(str(tmp_path / "nope.jsonl"), [str(tmp_path / "nope2.jsonl")], out) == 2
    assert "stun-report: cannot read " in out.getvalue() and "nope.jsonl" in out.getvalue()
