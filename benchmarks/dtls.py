"""DTLS engine throughput on loopback, one core each side.

The server is the real ``DtlsEndpoint`` on the Twisted reactor in a child
process (PSK store, a P-256 certificate, CIDs, an echo receiver); the client
side is this process, driving ``DtlsConnection`` engines over plain
non-blocking sockets.  Three phases of --seconds each:

1. full handshakes/s with TLS_PSK_WITH_AES_128_CCM_8 (cookie exchange
   included), --concurrency handshakes in flight, each closed with
   close_notify when done;
2. the same with TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 (x25519, ECDSA P-256);
3. application data echoed over established CID sessions (CCM-8), a window
   of --window records in flight per session: records/s echoed.

Prints one line:
``dtls benchmark: handshakes/s psk-ccm8=N ecdhe-ecdsa=N; app-data echo records/s=N (concurrency=C)``

The ``loss`` mode measures loss recovery (RFC 6347 section 4.2.4) instead:
one PSK CCM-8 (or, with ``--suite ecdsa``, ECDHE-ECDSA CCM-8) handshake at
a time through a relay that loses a fixed set of datagrams (by their order
through it, both directions counted: --drop, default 4-7), for our client
and server, for ``openssl s_client``/``s_server`` and for
``gnutls-cli``/``gnutls-serv`` (each skipped when not installed),
alternating, --rounds times; every implementation at its default 1 s initial
retransmission timer.  One line: the median handshake time of each and
ours over the fastest other (below 1: faster)::

    python3 benchmarks/dtls.py
    python3 benchmarks/dtls.py --seconds 3 --concurrency 32
    python3 benchmarks/dtls.py loss --rounds 5
    python3 benchmarks/dtls.py loss --suite ecdsa --drop 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import ROOT

sys.path.insert(0, ROOT)

from nettester.protocols.dtls.certificates import issue, make_ca  # noqa: E402
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator  # noqa: E402
from nettester.protocols.dtls.connection import (  # noqa: E402
    ApplicationData,
    DtlsConfiguration,
    DtlsConnection,
)
from nettester.protocols.dtls.credentials import PskStore  # noqa: E402

PSK_IDENTITY, PSK = b"bench", b"benchmark-secret"
PSK_SUITE = "TLS_PSK_WITH_AES_128_CCM_8"
ECDSA_SUITE = "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"


def serve(certificate_path: str, key_path: str) -> None:
    """Child: a DtlsEndpoint echo server; prints its port, runs until stdin closes."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol
    from twisted.logger import LogLevel
    from zope.interface import implementer

    from nettester import logs
    from nettester.interfaces import IDatagramReceiver
    from nettester.protocols.dtls.endpoint import MAX_DATAGRAM, DtlsEndpoint

    logs.set_level(LogLevel.warn)
    with open(certificate_path, "rb") as handle:
        chain = x509.load_pem_x509_certificates(handle.read())
    with open(key_path, "rb") as handle:
        key = load_pem_private_key(handle.read(), None)
    endpoint = DtlsEndpoint(
        reactor,
        server_configuration=DtlsConfiguration(
            is_client=False,
            psk_store=PskStore({PSK_IDENTITY: PSK}),
            certificate_chain=chain,
            private_key=key,  # type: ignore[arg-type]
            cid_generator=NodeConnectionIdGenerator(6, 1),
        ),
        max_connections=100000,
    )

    @implementer(IDatagramReceiver)
    class Echo:
        def datagramReceived(self, data: bytes, peer: object) -> None:
            endpoint.send_datagram(data, peer)

    endpoint.receiver = Echo()
    port = reactor.listenUDP(0, endpoint, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
    handle = port.getHandle()
    handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)

    class StopOnEof(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(StopOnEof())
    sys.stdout.write("%d\n" % port.getHost().port)
    sys.stdout.flush()
    reactor.run()


class Driver:
    """Client engines over non-blocking sockets, one socket per engine."""

    def __init__(self, server: tuple[str, int], concurrency: int, make_config: Callable[[], DtlsConfiguration]) -> None:
        self.server = server
        self.make_config = make_config
        self.sockets: list[socket.socket] = []
        self.engines: dict[int, DtlsConnection] = {}
        self.poller = select.epoll()
        for _ in range(concurrency):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sockets.append(sock)
            self.poller.register(sock.fileno(), select.EPOLLIN)
        self.by_fd = {sock.fileno(): sock for sock in self.sockets}

    def start(self, sock: socket.socket, now: float) -> DtlsConnection:
        engine = DtlsConnection(self.make_config(), self.server)
        engine.connect(now)
        self.engines[sock.fileno()] = engine
        self.flush(sock, engine, now)
        return engine

    def flush(self, sock: socket.socket, engine: DtlsConnection, now: float) -> None:
        for datagram, _ in engine.datagrams_to_send():
            try:
                sock.sendto(datagram, self.server)
            except BlockingIOError:
                pass

    def run(
        self,
        seconds: float,
        on_ready: Callable[[socket.socket, DtlsConnection, float], None],
        until: Callable[[], bool] = lambda: False,
    ) -> None:
        """Feed datagrams and timers for ``seconds`` or ``until()``; ``on_ready``
        runs after every datagram a socket receives."""
        deadline = time.monotonic() + seconds
        while (now := time.monotonic()) < deadline and not until():
            for fd, _ in self.poller.poll(0.05):
                sock = self.by_fd[fd]
                engine = self.engines[fd]
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    engine.receive_datagram(data, self.server, now)
                    on_ready(sock, engine, now)
                    engine = self.engines[fd]
            for sock in self.sockets:
                engine = self.engines[sock.fileno()]
                timer = engine.get_timer()
                if timer is not None and timer <= now:
                    engine.handle_timer(now)
                    self.flush(sock, engine, now)
                    if engine.is_closed:
                        self.start(sock, now)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.poller.close()


def handshake_rate(
    server: tuple[str, int], seconds: float, concurrency: int, make_config: Callable[[], DtlsConfiguration]
) -> float:
    driver = Driver(server, concurrency, make_config)
    completed = 0
    now = time.monotonic()
    for sock in driver.sockets:
        driver.start(sock, now)

    def on_ready(sock: socket.socket, engine: DtlsConnection, now: float) -> None:
        nonlocal completed
        driver.flush(sock, engine, now)
        if engine.is_established:
            completed += 1
            engine.close()
            driver.flush(sock, engine, now)
            driver.start(sock, now)
        elif engine.is_closed:
            driver.start(sock, now)

    started = time.monotonic()
    driver.run(seconds, on_ready)
    elapsed = time.monotonic() - started
    driver.close()
    return completed / elapsed


def echo_rate(server: tuple[str, int], seconds: float, concurrency: int, window: int) -> float:
    driver = Driver(server, concurrency, psk_client)
    now = time.monotonic()
    for sock in driver.sockets:
        driver.start(sock, now)
    echoed = 0
    measuring = False
    primed: set[DtlsConnection] = set()

    def on_ready(sock: socket.socket, engine: DtlsConnection, now: float) -> None:
        nonlocal echoed
        while (event := engine.next_event()) is not None:
            if isinstance(event, ApplicationData):
                echoed += measuring
                engine.send_application_data(event.data)
        if engine.is_established and engine not in primed:
            primed.add(engine)
            for _ in range(window):
                engine.send_application_data(b"x" * 64)
        driver.flush(sock, engine, now)

    driver.run(10.0, on_ready, until=lambda: len(primed) == concurrency)  # establish and fill the windows
    assert all(engine.is_established for engine in driver.engines.values()), "sessions did not establish"
    assert all(engine.cid_negotiated for engine in driver.engines.values())
    measuring = True
    started = time.monotonic()
    driver.run(seconds, on_ready)
    elapsed = time.monotonic() - started
    driver.close()
    return echoed / elapsed


def psk_client() -> DtlsConfiguration:
    return DtlsConfiguration(is_client=True, cipher_suites=(PSK_SUITE,), psk_identity=PSK_IDENTITY, psk=PSK)


def ecdsa_client_factory(ca: x509.Certificate) -> Callable[[], DtlsConfiguration]:
    """Clients that verify the server's chain and name: a real client's cost."""
    return lambda: DtlsConfiguration(
        is_client=True, cipher_suites=(ECDSA_SUITE,), trust_anchors=[ca], server_name="localhost",
        certificate_time=lambda now: datetime.datetime.now(datetime.UTC),  # now is monotonic here
    )


# --- loss mode ----------------------------------------------------------------------------


class Relay(threading.Thread):
    """A UDP relay between one client and ``upstream`` that loses the
    datagrams whose 1-based order through it (both directions) is in ``drop``."""

    def __init__(self, upstream: tuple[str, int], drop: set[int]) -> None:
        super().__init__(daemon=True)
        self.upstream = upstream
        self.drop = drop
        self.count = 0
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.address = self.front.getsockname()
        self.client: tuple[str, int] | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            readable, _, _ = select.select([self.front, self.back], [], [], 0.05)
            for sock in readable:
                data, source = sock.recvfrom(65535)
                self.count += 1
                if sock is self.front:
                    self.client = source
                if self.count in self.drop:
                    continue
                if sock is self.front:
                    self.back.sendto(data, self.upstream)
                elif self.client is not None:
                    self.front.sendto(data, self.client)

    def stop(self) -> None:
        self.stopped.set()
        if self.ident is not None:
            self.join(timeout=2)
        self.front.close()
        self.back.close()


def _wait_for_output(process: subprocess.Popen[bytes], marker: bytes, limit: float) -> float | None:
    """Seconds until ``marker`` appears in the process's output, or None."""
    started = time.monotonic()
    buffer = b""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    os.set_blocking(fd, False)
    while time.monotonic() - started < limit:
        readable, _, _ = select.select([fd], [], [], 0.02)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            buffer += chunk
            if marker in buffer:
                return time.monotonic() - started
    return None


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _end(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait(timeout=5)


class LossCase:
    """What one loss-mode run handshakes with: ``psk`` (PSK CCM-8) or
    ``ecdsa`` (ECDHE-ECDSA CCM-8, a certificate flight that the MTU splits,
    the client verifying chain and name)."""

    def __init__(self, suite: str, directory: str, ca: x509.Certificate, certificate: str, key: str) -> None:
        self.suite = suite
        self.ca = ca
        self.ca_file = os.path.join(directory, "ca.pem")
        with open(self.ca_file, "wb") as handle:
            handle.write(ca.public_bytes(serialization.Encoding.PEM))
        self.certificate, self.key = certificate, key
        self.passwd = os.path.join(directory, "psk.passwd")
        with open(self.passwd, "w") as handle:
            handle.write("%s:%s\n" % (PSK_IDENTITY.decode(), PSK.hex()))

    @property
    def psk(self) -> bool:
        return self.suite == "psk"

    def our_client(self) -> DtlsConfiguration:
        return psk_client() if self.psk else ecdsa_client_factory(self.ca)()

    def openssl_server(self) -> list[str]:
        if self.psk:
            return ["-nocert", "-cipher", "PSK-AES128-CCM8", "-psk", PSK.hex(), "-psk_identity", PSK_IDENTITY.decode()]
        return ["-cert", self.certificate, "-key", self.key, "-cipher", "ECDHE-ECDSA-AES128-CCM8"]

    def openssl_client(self) -> list[str]:
        if self.psk:
            return ["-cipher", "PSK-AES128-CCM8", "-psk", PSK.hex(), "-psk_identity", PSK_IDENTITY.decode()]
        return ["-cipher", "ECDHE-ECDSA-AES128-CCM8", "-CAfile", self.ca_file, "-verify_return_error"]

    def gnutls_priority(self) -> str:
        kx = "+PSK" if self.psk else "+ECDHE-ECDSA"
        return "NONE:+VERS-DTLS1.2:%s:+AES-128-CCM-8:+AEAD:+SIGN-ALL:+COMP-NULL:+CURVE-ALL" % kx

    def gnutls_server(self) -> list[str]:
        if self.psk:
            return ["--pskpasswd", self.passwd]
        return ["--x509certfile", self.certificate, "--x509keyfile", self.key]

    def gnutls_client(self) -> list[str]:
        if self.psk:
            return ["--pskusername", PSK_IDENTITY.decode(), "--pskkey", PSK.hex()]
        return ["--x509cafile", self.ca_file, "--verify-hostname", "localhost"]


def time_ours(server: tuple[str, int], case: LossCase, drop: set[int], limit: float) -> float | None:
    relay = Relay(server, drop)
    relay.start()
    driver = Driver(relay.address, 1, case.our_client)
    try:
        started = time.monotonic()
        engine = driver.start(driver.sockets[0], started)
        driver.run(limit, driver.flush, until=lambda: engine.is_established)
        return time.monotonic() - started if engine.is_established else None
    finally:
        driver.close()
        relay.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def time_openssl(binary: str, case: LossCase, drop: set[int], limit: float) -> float | None:
    port = _free_port()
    server = _spawn([binary, "s_server", "-dtls1_2", "-4", "-accept", str(port)] + case.openssl_server())
    relay = Relay(("127.0.0.1", port), drop)
    try:
        if _wait_for_output(server, b"ACCEPT", 10.0) is None:
            return None
        relay.start()
        client = _spawn([binary, "s_client", "-dtls1_2", "-connect", "%s:%d" % relay.address] + case.openssl_client())
        try:
            return _wait_for_output(client, b"Cipher is", limit)
        finally:
            _end(client)
    finally:
        _end(server)
        relay.stop()


def time_gnutls(case: LossCase, drop: set[int], limit: float) -> float | None:
    port = _free_port()
    priority = case.gnutls_priority()
    server = _spawn(
        ["gnutls-serv", "--udp", "--port", str(port), "--echo", "--priority", priority] + case.gnutls_server()
    )
    relay = Relay(("127.0.0.1", port), drop)
    try:
        if _wait_for_output(server, b"listening on IPv4", 10.0) is None:
            return None
        relay.start()
        client = _spawn(
            ["gnutls-cli", "--udp", "--port", str(relay.address[1]), "--priority", priority]
            + case.gnutls_client()
            + ["127.0.0.1"]
        )
        try:
            return _wait_for_output(client, b"Handshake was completed", limit)
        finally:
            _end(client)
    finally:
        _end(server)
        relay.stop()


def parse_drop(text: str) -> set[int]:
    """``4-7,10``: the datagram numbers to lose."""
    numbers: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def loss_benchmark(server: tuple[str, int], case: LossCase, drop_text: str, rounds: int) -> str:
    drop, limit = parse_drop(drop_text), 60.0
    contenders: dict[str, Callable[[], float | None]] = {"ours": lambda: time_ours(server, case, drop, limit)}
    openssl = shutil.which("openssl")
    if openssl:
        contenders["openssl"] = lambda: time_openssl(openssl, case, drop, limit)
    if shutil.which("gnutls-cli") and shutil.which("gnutls-serv"):
        contenders["gnutls"] = lambda: time_gnutls(case, drop, limit)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_number in range(rounds):
        order = list(contenders) if round_number % 2 == 0 else list(reversed(contenders))  # alternate
        for name in order:
            elapsed = contenders[name]()
            if elapsed is not None:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items() if values}
    others = [value for name, value in medians.items() if name != "ours"]
    ratio = "ours/fastest-other=%.2f" % (medians["ours"] / min(others)) if "ours" in medians and others else ""
    return "dtls loss recovery (%s, datagrams %s lost): median handshake s %s; %s (%d rounds)" % (
        "PSK-CCM8" if case.psk else "ECDHE-ECDSA-CCM8",
        drop_text,
        " ".join("%s=%.2f" % (name, value) for name, value in medians.items()),
        ratio,
        rounds,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "loss", "serve"])
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="loss mode: alternating rounds (median)")
    parser.add_argument("--drop", default="4-7", help="loss mode: datagrams lost, by order through the relay")
    parser.add_argument("--suite", default="psk", choices=["psk", "ecdsa"], help="loss mode: what to handshake with")
    arguments = parser.parse_args()
    if arguments.mode == "serve":
        serve(*arguments.files)
        return
    ca = make_ca()
    workdir = tempfile.mkdtemp(prefix="dtls-bench-")
    certificate_path, key_path = os.path.join(workdir, "server.pem"), os.path.join(workdir, "server.key")
    issue(ca, "localhost").pem_files(certificate_path, key_path)
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve", certificate_path, key_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        server = ("127.0.0.1", int(child.stdout.readline()))
        if arguments.mode == "loss":
            case = LossCase(arguments.suite, workdir, ca.certificate, certificate_path, key_path)
            print(loss_benchmark(server, case, arguments.drop, max(1, arguments.rounds)))
            return
        psk = handshake_rate(server, arguments.seconds, arguments.concurrency, psk_client)
        ecdsa = handshake_rate(server, arguments.seconds, arguments.concurrency, ecdsa_client_factory(ca.certificate))
        echo = echo_rate(server, arguments.seconds, arguments.concurrency, arguments.window)
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        "dtls benchmark: handshakes/s psk-ccm8=%.0f ecdhe-ecdsa=%.0f; app-data echo records/s=%.0f (concurrency=%d)"
        % (psk, ecdsa, echo, arguments.concurrency)
    )


if __name__ == "__main__":
    main()
