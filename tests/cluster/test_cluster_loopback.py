"""Three cluster nodes behind the NAT emulator, on loopback, with a stand-in DTLS endpoint.

The stand-in answers every record with ``node=<id> via=<route>|<record>``;
the client sends ``tls12_cid`` records whose CID starts with the id of the
node that answered its first (handshake) record, as a real DTLS CID would.
After the NAT's ``clear``, ``reassign`` and ``rebalance`` the records land on
other nodes: the router must forward them to their owner, and the owner's
answers must come back through the node (and NAT port) the client talks to.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nettester.cluster.config import ClusterConfig
from nettester.cluster.node import ClusterNodeService, ForwardedRoute
from nettester.cluster.wire import TYPE_IN, ManagementCodec
from nettester.interfaces import IDatagramReceiver
from nettester.metrics import MetricSet
from nettester.nat.console import NatRoleService
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from tests.cluster.conftest import use_test_api_server
from tests.loopback import free_ports, wait_until
from tests.processes import Answers

pytestmark = pytest.mark.integration
TIMEOUT = 5.0
SECRET = b"cluster secret"
PSK_IDENTITY, PSK = b"Client_identity", b"secretPSK"


def cid_record(node_id: int, payload: bytes) -> bytes:
    """A tls12_cid record (RFC 9146 section 4) with a 6-byte CID owned by ``node_id``."""
    cid = bytes([node_id]) + b"cidxx"
    return bytes([25, 254, 253, 0, 1]) + bytes(6) + cid + len(payload).to_bytes(2, "big") + payload


HANDSHAKE = bytes([22, 254, 253, 0, 0]) + bytes(6) + (3).to_bytes(2, "big") + b"hello"


class StandInEndpoint(DatagramProtocol):
    """Stands in for the DTLS endpoint: answers ``node=<id> via=<route>|<datagram>``."""

    noisy = False

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.received: list[tuple[bytes, tuple[str, int], str | None]] = []

    def _answer(self, datagram: bytes, via: str | None) -> bytes:
        return b"node=%d via=%s|" % (self.node_id, (via or "public").encode()) + datagram

    def datagramReceived(self, datagram: bytes, client: Any) -> None:
        self.received.append((datagram, client, None))
        self.transport.write(self._answer(datagram, None), client)

    def routed_datagram_received(self, datagram: bytes, client: tuple[str, int], route: ForwardedRoute) -> None:
        self.received.append((datagram, client, route.name))
        route.send(self._answer(datagram, route.name), client)


class Client(DatagramProtocol):
    def __init__(self) -> None:
        self.answers: DeferredQueue[tuple[bytes, Any]] = DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.answers.put((data, addr))


class ClusterLab:
    """Three nodes (ids 1, 2, 3), each with ``endpoint(node_id)``, behind the NAT. In k8s mode
    they are pods 127.0.0.1-3 sharing one port pair, found through the test API server
    (``use_test_api_server``)."""

    def __init__(self, mode: str, secret: bytes | None = SECRET, backward: bool = True,
                 endpoint: Callable[[int], Any] = StandInEndpoint) -> None:
        ports = free_ports(6)
        self.management_ports, public_ports = ports[:3], ports[3:]
        self.endpoints = {node_id: endpoint(node_id) for node_id in (1, 2, 3)}
        self.nodes: dict[int, ClusterNodeService] = {}
        for index, node_id in enumerate((1, 2, 3)):
            own = ("127.0.0.1", self.management_ports[index])
            public = ("127.0.0.1", public_ports[index])
            others = {n: ("127.0.0.1", p)
                      for n, p in zip((1, 2, 3), self.management_ports, strict=True) if n != node_id}
            if mode == "static":
                config = ClusterConfig("static", node_id, public, own, nodes=others, secret=secret, backward=backward)
            elif mode == "dynamic":
                group = tuple(("localhost", p) for p in self.management_ports)
                config = ClusterConfig("dynamic", node_id, public, own, group=group, secret=secret, backward=backward)
            else:
                pod_ip = f"127.0.0.{node_id}"
                config = ClusterConfig("k8s", node_id, (pod_ip, public_ports[0]), (pod_ip, self.management_ports[0]),
                                       external_management_port=self.management_ports[0], secret=secret,
                                       backward=backward)
            self.nodes[node_id] = self._node(config)
        self.nat: NatRoleService | None = None
        self.client = Client()
        self.client_port: Any = None

    def _node(self, config: ClusterConfig) -> ClusterNodeService:
        return ClusterNodeService(reactor, config, self.endpoints[config.node_id], MetricSet(f"n{config.node_id}"))

    @pytest_twisted.inlineCallbacks
    def restart(self, node_id: int) -> Generator[Any, Any, None]:
        """Stop a node and start a new one with the same configuration (a pod restart)."""
        yield self.nodes[node_id].stopService()
        self.nodes[node_id] = self._node(self.nodes[node_id].config)
        self.nodes[node_id].startService()
        yield self.nodes[node_id].started

    @pytest_twisted.inlineCallbacks
    def start(self) -> Generator[Any, Any, None]:
        for node in self.nodes.values():
            node.startService()
            yield node.started
        destinations = [f"{node.config.dtls_address[0]}:{node.public_port}" for node in self.nodes.values()]
        table = NatTable([], rng=random.Random(3))
        proxy = NatProxy(reactor, table, DropPolicy(), ("127.0.0.1", 0), destinations)
        self.nat = NatRoleService(reactor, proxy)
        self.nat.startService()
        self.client_port = reactor.listenUDP(0, self.client, interface="127.0.0.1")

    @pytest_twisted.inlineCallbacks
    def exchange(self, datagram: bytes) -> Generator[Any, Any, tuple[int, str]]:
        """Send through the NAT; (answering node id, route) of the answer."""
        assert self.nat is not None
        self.client_port.write(datagram, ("127.0.0.1", self.nat.proxy.port))
        answer, source = yield self.client.answers.get().addTimeout(TIMEOUT, reactor)
        assert source == ("127.0.0.1", self.nat.proxy.port), "the client only ever sees the NAT's address"
        head, _, echoed = answer.partition(b"|")
        assert echoed == datagram
        node_text, via = head.decode().split()
        return int(node_text.split("=")[1]), via.split("=")[1]

    def receiving_node(self) -> int:
        """The node the NAT sends this client's datagrams to."""
        assert self.nat is not None
        destination = self.nat.proxy.table.destination_of(("127.0.0.1", self.client_port.getHost().port))
        return next(n for n, node in self.nodes.items()
                    if (node.config.dtls_address[0], node.public_port) == destination)

    @pytest_twisted.inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        if self.nat is not None:
            yield self.nat.stopService()
        if self.client_port is not None:
            yield self.client_port.stopListening()
        for node in self.nodes.values():
            yield node.stopService()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest_twisted.inlineCallbacks
def test_records_reach_their_owner_whatever_the_nat_does(mode: str) -> Generator[Any, Any, None]:
    lab = ClusterLab(mode)
    try:
        yield lab.start()
        if mode == "dynamic":
            yield wait_until(lambda: all(len(node.discovery.nodes()) == 2 for node in lab.nodes.values()))
            assert lab.nodes[1].discovery.nodes() == {2: ("127.0.0.1", lab.management_ports[1]),
                                                       3: ("127.0.0.1", lab.management_ports[2])}
        owner, via = yield lab.exchange(HANDSHAKE)
        assert via == "public" and owner == lab.receiving_node()
        assert (yield lab.exchange(cid_record(owner, b"first"))) == (owner, "public")
        forwarded_seen = 0
        for step, command in enumerate(["clear", "reassign", "rebalance", "rebalance", "rebalance", "reassign",
                                        "rebalance", "clear", "rebalance", "rebalance"]):
            yield lab.nat.console.execute(command)
            answering, via = yield lab.exchange(cid_record(owner, b"after %d" % step))
            assert answering == owner, f"the owner answers after {command}"
            expected_via = "public" if lab.receiving_node() == owner else "dtls-cid-router"
            assert via == expected_via
            forwarded_seen += via == "dtls-cid-router"
        assert forwarded_seen > 0, "some commands moved the client to another node"
        assert sum(node.router.forwarded for node in lab.nodes.values()) == forwarded_seen
        summaries = [node.summary() for node in lab.nodes.values()]
        assert all(summary["nodes"] == 2 for summary in summaries)
        assert sum(summary["forwarded"] for summary in summaries) == forwarded_seen
        assert sum(summary["forwarded_in"] for summary in summaries) == forwarded_seen
        assert sum(summary["backwarded"] for summary in summaries) == forwarded_seen
        # A CID of a node nobody knows is dropped and counted by the router that received it.
        lab.client_port.write(cid_record(9, b"nobody"), ("127.0.0.1", lab.nat.proxy.port))
        yield wait_until(lambda: sum(n.router.drops.get("unknown_node", 0) for n in lab.nodes.values()) == 1)
    finally:
        yield lab.stop()


@pytest_twisted.inlineCallbacks
def test_no_backward_answers_directly_from_the_owner() -> Generator[Any, Any, None]:
    lab = ClusterLab("static", backward=False)
    try:
        yield lab.start()
        owner, _ = yield lab.exchange(HANDSHAKE)
        for _ in range(10):
            yield lab.nat.console.execute("rebalance")
            if lab.receiving_node() != owner:
                break
        assert lab.receiving_node() != owner
        # The owner answers straight to the NAT's outgoing port, from its own public
        # address: the NAT counts an answer from another destination.
        lab.client_port.write(cid_record(owner, b"direct"), ("127.0.0.1", lab.nat.proxy.port))
        answer, _ = yield lab.client.answers.get().addTimeout(TIMEOUT, reactor)
        assert answer.startswith(b"node=%d via=dtls-cid-router|" % owner)
        assert lab.nat.proxy.table.violations == 1
    finally:
        yield lab.stop()


@pytest_twisted.inlineCallbacks
def test_forged_management_records_are_dropped_and_counted() -> Generator[Any, Any, None]:
    """An attacker on the management network cannot inject records for a chosen client address."""
    lab = ClusterLab("static")
    attacker = DatagramProtocol()
    attacker_port = reactor.listenUDP(0, attacker, interface="127.0.0.1")
    try:
        yield lab.start()
        target = ("127.0.0.1", lab.nodes[2].management_port)
        victim = ("198.51.100.7", 5684)
        for codec in (ManagementCodec(), ManagementCodec(b"guessed secret")):
            attacker_port.write(codec.encode_records(TYPE_IN, victim, cid_record(2, b"evil")), target)
        genuine = ManagementCodec(SECRET).encode_records(TYPE_IN, ("127.0.0.1", 9), cid_record(2, b"ok"))
        tampered = genuine[:4] + bytes([10, 0, 0, 66]) + genuine[8:]  # forged client address, genuine MAC
        attacker_port.write(tampered, target)
        attacker_port.write(genuine[:10], target)
        dropped = lab.nodes[2].management.dropped
        yield wait_until(lambda: dropped.total == 4)
        assert dropped.values == {"bad_mac": 3, "missing_mac": 1}
        assert lab.endpoints[2].received == []
        # The genuine record itself is accepted (a cluster member could have sent it).
        attacker_port.write(genuine, target)
        yield wait_until(lambda: len(lab.endpoints[2].received) == 1)
        assert lab.endpoints[2].received[0][1:] == (("127.0.0.1", 9), "dtls-cid-router")
    finally:
        yield attacker_port.stopListening()
        yield lab.stop()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest_twisted.inlineCallbacks
def test_a_restarted_node_is_found_again(mode: str) -> Generator[Any, Any, None]:
    lab = ClusterLab(mode)
    try:
        yield lab.start()
        if mode == "dynamic":
            yield wait_until(lambda: all(len(node.discovery.nodes()) == 2 for node in lab.nodes.values()))
        owner, _ = yield lab.exchange(HANDSHAKE)
        other = next(n for n in lab.nodes if n != owner)
        yield lab.restart(other)
        if mode == "dynamic":
            # The new node pings its group at once; the others answer with PONGs.
            yield wait_until(lambda: len(lab.nodes[other].discovery.nodes()) == 2)
        for _ in range(20):  # move the client onto the restarted node
            yield lab.nat.console.execute("rebalance")
            if lab.receiving_node() == other:
                break
        assert lab.receiving_node() == other
        assert (yield lab.exchange(cid_record(owner, b"after restart"))) == (owner, "dtls-cid-router")
        assert lab.nodes[other].router.forwarded == 1
    finally:
        yield lab.stop()


@pytest_twisted.inlineCallbacks
def test_kubernetes_mode_finds_the_pods_and_routes_records(api_server: Any, pod: Any, monkeypatch: pytest.MonkeyPatch
                                                            ) -> Generator[Any, Any, None]:
    """Pods 127.0.0.1-3 with one management port, listed by the test API server, learn each other's ids."""
    server, api_port, ca_pem, _ = api_server
    server.pods = [pod(f"coap-cluster-{n}", f"127.0.0.{n}") for n in (1, 2, 3)]
    use_test_api_server(monkeypatch, (server, api_port, ca_pem))
    lab = ClusterLab("k8s")
    try:
        yield lab.start()
        yield wait_until(lambda: all(len(node.discovery.nodes()) == 2 for node in lab.nodes.values()))
        management_port = lab.management_ports[0]
        assert lab.nodes[1].discovery.nodes() == {2: ("127.0.0.2", management_port),
                                                   3: ("127.0.0.3", management_port)}
        assert all(node.is_ready() for node in lab.nodes.values())
        owner, _ = yield lab.exchange(HANDSHAKE)
        routes = set()
        for step in range(12):
            yield lab.nat.console.execute("rebalance" if step % 2 else "reassign")
            answering, via = yield lab.exchange(cid_record(owner, b"k8s %d" % step))
            assert answering == owner
            routes.add(via)
        assert routes == {"public", "dtls-cid-router"}
    finally:
        yield lab.stop()


@implementer(IDatagramReceiver)
class ContextEcho:
    """The server side of a real DTLS node: answers with what ``mycontext`` would show."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.endpoint: DtlsEndpoint | None = None

    def datagramReceived(self, data: bytes, peer: Any) -> None:
        assert self.endpoint is not None
        context = self.endpoint.peer_context(peer)
        self.endpoint.send_datagram(b"node=%d cid-node=%d via=%s|" % (
            self.node_id, context.node_id, (context.via or "direct").encode()) + data, peer)


def dtls_node(node_id: int) -> DtlsEndpoint:
    """A node's DTLS endpoint: PSK, CIDs of 6 bytes starting with the node id."""
    echo = ContextEcho(node_id)
    echo.endpoint = DtlsEndpoint(
        reactor,
        server_configuration=DtlsConfiguration(
            is_client=False, psk_store=PskStore({PSK_IDENTITY: PSK}),
            cid_generator=NodeConnectionIdGenerator(6, node_id),
        ),
        receiver=echo,
    )
    return echo.endpoint


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest_twisted.inlineCallbacks
def test_a_dtls_session_survives_clear_reassign_and_rebalance(mode: str) -> Generator[Any, Any, None]:
    """Real DTLS 1.2 CID sessions (our engine) through the NAT and the cluster: one handshake, then every
    record reaches the node that owns the CID, whichever node the NAT sends it to."""
    yield check_dtls_session(ClusterLab(mode, endpoint=dtls_node))


@pytest_twisted.inlineCallbacks
def test_a_dtls_session_survives_in_kubernetes_mode(api_server: Any, pod: Any, monkeypatch: pytest.MonkeyPatch
                                                     ) -> Generator[Any, Any, None]:
    server, api_port, ca_pem, _ = api_server
    server.pods = [pod(f"coap-cluster-{n}", f"127.0.0.{n}") for n in (1, 2, 3)]
    use_test_api_server(monkeypatch, (server, api_port, ca_pem))
    yield check_dtls_session(ClusterLab("k8s", endpoint=dtls_node))


@pytest_twisted.inlineCallbacks
def check_dtls_session(lab: ClusterLab) -> Generator[Any, Any, None]:
    answers = Answers()
    client = DtlsEndpoint(reactor, client_configuration=DtlsConfiguration(
        is_client=True, psk_identity=PSK_IDENTITY, psk=PSK), receiver=answers)
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        yield lab.start()
        yield wait_until(lambda: all(len(node.discovery.nodes()) == 2 for node in lab.nodes.values()))
        peer = yield client.connect(("127.0.0.1", lab.nat.proxy.port)).addTimeout(TIMEOUT, reactor)
        client_nat_address = ("127.0.0.1", client_port.getHost().port)

        @pytest_twisted.inlineCallbacks
        def request(text: bytes) -> Generator[Any, Any, tuple[int, int, str]]:
            client.send_datagram(text, peer)
            answer = yield answers.queue.get().addTimeout(TIMEOUT, reactor)
            head, _, echoed = answer.partition(b"|")
            assert echoed == text
            node, cid_node, via = (field.split(b"=")[1] for field in head.split())
            return int(node), int(cid_node), via.decode()

        owner, cid_node, via = yield request(b"first")
        assert (cid_node, via) == (owner, "direct")
        forwarded = 0
        for step, command in enumerate(["rebalance", "reassign", "clear", "rebalance", "rebalance", "reassign",
                                        "rebalance", "clear", "rebalance", "rebalance"]):
            yield lab.nat.console.execute(command)
            answered_by, cid_node, via = yield request(b"after %s %d" % (command.encode(), step))
            assert (answered_by, cid_node) == (owner, owner), f"the owner answers after {command}"
            receiving = lab.nat.proxy.table.destination_of(client_nat_address)
            owner_public = (lab.nodes[owner].config.dtls_address[0], lab.nodes[owner].public_port)
            assert via == ("direct" if receiving == owner_public else "dtls-cid-router")
            forwarded += via == "dtls-cid-router"
        assert forwarded > 0
        # Another node restarts (a pod restart); the client is moved onto it: still the owner answers.
        other = next(node_id for node_id in lab.nodes if node_id != owner)
        yield lab.restart(other)
        yield wait_until(lambda: len(lab.nodes[other].discovery.nodes()) == 2)
        other_public = (lab.nodes[other].config.dtls_address[0], lab.nodes[other].public_port)
        for _ in range(30):
            if lab.nat.proxy.table.destination_of(client_nat_address) == other_public:
                break
            yield lab.nat.console.execute("rebalance")
        assert lab.nat.proxy.table.destination_of(client_nat_address) == other_public
        assert (yield request(b"after restart")) == (owner, owner, "dtls-cid-router")
        assert sum(endpoint.counters.handshakes.value for endpoint in lab.endpoints.values()) == 1
        assert len(client.connections) == 1
    finally:
        yield client_port.stopListening()
        yield lab.stop()
