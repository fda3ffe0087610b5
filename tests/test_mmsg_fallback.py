"""The servers' loopback tests again on the plain read loop (``NETTESTER_MMSG=off``): where the C library
has no ``recvmmsg``/``sendmmsg``, the servers must behave the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nettester import mmsg

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration

SERVER_LOOPBACK_TESTS = (
    "tests/protocols/stun/test_stun_loopback.py",
    "tests/protocols/stun/test_stun_server.py",
    "tests/protocols/coap/test_coap_server.py",
    "tests/protocols/coap/test_coap_client.py",
    "tests/cluster/test_cluster_coap.py",
    "tests/cluster/test_cluster_workers.py",
    "tests/nat/test_nat_loopback.py",
)


def test_the_server_loopback_tests_pass_on_the_plain_read_loop() -> None:
    environment = {**os.environ, mmsg.DISABLE_ENV: "off"}
    chosen = subprocess.run([sys.executable, "-c", "from nettester.reactor import server_port_class; "
                             "print(server_port_class().__name__)"], env=environment, capture_output=True,
                            text=True, timeout=60, check=True)
    assert chosen.stdout.strip() == "DrainingPort"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SERVER_LOOPBACK_TESTS],
                            cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
