"""``--workers 2`` on the real kernel over loopback: merged counters, a restarted worker, CID steering.

The server runs as a real ``nettester coap-server --workers 2`` process tree;
its JSON log lines (summaries, workers started and ended with their last
summary) are what the assertions read. Every wait is bounded.
"""

from __future__ import annotations

import os
import random
import signal
import socket
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from nettester.nat.console import NatRoleService
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable
from nettester.protocols.coap.message import Code, decode
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from tests.loopback import free_ports, wait_until
from tests.processes import TIMEOUT, Answers, LoggedProcess, get_request, metric


class WorkerServer(LoggedProcess):
    """``nettester coap-server --workers 2 ...``."""

    def __init__(self, *arguments: str) -> None:
        self.port = self._free_base_port()
        super().__init__("coap-server", "--workers", "2", "--port", str(self.port), "--interfaces", "127.0.0.1",
                         "--stats-interval", "0.3", *arguments)

    @staticmethod
    def _free_base_port() -> int:
        for _ in range(50):
            base = random.randrange(20000, 60000)
            try:
                for offset in (0, 1, 100, 101):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                        probe.bind(("127.0.0.1", base + offset))
                return base
            except OSError:
                continue
        raise AssertionError("no free base port")

    def started_pids(self) -> list[int]:
        return [record["pid"] for record in self.of("worker_started")]


def exchange(sockets: list[socket.socket], port: int, first_mid: int) -> None:
    """One GET from each socket; every one is answered (2.05 with the request's MID)."""
    for number, sock in enumerate(sockets):
        mid = first_mid + number
        sock.sendto(get_request(mid), ("127.0.0.1", port))
        answer = decode(sock.recv(2048))
        assert (answer.mid, answer.code) == (mid, Code.CONTENT)


@pytest.fixture
def clients() -> Generator[list[socket.socket], None, None]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(TIMEOUT)
    yield sockets
    for sock in sockets:
        sock.close()


def test_merged_counters_survive_a_killed_worker_and_equal_the_sum_of_the_parts(clients: list[socket.socket]
                                                                                 ) -> None:
    metrics_port = free_ports(1, socket.SOCK_STREAM)[0]
    server = WorkerServer("--metrics-port", str(metrics_port), "--metrics-interface", "127.0.0.1")
    try:
        server.wait(lambda: len(server.started_pids()) == 2)
        exchange(clients, server.port, 1)
        server.wait(lambda: any(s.get("received", 0) >= 16 for s in server.of("summary")))
        # the merged /metrics sums the live workers' counters
        server.wait(lambda: metric(metrics_port, "nettester_coap_server_received_total") >= 16)

        os.kill(server.started_pids()[0], signal.SIGKILL)
        server.wait(lambda: len(server.started_pids()) == 3)
        assert server.of("worker_restarting")[0]["index"] == 0
        exchange(clients, server.port, 100)
        server.wait(lambda: any(s.get("received", 0) >= 32 and s["restarts"] == 1 for s in server.of("summary")))
        server.wait(lambda: metric(metrics_port, "nettester_workers_live") == 2)
        assert metric(metrics_port, "nettester_workers_restarts_total") == 1
    finally:
        server.stop()
    received = [s.get("received", 0) for s in server.of("summary") + server.of("final_summary")]
    assert received == sorted(received), "merged counters never go down"
    final = server.of("final_summary")[0]
    parts = [record["worker_summary"] for record in server.of("worker_ended")]
    assert len(parts) == 3  # the killed worker's last report, and the two that stopped
    for key in ("received", "sent", "duplicates", "malformed"):
        assert final[key] == sum(part[key] for part in parts), key
    assert final["received"] >= 32 and final["restarts"] == 1


@pytest_twisted.inlineCallbacks
def test_coaps_sessions_stay_on_their_worker_through_nat_reassign_and_rebalance() -> Generator[Any, Any, None]:
    """20 PSK+CID sessions through the NAT emulator; ``reassign`` gives each a new source port (a new
    4-tuple hash): the kernel still steers its records to the worker named in CID byte 1."""
    server = WorkerServer("--dtls-only", "--psk-sandbox", "--plugtest")
    nat = None
    ports: list[Any] = []
    try:
        yield wait_until(lambda: len(server.started_pids()) == 2, timeout=TIMEOUT)
        coaps_port = server.port + 1
        table = NatTable([], rng=random.Random(5))
        nat = NatRoleService(reactor, NatProxy(reactor, table, DropPolicy(), ("127.0.0.1", 0),
                                               [f"127.0.0.1:{coaps_port}"]))
        nat.startService()
        clients = []
        for _ in range(20):
            answers = Answers()
            endpoint = DtlsEndpoint(reactor, client_configuration=DtlsConfiguration(
                is_client=True, psk_identity=b"Client_identity", psk=b"secretPSK", cid_length=6), receiver=answers)
            ports.append(reactor.listenUDP(0, endpoint, interface="127.0.0.1"))
            peer = yield endpoint.connect(("127.0.0.1", nat.proxy.port)).addTimeout(TIMEOUT, reactor)
            clients.append((endpoint, peer, answers))
        mid = 1
        for step in ("start", "reassign", "rebalance", "reassign"):
            if step != "start":
                yield nat.console.execute(step)
            for endpoint, peer, answers in clients:
                endpoint.send_datagram(get_request(mid), peer)
                answer = decode((yield answers.queue.get().addTimeout(TIMEOUT, reactor)))
                assert (answer.mid, answer.code) == (mid, Code.CONTENT), f"answered after {step}"
                mid += 1
    finally:
        if nat is not None:
            yield nat.stopService()
        for port in ports:
            yield port.stopListening()
        server.stop()
    parts = [record["worker_summary"] for record in server.of("worker_ended")]
    assert len(parts) == 2
    assert sum(part["dtls_handshakes"] for part in parts) == 20, "no session needed a second handshake"
    assert all(part["dtls_handshakes"] > 0 for part in parts), "the hash spread the handshakes"
    for part in parts:  # per worker: 0 cross-worker anything
        assert part["dtls_dropped"] == 0, "no record reached a worker without its session"
        assert part["dtls_failures"] == 0 and part["malformed"] == 0
        # Each session's 4 requests (one per NAT step) reached the worker that made its handshake.
        assert part["received"] == 4 * part["dtls_handshakes"], part
    final = server.of("final_summary")[0]
    assert (final["received"], final["dtls_handshakes"], final["dtls_dropped"]) == (80, 20, 0)
