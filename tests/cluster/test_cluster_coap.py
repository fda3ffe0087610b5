"""Issue 6's end-to-end proof: three ``coap-server`` nodes in a DTLS CID cluster behind ``nettester nat``.

The nodes are built exactly as the role builds them (``CoapServerOptions`` ->
``build_server``), the NAT has all three as destinations, and our coaps
client (PSK, CID) asks ``mycontext`` through the NAT. Whatever the NAT does
(``clear``, ``reassign``, ``rebalance``), the node that owns the CID answers
with the same node id and CID, through the router (``via``) when the NAT
sends the record to another node. A node stopped and started again is found
again, and ``coap-bench`` through the NAT and the cluster sees no
transmission error. Static, dynamic and Kubernetes mode, on loopback.
"""

from __future__ import annotations

import io
import json
import random
import socket
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from nettester.nat.console import NatRoleService
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable
from nettester.protocols.coap.bench import BenchConfig, CoapBenchService
from nettester.protocols.coap.client import build_request
from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.message import ContentFormat
from nettester.protocols.coap.options import CoapBenchOptions, CoapClientOptions, CoapServerOptions
from nettester.protocols.coap.roles import build_server
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from tests.cluster.conftest import use_test_api_server
from tests.logcapture import log_events
from tests.loopback import free_ports
from tests.loopback import wait_until as poll_until

pytestmark = pytest.mark.integration
TIMEOUT = 10.0  # generous: a loaded 2-core machine
NODES = (1, 2, 3)
VIA_ROUTER = "dtls-cid-router"


def wait_until(condition: Callable[[], bool]) -> Deferred[None]:
    """Poll every 20 ms for up to TIMEOUT (generous on a loaded machine)."""
    return poll_until(condition, TIMEOUT, 0.02)


class CoapCluster:
    """Three coap-server nodes (ids 1-3) and the NAT in front of them.

    k8s mode: pods 127.0.0.1-3 sharing one public and one management port,
    listed by the test API server ``kubernetes`` = (server, port, ca_pem).
    """

    def __init__(self, mode: str, monkeypatch: pytest.MonkeyPatch,
                 kubernetes: tuple[Any, int, bytes] | None = None) -> None:
        self.mode = mode
        self._kubernetes = kubernetes
        if kubernetes is not None:
            # The pods are listed by the test API server instead of the pod's service account.
            use_test_api_server(monkeypatch, kubernetes)
        ports = free_ports(6)
        management, public = ports[:3], ports[3:]
        self.options: dict[int, CoapServerOptions] = {}
        for index, node_id in enumerate(NODES):
            arguments = ["--interfaces", "127.0.0.1", "--port", "0", "--no-plugtest", "--dtls-only", "--benchmark",
                         "--psk-sandbox", "--dtls-cluster-group-security", "cluster secret"]
            own = f"127.0.0.1:{public[index]};127.0.0.1:{management[index]};{node_id}"
            if mode == "static":
                others = [f"---;127.0.0.1:{port};{n}"
                          for n, port in zip(NODES, management, strict=True) if n != node_id]
                arguments += ["--dtls-cluster", ",".join([own, *others])]
            elif mode == "dynamic":
                arguments += ["--dtls-cluster", own,
                              "--dtls-cluster-group", ",".join(f"localhost:{port}" for port in management)]
            else:
                pod_ip = f"127.0.0.{node_id}"
                arguments += ["--k8s-dtls-cluster", f"{pod_ip}:{public[0]};{pod_ip}:{management[0]};{management[0]}"]
                monkeypatch.setenv("KUBECTL_NODE_ID", str(node_id))
            options = CoapServerOptions()
            options.parseOptions(arguments)
            self.options[node_id] = options
        self.servers: dict[int, CoapServerService] = {}
        self.nat: NatRoleService | None = None

    @pytest_twisted.inlineCallbacks
    def start_node(self, node_id: int) -> Generator[Any, Any, None]:
        server = build_server(reactor, self.options[node_id])
        assert isinstance(server, CoapServerService)
        self.servers[node_id] = server
        server.startService()
        yield server.cluster_node.started
        assert server.failed is None

    @pytest_twisted.inlineCallbacks
    def start(self) -> Generator[Any, Any, None]:
        for node_id in NODES:
            yield self.start_node(node_id)
        destinations = [f"127.0.0.{n}:{self.public_port(n)}" if self.mode == "k8s"
                        else f"127.0.0.1:{self.public_port(n)}" for n in NODES]
        proxy = NatProxy(reactor, NatTable([], rng=random.Random(6)), DropPolicy(), ("127.0.0.1", 0), destinations)
        self.nat = NatRoleService(reactor, proxy)
        self.nat.startService()
        yield self.wait_for_discovery()

    def public_port(self, node_id: int) -> int:
        return int(self.servers[node_id].cluster_node.public_port)

    def public_address(self, node_id: int) -> tuple[str, int]:
        host = f"127.0.0.{node_id}" if self.mode == "k8s" else "127.0.0.1"
        return (host, self.public_port(node_id))

    @pytest_twisted.inlineCallbacks
    def wait_for_discovery(self) -> Generator[Any, Any, None]:
        yield wait_until(lambda: all(len(server.cluster_node.discovery.nodes()) == 2
                                     for server in self.servers.values()))

    @property
    def nat_address(self) -> tuple[str, int]:
        assert self.nat is not None
        return ("127.0.0.1", self.nat.proxy.port)

    def receiving_node(self, client: tuple[str, int]) -> int:
        """The node the NAT sends this client's datagrams to."""
        assert self.nat is not None
        destination = self.nat.proxy.table.destination_of(client)
        return next(n for n in NODES if self.public_address(n) == destination)

    @pytest_twisted.inlineCallbacks
    def restart(self, node_id: int) -> Generator[Any, Any, None]:
        """Stop a node and start it again with the same options (a pod restart)."""
        yield self.servers[node_id].stopService()
        yield self.start_node(node_id)
        yield self.wait_for_discovery()

    @pytest_twisted.inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        if self.nat is not None:
            yield self.nat.stopService()
        yield gatherResults([server.stopService() for server in self.servers.values() if server.running])

    def summaries(self) -> list[dict[str, Any]]:
        return [server.summary() for server in self.servers.values()]


class CoapsClient:
    """Our coaps client (PSK sandbox identity, CID), configured through the coap-client options."""

    def __init__(self, target: tuple[str, int]) -> None:
        options = CoapClientOptions()
        options.parseOptions(["--psk-sandbox", f"coaps://{target[0]}:{target[1]}/mycontext"])
        self.uri = options["uri"]
        self.link = DtlsEndpoint(reactor, client_configuration=options["dtls"])
        self.endpoint = CoapEndpoint(self.link, reactor)
        self.port = reactor.listenUDP(0, self.link, interface="127.0.0.1")
        self.peer: Any = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port.getHost().port)

    @pytest_twisted.inlineCallbacks
    def mycontext(self) -> Generator[Any, Any, dict[str, Any]]:
        if self.peer is None:
            self.peer = yield self.link.connect(self.uri.address).addTimeout(TIMEOUT, reactor)
        request = build_request(self.uri, "GET", accept=ContentFormat.JSON)
        answer = yield self.endpoint.request(self.peer, request, timeout=TIMEOUT)
        assert answer.response.code == 0x45, "2.05 Content"
        return json.loads(answer.response.payload)

    def stop(self) -> Any:
        self.endpoint.stop()
        return self.port.stopListening()


@pytest_twisted.inlineCallbacks
def check_sessions_survive_the_nat(cluster: CoapCluster) -> Generator[Any, Any, None]:
    """mycontext through the NAT: same node id and CID whatever the NAT does, via the router when moved."""
    client = CoapsClient(cluster.nat_address)
    try:
        first = yield client.mycontext()
        owner, cid = first["node-id"], first["read-cid"]
        assert first["peer"] == "Client_identity" and "via" not in first
        assert len(cid) == 12 and cid[:2] == "%02x" % owner, "a 6-byte CID starting with the node id"
        assert owner == cluster.receiving_node(client.address)
        forwarded = 0
        for command in ["clear", "reassign", "rebalance", "rebalance", "clear", "reassign", "rebalance",
                        "rebalance", "reassign", "rebalance"]:
            yield cluster.nat.console.execute(command)
            context = yield client.mycontext()
            assert (context["node-id"], context["read-cid"]) == (owner, cid), f"the owner answers after {command}"
            moved = cluster.receiving_node(client.address) != owner
            assert context.get("via") == (VIA_ROUTER if moved else None), f"via after {command}"
            forwarded += moved
        assert forwarded > 0, "some commands moved the client to another node"
        summaries = cluster.summaries()
        assert all(summary["nodes"] == 2 for summary in summaries)
        assert sorted(summary["node_id"] for summary in summaries) == list(NODES)
        assert sum(summary["forwarded"] for summary in summaries) >= forwarded
        assert sum(summary["management_dropped"] for summary in summaries) == 0

        # Another node stops and starts again; the client is moved onto it: the owner still answers.
        other = next(node_id for node_id in NODES if node_id != owner)
        yield cluster.restart(other)
        for _ in range(40):
            if cluster.receiving_node(client.address) == other:
                break
            yield cluster.nat.console.execute("rebalance")
        assert cluster.receiving_node(client.address) == other
        context = yield client.mycontext()
        assert (context["node-id"], context["read-cid"], context["via"]) == (owner, cid, VIA_ROUTER)
        assert sum(server.summary()["forwarded"] for server in cluster.servers.values()) >= 1
        handshakes = sum(endpoint.link.counters.handshakes.value for server in cluster.servers.values()
                         for endpoint in server.endpoints)
        assert handshakes == 1, "one handshake for the whole session"
    finally:
        yield client.stop()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest_twisted.inlineCallbacks
def test_coaps_sessions_survive_clear_reassign_rebalance_and_a_restart(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> Generator[Any, Any, None]:
    cluster = CoapCluster(mode, monkeypatch)
    try:
        yield cluster.start()
        yield check_sessions_survive_the_nat(cluster)
    finally:
        yield cluster.stop()


@pytest_twisted.inlineCallbacks
def test_coaps_sessions_survive_in_kubernetes_mode(api_server: Any, pod: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> Generator[Any, Any, None]:
    server, api_port, ca_pem, _ = api_server
    server.pods = [pod(f"coap-cluster-{n}", f"127.0.0.{n}") for n in NODES]
    cluster = CoapCluster("k8s", monkeypatch, kubernetes=(server, api_port, ca_pem))
    try:
        yield cluster.start()
        assert all(s.is_ready() for s in cluster.servers.values())
        yield check_sessions_survive_the_nat(cluster)
    finally:
        yield cluster.stop()


def cluster_in(mode: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> CoapCluster:
    """A cluster in ``mode``; in k8s mode its three pods are listed by the test API server."""
    kubernetes = None
    if mode == "k8s":
        server, api_port, ca_pem, _ = request.getfixturevalue("api_server")
        server.pods = [request.getfixturevalue("pod")(f"coap-cluster-{n}", f"127.0.0.{n}") for n in NODES]
        kubernetes = (server, api_port, ca_pem)
    return CoapCluster(mode, monkeypatch, kubernetes=kubernetes)


@pytest.mark.parametrize("mode", ["static", "dynamic", "k8s"])
@pytest_twisted.inlineCallbacks
def test_coap_bench_through_nat_and_cluster_has_no_transmission_error(
        mode: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Generator[Any, Any, None]:
    cluster = cluster_in(mode, monkeypatch, request)
    bench: CoapBenchService | None = None
    try:
        yield cluster.start()
        host, port = cluster.nat_address
        options = CoapBenchOptions()
        options.parseOptions(["--psk-sandbox", "--clients", "6", "--requests", "40",
                              f"coaps://{host}:{port}/benchmark?rlen=40"])
        config = BenchConfig(uri=options["uri"], clients=6, requests=40, report_interval=0, timeout=TIMEOUT)
        out = io.StringIO()
        bench = CoapBenchService(reactor, config, lambda: DtlsEndpoint(reactor, client_configuration=options["dtls"]),
                                 out, rng=random.Random(1))
        bench.startService()
        # Move the clients between nodes while they run: their records must be forwarded, none lost.
        yield wait_until(lambda: bench.stats.responses >= 60)
        yield cluster.nat.console.execute("rebalance")
        yield wait_until(lambda: bench.stats.responses >= 150)
        yield cluster.nat.console.execute("rebalance")
        status = yield bench.done.addTimeout(3 * TIMEOUT, reactor)
        assert status == 0
        assert bench.stats.responses == 6 * 40 and bench.stats.failures == 0, out.getvalue()
        assert "0 transmission errors" in out.getvalue()
        assert sum(summary["forwarded"] for summary in cluster.summaries()) > 0, "records were forwarded"
    finally:
        if bench is not None and bench.running:
            yield bench.stopService()
        yield cluster.stop()


@pytest_twisted.inlineCallbacks
def test_ready_probe_summary_and_the_warning_without_a_secret() -> Generator[Any, Any, None]:
    from twisted.web.client import Agent, readBody

    with log_events() as events:
        public, management = free_ports(2)
        (ready_port,) = free_ports(kind=socket.SOCK_STREAM)
        options = CoapServerOptions()
        options.parseOptions(["--interfaces", "127.0.0.1", "--port", "0", "--no-plugtest", "--psk-sandbox",
                              "--ready-port", str(ready_port), "--metrics-interface", "127.0.0.1",
                              "--dtls-cluster", f"127.0.0.1:{public};127.0.0.1:{management};7,---;127.0.0.1:9;8"])
        server = build_server(reactor, options)
        assert not server.is_ready()
        try:
            server.startService()
            yield server.cluster_node.started
            response = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/ready" % ready_port)
            body = yield readBody(response)
            assert (response.code, body) == (200, b"ready\n")
            summary = server.summary()
            counts = (summary["node_id"], summary["nodes"], summary["forwarded"], summary["router_dropped"])
            assert counts == (7, 1, 0, 0)
            assert ("coaps", "127.0.0.1", public, "extended") in server.listening
            assert any(event.get("event") == "cluster_unauthenticated" for event in events)
        finally:
            yield server.stopService()
    assert not server.is_ready()
    assert server.summary()["node_id"] == 7, "the final summary still has the cluster fields"


@pytest.mark.parametrize("mode", ["dynamic", "k8s"])
@pytest_twisted.inlineCallbacks
def test_a_lost_nodes_sessions_are_taken_over_without_a_new_handshake(
        mode: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Generator[Any, Any, None]:
    """The owner of a session crashes: its successor answers with the same CID; after a restart the CID still works."""
    from nettester.cluster import nodes
    from nettester.cluster.router import successor

    # Declare a silent node lost within about a second instead of 10 s (Californium's timing, the default).
    monkeypatch.setattr(nodes, "TIMER_INTERVAL", 0.2)
    monkeypatch.setattr(nodes, "PING_AFTER", 0.4)
    monkeypatch.setattr(nodes, "REMOVE_AFTER", 0.4)
    cluster = cluster_in(mode, monkeypatch, request)
    client: CoapsClient | None = None
    try:
        yield cluster.start()
        client = CoapsClient(cluster.nat_address)
        first = yield client.mycontext()
        owner, cid = first["node-id"], first["read-cid"]
        heir = successor(owner, NODES)
        yield wait_until(lambda: cluster.summaries()[NODES.index(heir)]["replicas"] == 1)

        # A crash: no close_notify reaches the client, the load balancer stops sending to the node.
        host, port = cluster.public_address(owner)
        for endpoint in cluster.servers[owner].endpoints:
            monkeypatch.setattr(endpoint.link, "close_all", lambda: None)
        yield cluster.servers[owner].stopService()
        yield cluster.nat.console.execute(f"remove {host}:{port}")
        context = yield client.mycontext()
        assert (context["node-id"], context["read-cid"]) == (heir, cid)
        summaries = {node_id: server.summary() for node_id, server in cluster.servers.items()}
        assert summaries[heir]["taken_over"] == 1
        assert client.link.counters.handshakes.value == 1, "no new handshake"

        # The owner comes back; the client is moved onto it: it asks its backup, which holds the session.
        yield cluster.start_node(owner)
        yield cluster.wait_for_discovery()
        yield cluster.nat.console.execute(f"add {host}:{port}")
        for _ in range(40):
            if cluster.receiving_node(client.address) == owner:
                break
            yield cluster.nat.console.execute("rebalance")
        assert cluster.receiving_node(client.address) == owner
        context = yield client.mycontext()
        # The restarted node does not know the CID any more: it forwards to its backup, the heir, which answers.
        assert (context["node-id"], context["read-cid"], context["via"]) == (heir, cid, VIA_ROUTER)
        assert client.link.counters.handshakes.value == 1, "one handshake for the whole session"
    finally:
        if client is not None:
            yield client.stop()
        yield cluster.stop()
