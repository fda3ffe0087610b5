"""The ``nettester`` console script as a newcomer meets it: help, wrong input."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _nettester(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nettester", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_help_lists_roles() -> None:
    result = _nettester("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: nettester <role> [options]")
    assert "local" in result.stdout


def test_role_help_shows_its_options_and_env_vars() -> None:
    result = _nettester("local", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: nettester local [options]")
    assert "--duration" in result.stdout and "LOG_LEVEL" in result.stdout


def test_no_role_is_an_error_that_lists_the_roles() -> None:
    result = _nettester()
    assert result.returncode == 2
    assert "nettester: error: name a role: one of" in result.stderr
    assert "Try 'nettester --help'" in result.stderr


def test_unknown_role() -> None:
    result = _nettester("frobnicate")
    assert result.returncode == 2
    assert "Unknown command: frobnicate" in result.stderr


def test_wrong_option_value_points_at_the_role_help() -> None:
    result = _nettester("local", "--duration", "soon")
    assert result.returncode == 2
    assert "--duration: expected a number above 0, got 'soon'" in result.stderr
    assert "Try 'nettester local --help'" in result.stderr


def test_unknown_option() -> None:
    result = _nettester("local", "--frobnicate")
    assert result.returncode == 2
    assert "frobnicate" in result.stderr


def test_local_runs_on_loopback_and_reports(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nettester", "local", "--duration", "0.5", "--modules", "", "--log-format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert '"event":"local_result"' in result.stdout


def test_a_command_role_prints_only_its_result_on_stdout(tmp_path: Path) -> None:
    server_log = tmp_path / "server.jsonl"
    server_log.write_text("")
    result = _nettester("keepalive-report", str(server_log), str(server_log))
    assert result.returncode == 0, result.stderr
    assert "twistd" not in result.stdout and "connections seen" in result.stdout


def test_help_into_a_pipe_closed_early_ends_without_a_traceback() -> None:
    """``nettester coap-server --help | head``: the reader goes away before the help is written."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "nettester", "coap-server", "--help"], cwd=ROOT,
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


def test_local_prints_summaries_and_verdicts_not_each_connection_nor_twistd_banners() -> None:
    metrics_port = _free_port()
    result = _nettester("local", "--duration", "1", "--modules", "keepalive", "--metrics-port", str(metrics_port),
                        "--metrics-interface", "127.0.0.1")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.endswith(f"[info] metrics on http://127.0.0.1:{metrics_port}/metrics") for line in lines)
    assert any("local verdict keepalive: PASS" in line for line in lines)
    assert any("keepalive final summary:" in line for line in lines)
    for noise in ("Session established", "New TCP connection attempt", "closed, conn=", "connected 127.0.0.1",
                  "Main loop terminated.", "Server Shut Down.", "starting up.", "reactor class:", "starting on"):
        assert not any(noise in line for line in lines), (noise, result.stdout)
    assert len(lines) < 15, result.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# How a user starts each long-running role (against a port where nothing listens).
ROLE_COMMANDS = {
    "keepalive-server": ["--port", "0", "--interface", "127.0.0.1"],
    "keepalive-client": ["--server", "127.0.0.1", "--port", "{dead}", "--clients", "1"],
    "stun-server": ["--port", "0", "--interface", "127.0.0.1"],
    "stun-client": ["--server", "127.0.0.1", "--port", "{dead}", "--clients", "1"],
    "coap-server": ["--port", "0", "--interfaces", "127.0.0.1"],
    "nat": [":0", "127.0.0.1:{dead}", "--no-stdin-console"],
    "local": ["--duration", "5", "--modules", "keepalive"],
}
# One-shot clients: their printed result is the output, they serve no metrics.
ONE_SHOT = {"coap-client", "coap-receivetest", "coap-bench"}


def test_every_long_running_role_is_checked_for_a_busy_metrics_port() -> None:
    from nettester.interfaces import ICommandRole
    from nettester.module import discover_roles

    roles = {name for name, role in discover_roles().items() if not ICommandRole.providedBy(role)}
    assert roles - ONE_SHOT == set(ROLE_COMMANDS)


@pytest.mark.parametrize("role", sorted(ROLE_COMMANDS))
def test_a_metrics_port_in_use_is_one_clean_line_and_exit_status_1(role: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [word.replace("{dead}", str(_free_port())) for word in ROLE_COMMANDS[role]]
        result = _nettester(role, *argv, "--metrics-port", str(port), "--metrics-interface", "127.0.0.1")
    assert result.returncode == 1, result.stdout + result.stderr
    expected = (f"[critical] cannot listen on 127.0.0.1:{port} (--metrics-port): Address already in use; "
                "choose another --metrics-port")
    assert [line[13:] for line in result.stdout.splitlines() if "[critical]" in line] == [expected]
    assert "Traceback" not in result.stdout + result.stderr
