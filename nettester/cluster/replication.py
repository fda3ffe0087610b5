"""DTLS state that survives the loss of a node: replicas at the successor, taken over on demand.

Californium's cluster loses every session of a node that goes away: its
clients time out and start a new handshake. Here each node sends a snapshot
of every established CID connection (``nettester.protocols.dtls.snapshot``,
keys included, in an encrypted STATE record: ``nettester.cluster.wire``) to
its backup, the next live node id above its own (``CidRouter.successor``), once
the handshake completes and again every ``REFRESH_INTERVAL`` while the
connection is active or when the backup changes. When dynamic or Kubernetes
discovery removes a node, the routers send its CIDs to that successor,
which adopts the connection from its replica at the first record and
answers without a new handshake.

A node that comes back after a restart has lost its connections; a record
for one of its own CIDs that it does not know is forwarded to its backup,
which adopted it (or holds the replica).

This module holds the decisions, sans-IO (``now`` goes in); the Twisted
side, ``nettester.cluster.node.ReplicationService``, only carries them out.

Limits (see the README): a replica is as fresh as its last refresh, so the
records the lost node accepted since then could be replayed once to the
adopter; the adopter jumps the write sequence number by ``SEQUENCE_GAP``
so it never reuses a nonce the lost node may have used (RFC 6347 section
4.1: the epoch and sequence number are the AEAD nonce's explicit part).
Replication needs the group secret (the snapshots carry keys) and a
discovery that notices lost nodes (dynamic or Kubernetes mode).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from nettester.cluster.wire import ConnectionState, ManagementCodec

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
        """Keep ``state`` unless it is older than ``MAX_STATE_AGE`` or than the snapshot we hold (counted)."""
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
        """The snapshot of ``cid``, removed from the store (it is being adopted), or None."""
        state = self._replicas.pop(cid, None)
        return None if state is None else state.snapshot


@dataclass(frozen=True)
class TakeOver:
    """Adopt the connection from this snapshot, then process the record."""

    snapshot: bytes


@dataclass(frozen=True)
class AskBackup:
    """Forward the record to our backup: it took the connection over while we were away."""

    address: Address


class Replicator:
    """What to replicate to the backup node and when, and what to do with a CID nobody here knows.

    Backups are ``(node id, management address)`` pairs, as ``CidRouter.backup()`` gives them;
    connections are ``(cid, last activity)`` pairs.
    """

    def __init__(self, own_node_id: int, codec: ManagementCodec, max_replicas: int = DEFAULT_MAX_REPLICAS,
                 refresh_interval: float = REFRESH_INTERVAL) -> None:
        self.own_node_id = own_node_id
        self.replicas = ReplicaStore(max_replicas)
        self._codec = codec
        self._refresh_interval = refresh_interval
        self._sent: dict[bytes, tuple[int, float]] = {}  # cid -> (backup node id, activity time replicated)
        self._next_refresh: float | None = None

    def start(self, now: float) -> None:
        self._next_refresh = now + self._refresh_interval

    def stop(self) -> None:
        self._next_refresh = None

    def get_timer(self) -> float | None:
        """When ``refresh`` is due next (None when stopped)."""
        return self._next_refresh

    def refresh(self, now: float, backup: tuple[int, Address] | None,
                connections: Iterable[tuple[bytes, float]]) -> list[bytes]:
        """The CIDs to replicate now: active since their last snapshot, or all when the backup changed."""
        if self._next_refresh is not None:
            self._next_refresh = now + self._refresh_interval
        sent, self._sent = self._sent, {}
        if backup is None:
            return []
        due = []
        for cid, activity in connections:
            if not cid:
                continue
            previous = sent.get(cid)
            if previous is None or previous[0] != backup[0] or previous[1] < activity:
                due.append(cid)
            else:
                self._sent[cid] = previous
        return due

    def state_record(self, cid: bytes, snapshot: bytes, now: float) -> bytes:
        """The STATE record carrying ``snapshot`` to the backup."""
        return self._codec.encode_state(cid, snapshot, int(now * 1000))

    def replicated(self, cid: bytes, backup: tuple[int, Address], activity: float) -> None:
        """The backup was sent ``cid``'s snapshot as of ``activity``."""
        self._sent[cid] = (backup[0], activity)

    def receive_state(self, state: ConnectionState, now: float) -> str | None:
        """A STATE record from another node: None when kept, else why it was dropped."""
        return None if self.replicas.store(state, now * 1000) else "stale_state"

    def unknown_cid(self, cid: bytes, routed: bool, backup: tuple[int, Address] | None) -> TakeOver | AskBackup | None:
        """A record for a CID the endpoint does not know: take it over from a replica, ask our backup, or drop."""
        snapshot = self.replicas.take(cid)
        if snapshot is not None:
            return TakeOver(snapshot)
        if not routed and cid[0] == self.own_node_id and backup is not None:
            # One of our CIDs from before a restart: our backup took it over, or holds its replica.
            return AskBackup(backup[1])
        return None
