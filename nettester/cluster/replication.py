"""DTLS state that survives the loss of a node: replicas at the successor, taken over on demand.

Californium's cluster loses every session of a node that goes away: its
clients time out and start a new handshake. Here each node sends a snapshot
of every established CID connection (L{nettester.protocols.dtls.snapshot},
keys included, in an encrypted STATE record: L{nettester.cluster.wire}) to
its backup, the next live node id above its own (L{router.successor}), once
the handshake completes and again every L{REFRESH_INTERVAL} while the
connection is active or when the backup changes. When dynamic or Kubernetes
discovery removes a node, the routers send its CIDs to that successor,
which adopts the connection from its replica at the first record and
answers without a new handshake.

A node that comes back after a restart has lost its connections; a record
for one of its own CIDs that it does not know is forwarded to its backup,
which adopted it (or holds the replica).

Limits (see the README): a replica is as fresh as its last refresh, so the
records the lost node accepted since then could be replayed once to the
adopter; the adopter jumps the write sequence number by L{SEQUENCE_GAP}
so it never reuses a nonce the lost node may have used (RFC 6347 section
4.1: the epoch and sequence number are the AEAD nonce's explicit part).
Replication needs the group secret (the snapshots carry keys) and a
discovery that notices lost nodes (dynamic or Kubernetes mode).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.task import LoopingCall

from nettester.cluster.router import CidRouter
from nettester.cluster.wire import ConnectionState, ManagementCodec
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.dtls.snapshot import SnapshotError

log = Logger()

Address = tuple[str, int]
REFRESH_INTERVAL = 2.0  # seconds; bounds how stale a replica's replay window is
SEQUENCE_GAP = 1 << 32  # records the lost node may have written since its last snapshot
DEFAULT_MAX_REPLICAS = 100_000
MAX_STATE_AGE = 60.0  # seconds, as PING/PONG timestamps: a recorded STATE record cannot be replayed later


class ReplicaStore:
    """The snapshots other nodes sent us: the newest per CID, bounded, oldest stored evicted first.

    Sans-IO: the management endpoint stores, the takeover takes.
    """

    def __init__(self, capacity: int = DEFAULT_MAX_REPLICAS) -> None:
        self.capacity = capacity
        self._replicas: OrderedDict[bytes, ConnectionState] = OrderedDict()
        self.evicted = 0
        self.stale = 0

    def __len__(self) -> int:
        return len(self._replicas)

    def store(self, state: ConnectionState, now_ms: float) -> bool:
        """Keep C{state} unless it is older than L{MAX_STATE_AGE} or than the snapshot we hold (counted)."""
        held = self._replicas.get(state.cid)
        if abs(now_ms - state.timestamp_ms) > MAX_STATE_AGE * 1000 or (
                held is not None and held.timestamp_ms >= state.timestamp_ms):
            self.stale += 1
            return False
        self._replicas[state.cid] = state
        self._replicas.move_to_end(state.cid)
        while len(self._replicas) > self.capacity:
            self._replicas.popitem(last=False)
            self.evicted += 1
        return True

    def take(self, cid: bytes) -> bytes | None:
        """The snapshot of C{cid}, removed from the store (it is being adopted), or None."""
        state = self._replicas.pop(cid, None)
        return None if state is None else state.snapshot


class ReplicatedEndpoint(Protocol):
    """What replication needs from the DTLS endpoint."""

    connections: list[Any]
    on_established: Callable[[Any], None] | None
    unknown_cid: Callable[[bytes, bytes, Address, Any], bool] | None

    def snapshot(self, cid: bytes) -> bytes | None:
        """The established connection's snapshot, or None."""

    def adopt(self, snapshot: bytes, address: Address, route: Any, sequence_gap: int) -> Any:
        """Restore a connection from a snapshot; raises SnapshotError."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        """A datagram from our public socket."""

    def routedDatagramReceived(self, data: bytes, address: Address, route: Any) -> None:
        """A datagram another node forwarded."""


class ReplicationService(Service):
    """Sends our connections' snapshots to the backup node and takes over lost nodes' connections.

    @param send: C{send(datagram, management_address)}, False when the kernel refused it.
    @param forward: C{forward(records, client, management_address)}: an IN record.
    """

    def __init__(
        self,
        clock: Any,
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
        self._codec = codec
        self._send = send
        self._forward = forward
        self.replicas = ReplicaStore(max_replicas)
        self._sent: dict[bytes, tuple[int, float]] = {}  # cid -> (backup node id, activity time replicated)
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = clock
        self.replicated = metrics.counter("replicated_total", "Connection snapshots sent to the backup node.")
        self.taken_over = metrics.counter("taken_over_total", "Connections taken over from a lost node's replica.")
        metrics.gauge("replicas", "Snapshots held for other nodes' connections.", lambda: len(self.replicas))

    def startService(self) -> None:
        super().startService()
        self._endpoint.on_established = self._established
        self._endpoint.unknown_cid = self.unknown_cid
        self._refresh.start(REFRESH_INTERVAL, now=False)
        log.info("DTLS state replication on: each connection's snapshot goes to the next node, which takes it "
                 "over if node {node} is lost", event="cluster_replication_on", node=self._router.own_node_id)

    def stopService(self) -> None:
        super().stopService()
        if self._refresh.running:
            self._refresh.stop()
        self._endpoint.on_established = None
        self._endpoint.unknown_cid = None

    def receive(self, state: ConnectionState, source: Address) -> str | None:
        """A STATE record from another node (the management endpoint's callback): None, or why it was dropped."""
        return None if self.replicas.store(state, self._clock.seconds() * 1000) else "stale_state"

    def _established(self, peer: Any) -> None:
        backup = self._router.backup()
        if backup is not None:
            self._replicate(peer, backup)

    def refresh(self) -> None:
        """Send the snapshots of connections active since their last one, or of all when the backup changed."""
        backup = self._router.backup()
        sent, self._sent = self._sent, {}
        if backup is None:
            return
        for peer in self._endpoint.connections:
            cid = peer.connection.read_cid
            if not cid:
                continue
            previous = sent.get(cid)
            if previous is None or previous[0] != backup[0] or previous[1] < peer.last_activity:
                self._replicate(peer, backup)
            else:
                self._sent[cid] = previous

    def _replicate(self, peer: Any, backup: tuple[int, Address]) -> None:
        cid = peer.connection.read_cid
        snapshot = self._endpoint.snapshot(cid)
        if snapshot is None:
            return
        now = self._clock.seconds()
        if self._send(self._codec.encode_state(cid, snapshot, int(now * 1000)), backup[1]):
            self.replicated.value += 1
            self._sent[cid] = (backup[0], peer.last_activity)

    def unknown_cid(self, cid: bytes, data: bytes, address: Address, route: Any) -> bool:
        """The endpoint's hook for a CID it does not know: adopt a replica, or ask our backup after a restart."""
        snapshot = self.replicas.take(cid)
        if snapshot is not None:
            try:
                self._endpoint.adopt(snapshot, address, route, SEQUENCE_GAP)
            except SnapshotError:
                return False  # the endpoint counted it
            self.taken_over.value += 1
            log.info("Took over DTLS connection {cid} of node {node} for {peer} from its replica",
                     event="cluster_takeover", cid=cid.hex(), node=cid[0], peer=address)
            if route is None:
                self._endpoint.datagramReceived(data, address)
            else:
                self._endpoint.routedDatagramReceived(data, address, route)
            return True
        if route is None and cid[0] == self._router.own_node_id:
            # One of our CIDs from before a restart: our backup took it over, or holds its replica.
            backup = self._router.backup()
            if backup is not None:
                self._forward(data, address, backup[1])
                return True
        return False
