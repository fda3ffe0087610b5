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
