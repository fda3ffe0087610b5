"""Cluster nodes of several workers (``coap-server --workers N --dtls-cluster ...``) on the real kernel.

Each node is a real ``nettester coap-server`` process tree on 127.0.0.1, our
coaps clients (PSK, CID) reach the nodes through the NAT emulator, and the
assertions read the nodes' JSON log lines: the parents' merged summaries and,
at the end, every worker's own last summary (``worker_ended``). A session's
records must reach the worker that holds it, whichever node the NAT sends
them to: from the DTLS port (the CID steering program) or forwarded by the
other node (the management port's program), and after a node or a worker is
lost, at the worker of the other node that holds its replica.
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Container, Generator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from nettester.nat.console import NatRoleService
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable
from nettester.protocols.coap.message import Code, decode
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.endpoint import DtlsEndpoint, DtlsPeer
from tests.loopback import free_ports, wait_until
from tests.processes import TIMEOUT, Answers, LoggedProcess, get_request, metric

pytestmark = pytest.mark.integration
SECRET = "cluster secret"
NAT_STEPS = ("start", "rebalance", "reassign", "rebalance", "reassign")

# Declares a silent node lost within about 3 s instead of 10 s, in every process of the tree (the parent
# re-executes the role for each worker, so the test's own monkeypatch cannot reach them).
FAST_DISCOVERY = """\
from nettester.cluster import nodes
nodes.TIMER_INTERVAL, nodes.PING_AFTER, nodes.REMOVE_AFTER = 0.5, 1.0, 1.5
"""


class Node(LoggedProcess):
    """Cluster node ``node_id`` of ``workers`` workers: public port ``ports[node_id][0]``, management ``[1]``."""

    def __init__(self, node_id: int, ports: Mapping[int, tuple[int, int]], mode: str, workers: int = 2,
                 env: Mapping[str, str] | None = None, metrics_port: int = 0) -> None:
        self.node_id = node_id
        self.public_port, self.management_port = ports[node_id]
        own = f"127.0.0.1:{self.public_port};127.0.0.1:{self.management_port};{node_id}"
        if mode == "static":
            others = [f"---;127.0.0.1:{management};{other}"
                      for other, (_, management) in ports.items() if other != node_id]
            cluster = ["--dtls-cluster", ",".join([own, *others])]
        else:
            group = ",".join(f"127.0.0.1:{management}" for _, management in ports.values())
            cluster = ["--dtls-cluster", own, "--dtls-cluster-group", group]
        metrics = ["--metrics-port", str(metrics_port), "--metrics-interface", "127.0.0.1"] if metrics_port else []
        super().__init__("coap-server", "--workers", str(workers), "--port", str(free_ports(1)[0]),
                         "--interfaces", "127.0.0.1", "--dtls-only", "--no-plugtest", "--psk-sandbox",
                         "--stats-interval", "0.3", "--dtls-cluster-group-security", SECRET, *cluster, *metrics,
                         env=env)
        self.workers = workers

    def summary(self) -> dict[str, Any]:
        """The parent's last merged summary ({} before the first)."""
        summaries = self.of("summary")
        return summaries[-1] if summaries else {}

    def started(self) -> bool:
        return len(self.of("worker_started")) >= self.workers

    def parts(self) -> dict[int, dict[str, Any]]:
        """Each worker's last summary, by index, once the node stopped."""
        return {record["index"]: record["worker_summary"] for record in self.of("worker_ended")}

    def crash(self) -> None:
        """SIGKILL every worker, then the parent: no close_notify, no final summary (a lost machine)."""
        for record in self.of("worker_started"):
            os.kill(record["pid"], signal.SIGKILL)
        self.process.kill()
        self.process.wait(TIMEOUT)


def node_ports(*node_ids: int) -> dict[int, tuple[int, int]]:
    ports = free_ports(2 * len(node_ids))
    return {node_id: (ports[2 * i], ports[2 * i + 1]) for i, node_id in enumerate(node_ids)}


class Clients:
    """``count`` coaps clients (PSK sandbox identity, CIDs both ways) behind the NAT, in the test's reactor."""

    def __init__(self, count: int, nodes: list[Node]) -> None:
        self.count = count
        self.nodes = nodes
        self.nat: NatRoleService | None = None
        self.ports: list[Any] = []
        self.sessions: list[tuple[DtlsEndpoint, DtlsPeer, Answers]] = []
        self.mid = 1

    @pytest_twisted.inlineCallbacks
    def connect(self) -> Generator[Any, Any, None]:
        destinations = [f"127.0.0.1:{node.public_port}" for node in self.nodes]
        self.nat = NatRoleService(reactor, NatProxy(reactor, NatTable([], rng=random.Random(7)), DropPolicy(),
                                                    ("127.0.0.1", 0), destinations))
        self.nat.startService()
        for _ in range(self.count):
            answers = Answers()
            endpoint = DtlsEndpoint(reactor, client_configuration=DtlsConfiguration(
                is_client=True, psk_identity=b"Client_identity", psk=b"secretPSK", cid_length=6), receiver=answers)
            self.ports.append(reactor.listenUDP(0, endpoint, interface="127.0.0.1"))
            peer = yield endpoint.connect(("127.0.0.1", self.nat.proxy.port)).addTimeout(TIMEOUT, reactor)
            self.sessions.append((endpoint, peer, answers))

    def cids(self) -> list[bytes]:
        """The server CID of each session: byte 0 its node, byte 1 its worker."""
        return [peer.connection.write_cid for _, peer, _ in self.sessions]

    @pytest_twisted.inlineCallbacks
    def request_all(self, what: str, skip: Container[int] = ()) -> Generator[Any, Any, None]:
        """One GET per session (but those in ``skip``), each answered (2.05, its MID)."""
        for index, (endpoint, peer, answers) in enumerate(self.sessions):
            if index in skip:
                continue
            endpoint.send_datagram(get_request(self.mid, b"myip"), peer)  # a cluster node serves the extended ones
            answer = decode((yield answers.queue.get().addTimeout(TIMEOUT, reactor)))
            assert (answer.mid, answer.code) == (self.mid, Code.CONTENT), f"answered {what}"
            self.mid += 1

    def destination(self, index: int) -> int:
        """The public port the NAT sends session ``index``'s datagrams to."""
        assert self.nat is not None
        return int(self.nat.proxy.table.destination_of(("127.0.0.1", self.ports[index].getHost().port))[1])

    def handshakes(self) -> int:
        return sum(endpoint.counters.handshakes.value for endpoint, _, _ in self.sessions)

    @pytest_twisted.inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        if self.nat is not None:
            yield self.nat.stopService()
        for port in self.ports:
            yield port.stopListening()


@defer.inlineCallbacks
def both_running(nodes: list[Node]) -> Generator[Any, Any, None]:
    """Every worker of both nodes started (workers start one after another: twice the usual bound), and each
    node knowing the other; a failure shows each node's last lines."""
    try:
        yield wait_until(lambda: all(node.started() for node in nodes), 2 * TIMEOUT, 0.02, "every worker started")
        yield wait_until(lambda: all(node.summary().get("nodes") == 1 for node in nodes), TIMEOUT, 0.02,
                         "each node knows the other")
    except AssertionError as error:
        tails = "\n".join(f"node {node.node_id}: {json.dumps(event)}" for node in nodes for event in node.events[-10:])
        raise AssertionError(f"{error}; last log lines:\n{tails}") from None


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest_twisted.inlineCallbacks
def test_each_session_stays_on_its_worker_whichever_node_the_nat_picks(mode: str) -> Generator[Any, Any, None]:
    """Two nodes of 2 workers; the NAT's ``rebalance`` and ``reassign`` send records to the other node and
    from new ports: forwarded or not, every record reaches the worker holding its session (0 cross-worker)."""
    ports = node_ports(1, 2)
    metrics_port = free_ports(1)[0]
    nodes = [Node(1, ports, mode, metrics_port=metrics_port), Node(2, ports, mode)]
    clients = Clients(20, nodes)
    try:
        yield both_running(nodes)
        yield clients.connect()
        for step in NAT_STEPS:
            if step != "start":
                yield clients.nat.console.execute(step)  # type: ignore[union-attr]
            yield clients.request_all(f"after {step}")
        # The parent's /metrics sums its workers' counters, as its summary line does.
        yield wait_until(lambda: 0 < nodes[0].summary().get("forwarded_in", 0) == metric(
            metrics_port, "nettester_coap_server_forwarded_in_total"), TIMEOUT, 0.05, "merged metrics")
    finally:
        yield clients.stop()
        for node in nodes:
            node.stop()
    assert clients.handshakes() == 20, "no session needed a second handshake"
    cids = clients.cids()
    forwarded_in = 0
    for node in nodes:
        parts = node.parts()
        assert sorted(parts) == [0, 1]
        for worker, part in parts.items():
            sessions = sum(1 for cid in cids if (cid[0], cid[1]) == (node.node_id, worker))
            assert part["dtls_handshakes"] == sessions, "worker w of node n issued the CIDs n, w, ..."
            # Every record of its sessions, forwarded by the other node or not, and no other, reached it.
            assert part["received"] == len(NAT_STEPS) * sessions, (node.node_id, worker, part)
            assert part["dtls_dropped"] == part["dtls_failures"] == part["malformed"] == 0, part
            assert part["management_dropped"] == part["router_dropped"] == 0, part
            assert part["nodes"] == 1, "every worker knows the other node"
        final = node.of("final_summary")[0]
        assert final["nodes"] == 1, "the other node counts once, not once per worker"
        for key in ("received", "forwarded", "forwarded_in", "backwarded", "dtls_handshakes"):
            assert final[key] == sum(part[key] for part in parts.values()), key
        forwarded_in += final["forwarded_in"]
    assert forwarded_in > 0, "the NAT sent records to the node that does not hold their session"
    assert sum(node.of("final_summary")[0]["forwarded"] for node in nodes) == forwarded_in
    assert any(all(part["dtls_handshakes"] > 0 for part in node.parts().values()) for node in nodes), \
        "both workers of a node held sessions (else the steering between them went untested)"


@pytest_twisted.inlineCallbacks
def test_a_lost_nodes_sessions_are_adopted_by_the_right_worker_without_a_new_handshake(
        tmp_path: Path) -> Generator[Any, Any, None]:
    """Node 1 (3 workers) replicates to node 2 (2 workers), then crashes: node 2's worker ``CID byte 1 mod 2``,
    which the kernel sends the replica and the session's records to, adopts each of node 1's sessions."""
    (tmp_path / "sitecustomize.py").write_text(FAST_DISCOVERY)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    ports = node_ports(1, 2)
    lost, heir = Node(1, ports, "dynamic", workers=3, env=env), Node(2, ports, "dynamic", env=env)
    clients = Clients(16, [lost, heir])
    try:
        yield wait_until(lambda: lost.started() and heir.started(), TIMEOUT, 0.02, "every worker started")
        yield wait_until(lambda: lost.summary().get("nodes") == heir.summary().get("nodes") == 1, TIMEOUT, 0.02,
                         "each node knows the other")
        yield clients.connect()
        yield clients.request_all("before the loss")
        owned = [cid for cid in clients.cids() if cid[0] == 1]
        assert owned, "the NAT gave node 1 some sessions"
        yield wait_until(lambda: heir.summary().get("replicas") == len(owned), TIMEOUT, 0.02,
                         "node 2 holds node 1's replicas")
        lost.crash()
        yield clients.nat.console.execute(f"remove 127.0.0.1:{lost.public_port}")  # type: ignore[union-attr]
        yield wait_until(lambda: heir.summary().get("nodes") == 0, TIMEOUT, 0.02, "node 2 saw node 1 go")
        yield clients.request_all("after node 1 was lost")
    finally:
        yield clients.stop()
        lost.stop()
        heir.stop()
    assert clients.handshakes() == 16, "no new handshake"
    parts = heir.parts()
    for worker, part in parts.items():
        adopted = sum(1 for cid in owned if cid[1] % 2 == worker)
        assert part["taken_over"] == adopted, (worker, part)
        assert part["dtls_dropped"] == part["dtls_failures"] == 0, part
    final = heir.of("final_summary")[0]
    assert final["taken_over"] == len(owned)
    assert final["received"] == 2 * (16 - len(owned)) + len(owned), "node 2's sessions twice, node 1's once"


@pytest_twisted.inlineCallbacks
def test_a_killed_workers_sessions_are_answered_from_their_replicas() -> Generator[Any, Any, None]:
    """SIGKILL the worker of node 1 holding the most sessions: it is restarted, and its sessions' next
    records, which reach the new worker, are forwarded to node 2, whose worker holding the replicas adopts them."""
    ports = node_ports(1, 2)
    nodes = [Node(1, ports, "dynamic"), Node(2, ports, "dynamic")]
    clients = Clients(20, nodes)
    try:
        yield both_running(nodes)
        yield clients.connect()
        yield clients.request_all("before the kill")
        cids = clients.cids()
        victim = max((0, 1), key=lambda worker: sum(1 for cid in cids if cid[:2] == bytes((1, worker))))
        lost = [index for index, cid in enumerate(cids) if cid[:2] == bytes((1, victim))]
        yield wait_until(lambda: nodes[1].summary().get("replicas") == sum(1 for cid in cids if cid[0] == 1),
                         TIMEOUT, 0.02, "node 2 holds node 1's replicas")
        assert all(clients.destination(index) == nodes[0].public_port for index in lost), "no NAT move yet"
        pid = next(record["pid"] for record in nodes[0].of("worker_started") if record["index"] == victim)
        os.kill(pid, signal.SIGKILL)
        yield wait_until(lambda: nodes[0].summary().get("restarts") == 1 and nodes[0].summary().get("workers") == 2,
                         TIMEOUT, 0.02, "the killed worker restarted")
        yield clients.request_all("after the kill")
    finally:
        yield clients.stop()
        for node in nodes:
            node.stop()
    assert clients.handshakes() == 20, "no new handshake"
    heir = nodes[1].parts()
    assert heir[victim % 2]["taken_over"] == len(lost) and heir[1 - victim % 2]["taken_over"] == 0, heir
    received = [summary.get("received", 0) for summary in nodes[0].of("summary") + nodes[0].of("final_summary")]
    assert received == sorted(received), "node 1's merged counters never go down"
