"""Real STUN peers: our stun-client against coturn; turnutils_stunclient, Debian's stun and aioice against our server.

A missing peer skips the test, except in CI (CI=true), where it fails: the
CI machine installs every peer (.ci/install.d/30-stun.sh).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from typing import Any

import pytest
import pytest_twisted

from nettester.protocols.stun.attribution import NETTESTER_RECEIVED
from nettester.protocols.stun.fleet import tagged_binding_request
from nettester.protocols.stun.message import (
    Address,
    AttributeType,
    Message,
    MessageClass,
    Method,
    decode,
)
from tests.interop.peers import installed
from tests.loopback import free_ports, wait_until

pytestmark = pytest.mark.interop
STARTUP_TIMEOUT = 10.0


def require(binary: str) -> str:
    """The peer's path; skip (or fail in CI) when it is not installed."""
    return installed(binary, "apt-get install coturn stun-client")


def free_udp_and_tcp_port() -> int:
    """A port free for UDP and TCP, below the ephemeral range.

    coturn listens on both and retries a taken TCP port forever; other
    tests on this machine may hold thousands of ephemeral TCP ports.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as port_range:
        low = int(port_range.read().split()[0])
    for _ in range(200):
        port = random.randrange(10000, low)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
                udp.bind(("127.0.0.1", port))
                tcp.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    pytest.fail("no port free for both UDP and TCP below the ephemeral range")


def binding(address: tuple[str, int], transaction_id: bytes = b"interop-test", timeout: float = 0.5) -> bytes | None:
    """One Binding request from a fresh socket; the raw response or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(Message(Method.BINDING, MessageClass.REQUEST, transaction_id).encode(), address)
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def wait_until_answering(address: tuple[str, int], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited with {process.returncode}: {process.stdout.read()!r}")  # type: ignore[union-attr]
        if binding(address, timeout=0.2) is not None:
            return
    pytest.fail(f"{process.args} did not answer STUN on {address} within {STARTUP_TIMEOUT} s")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def coturn() -> Iterator[tuple[str, int]]:
    turnserver = require("turnserver")
    port = free_udp_and_tcp_port()
    command = [turnserver, "-n", "--stun-only", "--no-cli", "-L", "127.0.0.1", "-p", str(port), "--no-tls", "--no-dtls"]
    as_nobody: dict[str, Any] = {"user": "nobody"} if os.geteuid() == 0 else {}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **as_nobody)
    try:
        wait_until_answering(("127.0.0.1", port), process)
        yield ("127.0.0.1", port)
    finally:
        stop(process)


@pytest_twisted.inlineCallbacks
def test_our_hundred_clients_against_coturn_lose_nothing(coturn: tuple[str, int]) -> Generator[Any, Any, None]:
    from twisted.internet import reactor

    from nettester.protocols.stun.client import StunClientService
    from nettester.protocols.stun.fleet import FleetConfig

    config = FleetConfig(clients=100, interval=0.5, start_delay=(0.0, 0.5))
    fleet = StunClientService(reactor, coturn[0], coturn[1], config, rng=random.Random(5))
    fleet.startService()
    try:
        yield wait_until(lambda: fleet.counters.responses.value >= 100 * 5, timeout=30.0, step=0.05)
    finally:
        yield fleet.stopService()
    summary = fleet.summary()
    assert summary["clients"] == 100
    assert summary["responses"] >= 100 * 5
    assert (summary["timeouts"], summary["unexpected"], summary["consecutive_failure_errors"]) == (0, 0, 0)
    assert fleet.counters.malformed.value == 0 and fleet.counters.error_responses.value == 0
    # Every request carried NETTESTER-SEQUENCE (comprehension-optional): coturn ignored it, as RFC 8489 says.
    assert (summary["lost_forward"], summary["lost_return"], summary["lost_unattributed"]) == (0, 0, 0)
    assert summary["attribution_invalid"] == 0


@pytest_twisted.inlineCallbacks
def test_losses_against_coturn_are_unattributed(coturn: tuple[str, int]) -> Generator[Any, Any, None]:
    """coturn does not say what it received: a loss can be counted, not placed."""
    from twisted.internet import reactor
    from twisted.internet.protocol import DatagramProtocol

    from nettester.protocols.stun.client import StunClientService
    from nettester.protocols.stun.fleet import FleetConfig

    class EveryThirdResponseDropped(DatagramProtocol):
        def __init__(self) -> None:
            self.origin: dict[bytes, Any] = {}
            self.responses = 0

        def datagramReceived(self, datagram: bytes, addr: Any) -> None:
            if addr == coturn:
                self.responses += 1
                if self.responses % 3 and datagram[8:20] in self.origin:
                    self.transport.write(datagram, self.origin[datagram[8:20]])
            else:
                self.origin[datagram[8:20]] = addr
                self.transport.write(datagram, coturn)

    relay = reactor.listenUDP(0, EveryThirdResponseDropped(), interface="127.0.0.1")
    config = FleetConfig(clients=5, interval=0.2, start_delay=(0.0, 0.1))
    fleet = StunClientService(reactor, "127.0.0.1", relay.getHost().port, config, rng=random.Random(6))
    fleet.startService()
    try:
        yield wait_until(lambda: fleet.counters.lost.get("unattributed") >= 3, timeout=30.0, step=0.05)
    finally:
        yield fleet.stopService()
        relay.stopListening()
    summary = fleet.summary()
    assert summary["lost_unattributed"] >= 3
    assert (summary["lost_forward"], summary["lost_return"], summary["attribution_invalid"]) == (0, 0, 0)


@pytest.fixture
def our_server() -> Iterator[tuple[int, int]]:
    """Our stun-server as a separate process, RFC 5780 on 127.0.0.1 and 127.0.0.2: (port, other port)."""
    (port,), (other_port,) = free_ports(), free_ports(host="127.0.0.2")
    command = [sys.executable, "-m", "nettester", "stun-server", "--port", str(port), "--interface", "127.0.0.1",
               "--other-address", f"127.0.0.2:{other_port}", "--stats-interval", "0"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until_answering(("127.0.0.1", port), process)
        yield port, other_port
    finally:
        stop(process)


def test_turnutils_stunclient_reads_our_rfc5780_answers(our_server: tuple[int, int]) -> None:
    stunclient = require("turnutils_stunclient")
    port, other_port = our_server
    result = subprocess.run(
        [stunclient, "-f", "-p", str(port), "127.0.0.1"], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "UDP reflexive addr: 127.0.0.1:" in result.stdout
    assert f"Response origin: : 127.0.0.1:{port}" in result.stdout
    assert f"Other addr: : 127.0.0.2:{other_port}" in result.stdout


def test_debian_stun_client_classifies_loopback_as_open(our_server: tuple[int, int]) -> None:
    """The RFC 3489 client (no magic cookie) runs all its tests against our RFC 5780 server."""
    stun = require("stun")
    port, other_port = our_server
    result = subprocess.run([stun, f"127.0.0.1:{port}", "-v"], capture_output=True, text=True, timeout=20)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output  # its NAT type code: 1 = open, no NAT
    assert "Primary: Open" in output
    for test in ("test I = 1", "test II = 1", "test III = 1", "test I(2) = 1"):
        assert test in output
    assert f"ChangedAddress = 127.0.0.2:{other_port}" in output
    assert "claims attribute is larger" not in output


def test_aioice_parses_our_responses(our_server: tuple[int, int]) -> None:
    aioice_stun = (
        pytest.importorskip("aioice.stun") if os.environ.get("CI") != "true" else __import__("aioice.stun").stun
    )
    port, other_port = our_server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        for fingerprint in (False, True):
            transaction_id = random.randbytes(12)
            request = Message(Method.BINDING, MessageClass.REQUEST, transaction_id).encode(fingerprint=fingerprint)
            sock.sendto(request, ("127.0.0.1", port))
            data = sock.recv(2048)
            parsed = aioice_stun.parse_message(data)  # raises on a bad FINGERPRINT
            assert parsed.transaction_id == transaction_id
            assert parsed.message_class == aioice_stun.Class.RESPONSE
            assert parsed.attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()
            assert parsed.attributes["MAPPED-ADDRESS"] == sock.getsockname()
            assert ("FINGERPRINT" in parsed.attributes) == fingerprint
            assert decode(data).get(AttributeType.OTHER_ADDRESS) == Address("127.0.0.2", other_port)
        # A tester's request: the answer carries NETTESTER-RECEIVED, which aioice skips as unknown.
        transaction_id = random.randbytes(12)
        sock.sendto(tagged_binding_request(transaction_id, bytes(8), 1), ("127.0.0.1", port))
        data = sock.recv(2048)
        assert decode(data).find(NETTESTER_RECEIVED) is not None
        parsed = aioice_stun.parse_message(data)
        assert parsed.transaction_id == transaction_id
        assert parsed.attributes["XOR-MAPPED-ADDRESS"] == sock.getsockname()
