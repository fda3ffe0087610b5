"""The ``nettester`` console script as a newcomer meets it: help, wrong input."""

import subprocess
import sys
from pathlib import Path

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
