"""``nettester nat`` with an IPv4 and an IPv6 destination, run as a user runs it (issue 16).

It used to log ``2 destinations`` and add only the first; now both families are
served, each NAT entry opening an outgoing socket of its destination's family.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.loopback import free_ports, has_ipv6_loopback

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here"),
]
ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT = 20.0


def _echo(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


def test_an_ipv4_and_an_ipv6_destination_are_both_added_and_both_answer() -> None:
    four, six = _echo("127.0.0.1"), _echo("::1")
    (public,) = free_ports()
    four_port, six_port = four.getsockname()[1], six.getsockname()[1]
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    for client in clients:
        client.bind(("127.0.0.1", 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "nettester", "nat", f"127.0.0.1:{public}",
         f"127.0.0.1:{four_port}", f"[::1]:{six_port}"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        answered: set[socket.socket] = set()
        served: set[socket.socket] = set()
        deadline = time.monotonic() + TIMEOUT
        while len(answered) < len(clients) and time.monotonic() < deadline:
            for client in set(clients) - answered:  # resent until answered: the NAT may still be starting
                client.sendto(b"ping", ("127.0.0.1", public))
            ready, _, _ = select.select([four, six, *clients], [], [], 0.2)
            for sock in ready:
                data, source = sock.recvfrom(2048)
                if sock in (four, six):
                    served.add(sock)
                    sock.sendto(b"pong", source)
                elif data == b"pong":
                    answered.add(sock)
        assert answered == set(clients), "every client is answered through the NAT"
        assert served == {four, six}, "16 clients over 2 destinations reach both families"
        output, _ = process.communicate("exit\n", timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for sock in (four, six, *clients):
            sock.close()
    assert process.returncode == 0, output
    assert f"NAT listening on 127.0.0.1:{public}, 2 destinations" in output
    added = [line.split("[info] ")[1] for line in output.splitlines() if "Destination added" in line]
    assert added == [
        f"Destination added 127.0.0.1:{four_port} (127.0.0.1:{four_port})",
        f"Destination added [::1]:{six_port} ([::1]:{six_port})",
    ]
    assert "Traceback" not in output and "[error]" not in output and "[warn" not in output
