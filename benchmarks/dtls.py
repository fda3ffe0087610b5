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

    python3 benchmarks/dtls.py
    python3 benchmarks/dtls.py --seconds 3 --concurrency 32
"""

from __future__ import annotations

import argparse
import datetime
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

from cryptography import x509
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
            endpoint.sendDatagram(data, peer)

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
        for datagram in engine.datagrams_to_send():
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
        """Feed datagrams and timers for C{seconds} or C{until()}; C{on_ready}
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
        certificate_time=lambda now: datetime.datetime.now(datetime.timezone.utc),  # now is monotonic here
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve"])
    parser.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window", type=int, default=8)
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
