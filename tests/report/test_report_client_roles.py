"""Every client role, run as a pipeline runs it: --duration, --report, a verdict, the exit status, JSON-only stdout.

Each role runs for real (``python -m nettester``) against a loopback port
where nothing listens, so each must stop by itself, fail its verdict (exit
status 1, or 3 for the CoAP roles: nothing answered), write its report, and,
with ``--log-format json``, put nothing but JSON lines on stdout.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nettester.report import SCHEMA

pytestmark = pytest.mark.integration
RUN_BOUND = 90.0  # seconds; each run asks for 2


def _dead_port() -> int:
    """A loopback port nothing listens on (TCP and UDP), for a run that must fail. The OS picks a
    free UDP port; its TCP twin may be taken (other tests share the host), so a few picks are tried."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no loopback port free for both TCP and UDP in 50 picks")


def _client_commands(port: int, tmp_path: Path) -> dict[str, list[str]]:
    uri = f"coap://127.0.0.1:{port}"
    return {
        "stun-client": ["stun-client", "--server", "127.0.0.1", "--port", str(port), "--clients", "2",
                        "--interval", "0.5", "--start-delay", "0"],
        "keepalive-client": ["keepalive-client", "--server", "127.0.0.1", "--port", str(port), "--clients", "2"],
        "coap-bench": ["coap-bench", "--clients", "2", "--timeout", "1", f"{uri}/benchmark"],
        "coap-receivetest": ["coap-receivetest", "--timeout", "1", "--uuid-file", str(tmp_path / "uuid"),
                             f"{uri}/requests"],
    }


@pytest.mark.parametrize("role", ["stun-client", "keepalive-client", "coap-bench", "coap-receivetest"])
def test_a_failed_run_stops_by_itself_reports_and_writes_json_only(role: str, tmp_path: Path) -> None:
    report = tmp_path / f"{role}.json"
    port = _dead_port()
    argv = [*_client_commands(port, tmp_path)[role], "--duration", "2", "--report", str(report),
            "--log-format", "json", "--stats-interval", "0"]
    result = subprocess.run([sys.executable, "-m", "nettester", *argv], capture_output=True, text=True,
                            timeout=RUN_BOUND)
    assert result.returncode in (1, 3), result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines, result.stderr
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{role} --log-format json wrote a line that is not JSON: {line!r}")
    [verdict] = [record for record in records if record["event"] == "verdict"]
    assert verdict["passed"] is False
    document = json.loads(report.read_text())
    assert document["schema"] == SCHEMA and document["role"] == role
    assert document["verdict"]["passed"] is False and document["verdict"]["reasons"]
    assert set(document["loss"]) == {"lost_forward", "lost_return", "lost_unattributed"}
    assert document["configuration"]["target"] == f"127.0.0.1:{port}"


def test_a_bad_threshold_is_exit_status_2_naming_the_option() -> None:
    result = subprocess.run([sys.executable, "-m", "nettester", "stun-client", "--max-loss", "101"],
                            capture_output=True, text=True, timeout=RUN_BOUND)
    assert result.returncode == 2
    assert "--max-loss: expected a percentage 0-100, got '101'" in result.stderr
