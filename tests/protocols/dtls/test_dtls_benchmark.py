"""benchmarks/dtls.py still runs end to end and prints its one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]


def test_benchmark_prints_one_result_line() -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dtls.py"), "--seconds", "0.3", "--concurrency", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    (line,) = completed.stdout.splitlines()
    match = re.fullmatch(
        r"dtls benchmark: handshakes/s psk-ccm8=(\d+) ecdhe-ecdsa=(\d+); "
        r"app-data echo records/s=(\d+) \(concurrency=4\)",
        line,
    )
    assert match is not None, line
    assert all(int(value) > 0 for value in match.groups())


def test_loss_mode_prints_one_result_line() -> None:
    """The loss mode: our handshake through a lossy relay, next to OpenSSL's
    and GnuTLS's where installed."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dtls.py"), "loss", "--rounds", "1", "--drop", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    (line,) = completed.stdout.splitlines()
    match = re.fullmatch(
        r"dtls loss recovery \(PSK-CCM8, datagrams 4 lost\): median handshake s ours=(\d+\.\d\d)( \w+=\d+\.\d\d)*; "
        r"(ours/fastest-other=\d+\.\d\d)? \(1 rounds\)",
        line,
    )
    assert match is not None, line
    assert float(match.group(1)) > 0
