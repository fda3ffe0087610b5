"""One cluster node's sockets: the public DTLS socket behind the CID router, and the management socket.

This is the layer beneath the DTLS endpoint (DESIGN.md: UDP socket -> cluster
router -> DTLS endpoint). The node owns the public socket and hands it to the
endpoint as its transport, so the endpoint answers direct peers itself. A
datagram the router keeps local goes to ``endpoint.datagramReceived(data,
client)``; a record another node forwarded goes to
``endpoint.routed_datagram_received(records, client, route)``, and the endpoint
answers that peer with ``route.send(data, client)``: back through the node the
client talks to (OUT records), or straight from our public socket with
``--no-dtls-cluster-backward``. ``route.name`` is what ``mycontext`` shows
as ``via``.

With ``--workers N`` each worker runs one ``ClusterNodeService`` on the
node's shared ports; ``workers`` (its ``WorkerContext``) makes worker 0 the
discovery worker and the others followers of its node table, and steers the
management port by the CIDs inside its records: ``nettester.cluster.siblings``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import (
    Deferred,
    FirstError,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol

from nettester import steering
from nettester.addresses import address_text, ip_family, mapped_for
from nettester.cluster.config import ClusterConfig
from nettester.cluster.discovery import (
    DynamicDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    kubernetes_discovery_from_environment,
    resolve_address,
    resolve_nodes,
)
from nettester.cluster.management import ManagementEndpoint
from nettester.cluster.nodes import NodeTable
from nettester.cluster.replication import DEFAULT_MAX_REPLICAS, SEQUENCE_GAP, AskBackup, Replicator, TakeOver
from nettester.cluster.router import LOCAL, CidRouter, Forward
from nettester.cluster.siblings import NODES_KEY, DiscoverySharing, SharedDiscovery
from nettester.cluster.wire import ConnectionState, ManagementCodec
from nettester.interfaces import INodeDiscovery
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.dtls.endpoint import DatagramRoute, DtlsPeer
from nettester.protocols.dtls.snapshot import SnapshotError
from nettester.reactor import DrainingPort, datagram_sender, server_port_class
from nettester.workers import WorkerContext

log = Logger()

Address = tuple[str, int]
VIA_ROUTER = "dtls-cid-router"
MAX_CACHED_ROUTES = 256  # one per forwarding node; bounded against spoofed sources without a secret


@dataclass(frozen=True, slots=True)
class ForwardedRoute:
    """How to answer a peer whose record another node forwarded: back through it (OUT), or directly.

    :ivar send_public: sends from our public socket (``--no-dtls-cluster-backward``).
    """

    node: Address
    management: ManagementEndpoint
    send_public: Callable[[bytes, Address], None]
    backward: bool = True
    name: str = VIA_ROUTER

    def send(self, data: bytes, address: Address) -> None:
        if self.backward:
            self.management.backward(data, address, self.node)
        else:
            self.send_public(data, address)



def _not_open(data: bytes, address: Address) -> None:
    """The public send before the port is open: refused like a send the kernel refuses."""
    raise OSError("the public port is not open yet")

class ReplicatedEndpoint(Protocol):
    """What replication needs from the DTLS endpoint."""

    on_established: Callable[[DtlsPeer], None] | None
    unknown_cid: Callable[[bytes, bytes, Address, DatagramRoute | None], bool] | None

    @property
    def connections(self) -> list[DtlsPeer]:
        """The live connections (read-only)."""

    def snapshot(self, cid: bytes) -> bytes | None:
        """The established connection's snapshot, or None."""

    def adopt(self, snapshot: bytes, address: Address, route: DatagramRoute | None, sequence_gap: int) -> DtlsPeer:
        """Restore a connection from a snapshot; raises SnapshotError."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        """A datagram from our public socket."""

    def routed_datagram_received(self, data: bytes, address: Address, route: DatagramRoute) -> None:
        """A datagram another node forwarded."""


class RoutedEndpoint(ReplicatedEndpoint, Protocol):
    """What the node needs from the DTLS endpoint: a DatagramProtocol with the route and replication hooks."""

    def makeConnection(self, transport: Any) -> None:
        """Take the public socket as transport."""

    def doStop(self) -> None:
        """The public socket is closing."""




class _PublicProtocol(DatagramProtocol):
    """The public DTLS socket: every datagram passes the router first."""

    noisy = False

    def __init__(self, node: ClusterNodeService) -> None:
        self._node = node

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._node.public_datagram(datagram, addr)


def _listen_udp(reactor: Any, address: Address, protocol: DatagramProtocol) -> DrainingPort:
    """What ``reactor.listenUDP`` does, with a server port (``reactor.server_port_class``: batched reads and
    answers where the C library allows)."""
    interface, port_number = address
    if interface and ip_family(interface) is None:
        interface = socket.gethostbyname(interface)  # a host name such as "localhost", once at start
    port = server_port_class()(port_number, protocol, interface=interface, reactor=reactor)
    port.startListening()
    return port


class ClusterNodeService(MultiService):
    """The public socket, the management socket and the discovery of one node.

    :param endpoint: the DTLS endpoint (see the module docstring).
    :param workers: this worker's context under ``--workers`` (``nettester.cluster.siblings``).
    """

    def __init__(
        self,
        reactor: Any,
        config: ClusterConfig,
        endpoint: RoutedEndpoint,
        metrics: MetricSet,
        workers: WorkerContext | None = None,
    ) -> None:
        super().__init__()
        self.workers = workers
        self._reactor = reactor
        self.config = config
        self._endpoint = endpoint
        self._metrics = metrics
        self.codec = ManagementCodec(config.secret)
        self.discovery: INodeDiscovery | None = None
        self.router: CidRouter | None = None
        self.management: ManagementEndpoint | None = None
        self._public_port: DrainingPort | None = None
        self._management_port: DrainingPort | None = None
        self.kubernetes: KubernetesDiscovery | None = None
        #: A sibling worker's view of worker 0's node table (dynamic and k8s mode under --workers).
        self.shared_discovery: SharedDiscovery | None = None
        self.replication: ReplicationService | None = None
        self.started: Deferred[None] = Deferred()
        self._routes: dict[Address, ForwardedRoute] = {}
        self._public_sendto: Callable[[bytes, Address], Any] = _not_open
        self._public_family = socket.AF_INET
        self._public_send_errors = metrics.counter("public_send_errors_total", "Sends refused on the public socket.")

    @property
    def public_port(self) -> int:
        assert self._public_port is not None, "not started"
        return self._public_port.getHost().port

    @property
    def management_port(self) -> int:
        assert self._management_port is not None, "not started"
        return self._management_port.getHost().port

    def startService(self) -> None:
        super().startService()
        self._start().addCallbacks(self.started.callback, self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        if failure.check(FirstError):
            failure = failure.value.subFailure  # the first failed name resolution
        log.critical("Cluster node {node} did not start: {error}", event="cluster_start_failed",
                     node=self.config.node_id, error=failure.getErrorMessage())
        self.started.errback(failure)

    @inlineCallbacks
    def _start(self) -> Generator[Deferred[Any], Any, None]:
        config = self.config
        dynamic: DynamicDiscovery | None = None
        if config.mode == "static":
            nodes = yield resolve_nodes(self._reactor, config.nodes)
            self.discovery = StaticDiscovery(config.node_id, nodes)
        elif self.workers is None or self.workers.index == steering.DISCOVERY_WORKER:
            dynamic = DynamicDiscovery(self._reactor, NodeTable(config.node_id, self.codec), self._send_management)
            self.discovery = dynamic
        else:
            self.shared_discovery = SharedDiscovery(config.node_id)
            self.workers.on_shared(NODES_KEY, self.shared_discovery.received)
            self.discovery = self.shared_discovery
        # Fail-over needs the secret (snapshots carry keys) and a discovery that notices lost nodes.
        failover = config.secret is not None and config.mode != "static"
        self.router = CidRouter(self.discovery, failover=failover)
        router_drops = self._metrics.labeled_counter("router_dropped_total", "Public datagrams dropped by the "
                                                     "CID router.", "reason")
        router_drops.values = self.router.drops
        self._metrics.gauge("forwarded", "Public datagrams forwarded to their owner node.",
                            lambda: self.router.forwarded if self.router else 0)
        self.management = ManagementEndpoint(self._reactor, self.codec, self._forwarded, self._backwarded,
                                             self._metrics, dynamic, sibling=self.shared_discovery is not None)
        self._management_port = _listen_udp(self._reactor, config.management_address, self.management)
        if self.workers is not None:
            self.workers.steer_with(self._management_port.getHandle(),
                                    partial(steering.management_program, mac_length=self.codec.mac_length))
        self._public_port = _listen_udp(self._reactor, config.dtls_address, _PublicProtocol(self))
        self._public_sendto = datagram_sender(self._public_port, self._public_send_failed)
        self._public_family = self._public_port.getHandle().family
        self._endpoint.makeConnection(self._public_port)
        if failover:
            self.replication = ReplicationService(self._reactor, self._endpoint, self.router, self.codec,
                                                  self.management.send, self.management.forward, self._metrics)
            self.management.on_state = self.replication.receive
            self.replication.setServiceParent(self)
        elif config.mode != "static":
            log.info("DTLS state replication is off: it needs --dtls-cluster-group-security (snapshots carry "
                     "session keys); the clients of a lost node will need a new handshake",
                     event="cluster_replication_off")
        if dynamic is not None:
            table = dynamic.table
            own = self._management_port.getHost()
            # Bound to every interface, our own pings to the group may come back from loopback.
            hosts = {own.host, "127.0.0.1", "::1"} if own.host in ("0.0.0.0", "::") else {own.host}
            for host in hosts:
                table.add_own_address((host, own.port))
            if config.mode == "dynamic":
                group = yield gatherResults([resolve_address(self._reactor, a) for a in config.group],
                                            consumeErrors=True)
                table.set_group(group)
            else:
                self.kubernetes = kubernetes_discovery_from_environment(
                    self._reactor, table, config.external_management_port or own.port, os.environ,
                    socket.gethostname())
                self.kubernetes.setServiceParent(self)
            dynamic.setServiceParent(self)
            if self.workers is not None:
                sharing = DiscoverySharing(self.workers, dynamic, self.is_ready)
                if self.kubernetes is not None:
                    self.kubernetes.on_ready = sharing.publish
        log.info(
            "Cluster node {node} ({mode}): public port {public}, management port {management}",
            event="cluster_node_start",
            node=config.node_id,
            mode=config.mode,
            public=self.public_port,
            management=self.management_port,
        )

    def _send_management(self, datagram: bytes, address: Address) -> bool:
        """The discovery's PINGs and PONGs go out through the management socket."""
        assert self.management is not None, "discovery runs once the management socket is open"
        return self.management.send(datagram, address)

    def public_datagram(self, datagram: bytes, client: Address) -> None:
        """A datagram on the public socket: local, forwarded to its owner, or dropped (counted)."""
        decision = self.router.decide(datagram)  # type: ignore[union-attr]
        if decision is LOCAL:
            self._endpoint.datagramReceived(datagram, client)
        elif type(decision) is Forward:
            self.management.forward(datagram, client, decision.address)  # type: ignore[union-attr]

    def _forwarded(self, records: bytes, client: Address, node: Address) -> None:
        client = (mapped_for(self._public_family, client[0]), client[1])  # as our own socket reports it
        route = self._routes.get(node)
        if route is None:
            route = ForwardedRoute(node, self.management, self.send_public, self.config.backward)  # type: ignore[arg-type]
            if len(self._routes) < MAX_CACHED_ROUTES:
                self._routes[node] = route
        self._endpoint.routed_datagram_received(records, client, route)

    def _backwarded(self, records: bytes, client: Address, node: Address) -> None:
        self.send_public(records, client)

    def send_public(self, data: bytes, address: Address) -> None:
        """Send from our public socket; a refused send is counted, never raised."""
        try:
            self._public_sendto(data, (mapped_for(self._public_family, address[0]), address[1]))
        except OSError as error:
            self._public_send_failed(error, address)

    def _public_send_failed(self, _error: OSError, _address: Address) -> None:
        self._public_send_errors.value += 1

    def summary(self) -> dict[str, int]:
        """Cluster fields for the role's summary line (``coap-server summary: ... nodes=2 forwarded=...``)."""
        if self.router is None or self.management is None or self.discovery is None:
            return {}
        fields = {
            "nodes": len(self.discovery.nodes()),
            "forwarded": self.router.forwarded,
            "forwarded_in": self.management.received_in.value,
            "backwarded": self.management.sent_out.value,
            "router_dropped": sum(self.router.drops.values()),
            "management_dropped": self.management.dropped.total,
        }
        if self.replication is not None:
            fields.update(replicated=self.replication.replicated.value, replicas=len(self.replication.replicas),
                          taken_over=self.replication.taken_over.value)
        return fields

    def is_ready(self) -> bool:
        """For ``/ready``: sockets open and, in Kubernetes, the pods listed once (by worker 0 under --workers)."""
        if self._public_port is None:
            return False
        if self.kubernetes is not None:
            return self.kubernetes.ready
        return self.shared_discovery is None or self.shared_discovery.ready

    def stopService(self) -> Deferred[Any]:
        stopping = [maybeDeferred(super().stopService)]
        if self._public_port is not None:
            self._endpoint.doStop()
        for port in (self._public_port, self._management_port):
            if port is not None:
                stopping.append(maybeDeferred(port.stopListening))
        return gatherResults(stopping)


class ReplicationService(Service):
    """Carries out the ``Replicator``'s decisions: sends snapshots, adopts or forwards unknown CIDs.

    ``send(datagram, management_address)`` returns False when the kernel refused it;
    ``forward(records, client, management_address)`` sends an IN record.
    """

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: ReplicatedEndpoint,
        router: CidRouter,
        codec: ManagementCodec,
        send: Callable[[bytes, Address], bool],
        forward: Callable[[bytes, Address, Address], None],
        metrics: MetricSet,
        max_replicas: int = DEFAULT_MAX_REPLICAS,
    ) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self._router = router
        self._send = send
        self._forward = forward
        self.core = Replicator(router.own_node_id, codec, max_replicas)
        self.replicas = self.core.replicas
        self._timer: IDelayedCall | None = None
        self.replicated = metrics.counter("replicated_total", "Connection snapshots sent to the backup node.")
        self.taken_over = metrics.counter("taken_over_total", "Connections taken over from a lost node's replica.")
        metrics.gauge("replicas", "Snapshots held for other nodes' connections.", lambda: len(self.replicas))

    def startService(self) -> None:
        super().startService()
        self._endpoint.on_established = self._established
        self._endpoint.unknown_cid = self.unknown_cid
        self.core.start(self._clock.seconds())
        self._arm()
        log.info("DTLS state replication on: each connection's snapshot goes to the next node, which takes it "
                 "over if node {node} is lost", event="cluster_replication_on", node=self._router.own_node_id)

    def stopService(self) -> None:
        super().stopService()
        self.core.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._endpoint.on_established = None
        self._endpoint.unknown_cid = None

    def _arm(self) -> None:
        due = self.core.get_timer()
        if due is not None:
            self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self.refresh)

    def receive(self, state: ConnectionState, source: Address) -> str | None:
        """A STATE record from another node (the management endpoint's callback): None, or why it was dropped."""
        return self.core.receive_state(state, self._clock.seconds())

    def _established(self, peer: DtlsPeer) -> None:
        backup = self._router.backup()
        if backup is not None:
            self._replicate(peer.connection.read_cid, peer.last_activity, backup)

    def refresh(self) -> None:
        """Send the snapshots the replicator says are due, and re-arm its timer."""
        backup = self._router.backup()
        activity = {peer.connection.read_cid: peer.last_activity for peer in self._endpoint.connections}
        for cid in self.core.refresh(self._clock.seconds(), backup, activity.items()):
            assert backup is not None  # refresh names no CID without a backup
            self._replicate(cid, activity[cid], backup)
        self._arm()

    def _replicate(self, cid: bytes, activity: float, backup: tuple[int, Address]) -> None:
        snapshot = self._endpoint.snapshot(cid)
        if snapshot is None:
            return
        if self._send(self.core.state_record(cid, snapshot, self._clock.seconds()), backup[1]):
            self.replicated.value += 1
            self.core.replicated(cid, backup, activity)

    def unknown_cid(self, cid: bytes, data: bytes, address: Address, route: DatagramRoute | None) -> bool:
        """The endpoint's hook for a CID it does not know: adopt a replica, or ask our backup after a restart."""
        decision = self.core.unknown_cid(cid, route is not None, self._router.backup())
        if isinstance(decision, AskBackup):
            self._forward(data, address, decision.address)
            return True
        if not isinstance(decision, TakeOver):
            return False
        try:
            self._endpoint.adopt(decision.snapshot, address, route, SEQUENCE_GAP)
        except SnapshotError:
            return False  # the endpoint counted it
        self.taken_over.value += 1
        log.info("Took over DTLS connection {cid} of node {node} for {peer} from its replica",
                 event="cluster_takeover", cid=cid.hex(), node=cid[0], peer=address_text(address))
        if route is None:
            self._endpoint.datagramReceived(data, address)
        else:
            self._endpoint.routed_datagram_received(data, address, route)
        return True
