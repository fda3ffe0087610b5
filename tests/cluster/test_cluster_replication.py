"""Replication and takeover, on a fake DTLS endpoint and task.Clock (the real endpoint: test_cluster_coap)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent

from nettester.cluster.node import ReplicationService
from nettester.cluster.replication import (
    REFRESH_INTERVAL,
    SEQUENCE_GAP,
    AskBackup,
    ReplicaStore,
    Replicator,
    TakeOver,
)
from nettester.cluster.router import CidRouter
from nettester.cluster.wire import ConnectionState, ManagementCodec
from nettester.metrics import MetricSet
from nettester.protocols.dtls.snapshot import SnapshotError
from tests.cluster.nodes_on_clock import DiscoveryOnClock
from tests.logcapture import log_events

SECRET = b"group secret"
NODE_2 = ("10.0.0.2", 25884)
NODE_3 = ("10.0.0.3", 35884)
CLIENT = ("192.0.2.9", 40000)
OWN_CID = b"\x01abcde"
LOST_CID = b"\x02fghij"


@dataclass
class FakeConnection:
    read_cid: bytes


@dataclass
class FakePeer:
    connection: FakeConnection
    last_activity: float = 0.0


@dataclass
class FakeEndpoint:
    """Records what replication asks of the DTLS endpoint."""

    connections: list[FakePeer] = field(default_factory=list)
    on_established: Any = None
    unknown_cid: Any = None
    adopted: list[tuple[bytes, Any, Any, int]] = field(default_factory=list)
    received: list[tuple[bytes, Any]] = field(default_factory=list)
    routed: list[tuple[bytes, Any, Any]] = field(default_factory=list)

    def snapshot(self, cid: bytes) -> bytes | None:
        return b"snapshot of " + cid if any(p.connection.read_cid == cid for p in self.connections) else None

    def adopt(self, snapshot: bytes, address: Any, route: Any, sequence_gap: int) -> FakePeer:
        if snapshot == b"corrupt":
            raise SnapshotError("bad_version")
        self.adopted.append((snapshot, address, route, sequence_gap))
        return FakePeer(FakeConnection(snapshot))

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received.append((data, addr))

    def routed_datagram_received(self, data: bytes, address: Any, route: Any) -> None:
        self.routed.append((data, address, route))


class Cluster:
    """Node 1's replication, with nodes 2 and 3 known through PING."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.codec = ManagementCodec(SECRET)
        self.nodes = DiscoveryOnClock(1, self.codec, start=self.clock.seconds())
        self.router = CidRouter(self.nodes.discovery, failover=True)
        self.endpoint = FakeEndpoint()
        self.sent: list[tuple[bytes, Any]] = []
        self.forwarded: list[tuple[bytes, Any, Any]] = []
        self.service = ReplicationService(self.clock, self.endpoint, self.router, self.codec, self._send,
                                          lambda *args: self.forwarded.append(args), MetricSet("test"))
        self.service.startService()

    def _send(self, datagram: bytes, address: Any) -> bool:
        self.sent.append((datagram, address))
        return True

    def node_up(self, node_id: int, address: Any) -> None:
        self.nodes.ping_from(node_id, address, self.clock.seconds())

    def states_sent(self) -> list[tuple[ConnectionState, Any]]:
        return [(self.codec.decode(datagram), address) for datagram, address in self.sent]  # type: ignore[misc]


@pytest.fixture
def cluster() -> Cluster:
    return Cluster()


def test_a_new_connection_is_replicated_to_the_next_node(cluster: Cluster) -> None:
    cluster.node_up(2, NODE_2)
    cluster.node_up(3, NODE_3)
    peer = FakePeer(FakeConnection(OWN_CID))
    cluster.endpoint.connections.append(peer)
    cluster.endpoint.on_established(peer)
    ((state, address),) = cluster.states_sent()
    assert address == NODE_2
    assert (state.cid, state.snapshot) == (OWN_CID, b"snapshot of " + OWN_CID)
    assert state.timestamp_ms == 1_700_000_000_000
    assert cluster.service.replicated.value == 1


def test_alone_nothing_is_replicated(cluster: Cluster) -> None:
    peer = FakePeer(FakeConnection(OWN_CID))
    cluster.endpoint.connections.append(peer)
    cluster.endpoint.on_established(peer)
    cluster.clock.advance(REFRESH_INTERVAL)
    assert cluster.sent == []


def test_refresh_resends_active_connections_and_all_when_the_backup_changes(cluster: Cluster) -> None:
    cluster.node_up(2, NODE_2)
    idle, busy = FakePeer(FakeConnection(OWN_CID)), FakePeer(FakeConnection(b"\x01zzzzz"))
    cluster.endpoint.connections += [idle, busy]
    cluster.clock.advance(REFRESH_INTERVAL)
    assert sorted(state.cid for state, _ in cluster.states_sent()) == sorted([OWN_CID, b"\x01zzzzz"])
    cluster.sent.clear()
    busy.last_activity = cluster.clock.seconds() + 0.5
    cluster.clock.advance(REFRESH_INTERVAL)
    assert [state.cid for state, _ in cluster.states_sent()] == [b"\x01zzzzz"]
    cluster.sent.clear()
    cluster.clock.advance(REFRESH_INTERVAL)
    assert cluster.sent == []  # nothing new
    cluster.node_up(3, NODE_3)
    cluster.nodes.at(cluster.clock.seconds() + 10.0)  # node 2 silent: node 3 is our backup now
    cluster.node_up(3, NODE_3)
    cluster.clock.advance(REFRESH_INTERVAL)
    assert sorted((state.cid, address) for state, address in cluster.states_sent()) == sorted(
        [(OWN_CID, NODE_3), (b"\x01zzzzz", NODE_3)]
    )


def test_a_lost_nodes_connection_is_adopted_from_its_replica_and_the_record_processed(cluster: Cluster) -> None:
    now_ms = int(cluster.clock.seconds() * 1000)
    assert cluster.service.receive(ConnectionState(LOST_CID, b"replica", now_ms), NODE_2) is None
    record = b"\x19" + LOST_CID
    with log_events() as events:
        assert cluster.endpoint.unknown_cid(LOST_CID, record, CLIENT, None) is True
    [takeover] = [formatEvent(event) for event in events if event.get("event") == "cluster_takeover"]
    assert takeover == (f"Took over DTLS connection {LOST_CID.hex()} of node {LOST_CID[0]} for 192.0.2.9:40000 "
                        "from its replica")
    assert cluster.endpoint.adopted == [(b"replica", CLIENT, None, SEQUENCE_GAP)]
    assert cluster.endpoint.received == [(record, CLIENT)]
    assert cluster.service.taken_over.value == 1 and len(cluster.service.replicas) == 0
    # A record forwarded by another node is answered through that node's route.
    cluster.service.receive(ConnectionState(b"\x02other", b"replica 2", now_ms), NODE_2)
    route = object()
    assert cluster.endpoint.unknown_cid(b"\x02other", record, CLIENT, route) is True
    assert cluster.endpoint.routed == [(record, CLIENT, route)]


def test_a_corrupt_replica_is_not_adopted(cluster: Cluster) -> None:
    cluster.service.receive(ConnectionState(LOST_CID, b"corrupt", int(cluster.clock.seconds() * 1000)), NODE_2)
    assert cluster.endpoint.unknown_cid(LOST_CID, b"record", CLIENT, None) is False
    assert cluster.endpoint.received == []


def test_after_a_restart_our_unknown_cids_are_asked_of_our_backup(cluster: Cluster) -> None:
    cluster.node_up(2, NODE_2)
    assert cluster.endpoint.unknown_cid(OWN_CID, b"record", CLIENT, None) is True
    assert cluster.forwarded == [(b"record", CLIENT, NODE_2)]
    # Not when the record was forwarded to us (no loops), nor for another node's CID without a replica.
    assert cluster.endpoint.unknown_cid(OWN_CID, b"record", CLIENT, object()) is False
    assert cluster.endpoint.unknown_cid(LOST_CID, b"record", CLIENT, None) is False
    assert len(cluster.forwarded) == 1


def test_a_stale_state_record_is_refused_with_its_reason(cluster: Cluster) -> None:
    an_hour_ago = int((cluster.clock.seconds() - 3600) * 1000)
    assert cluster.service.receive(ConnectionState(LOST_CID, b"replica", an_hour_ago), NODE_2) == "stale_state"
    assert len(cluster.service.replicas) == 0


def test_stop_unhooks_the_endpoint(cluster: Cluster) -> None:
    cluster.service.stopService()
    assert cluster.endpoint.on_established is None and cluster.endpoint.unknown_cid is None
    assert cluster.clock.getDelayedCalls() == []


def test_the_store_keeps_the_newest_snapshot_and_is_bounded() -> None:
    store = ReplicaStore(capacity=2)
    assert store.store(ConnectionState(b"\x02a", b"new", 10), now_ms=20)
    assert not store.store(ConnectionState(b"\x02a", b"old", 9), now_ms=20)  # a replayed older snapshot
    assert not store.store(ConnectionState(b"\x02z", b"recorded", 10), now_ms=10 + 60_001)  # replayed later
    assert store.stale == 2
    store.store(ConnectionState(b"\x02b", b"b", 1), now_ms=20)
    store.store(ConnectionState(b"\x02c", b"c", 1), now_ms=20)
    assert len(store) == 2 and store.evicted == 1
    assert store.take(b"\x02a") is None  # the oldest stored went first
    assert store.take(b"\x02c") == b"c" and store.take(b"\x02c") is None


# -- the sans-IO decisions alone, on plain values ---------------------------------------------------

def test_the_replicator_names_what_is_due_on_plain_values() -> None:
    core = Replicator(1, ManagementCodec(SECRET))
    assert core.get_timer() is None
    core.start(100.0)
    assert core.get_timer() == 100.0 + REFRESH_INTERVAL
    backup = (2, NODE_2)
    assert core.refresh(102.0, backup, [(OWN_CID, 0.0), (b"", 0.0)]) == [OWN_CID]  # no CID: never replicated
    assert core.get_timer() == 102.0 + REFRESH_INTERVAL
    core.replicated(OWN_CID, backup, 0.0)
    assert core.refresh(104.0, backup, [(OWN_CID, 0.0)]) == []  # nothing new since
    assert core.refresh(106.0, backup, [(OWN_CID, 105.0)]) == [OWN_CID]  # active again
    core.replicated(OWN_CID, backup, 105.0)
    assert core.refresh(108.0, (3, NODE_3), [(OWN_CID, 105.0)]) == [OWN_CID]  # the backup changed
    assert core.refresh(110.0, None, [(OWN_CID, 109.0)]) == []  # alone
    core.stop()
    assert core.get_timer() is None


def test_the_replicator_decides_what_an_unknown_cid_means() -> None:
    codec = ManagementCodec(SECRET)
    core = Replicator(1, codec)
    state = codec.decode(codec.encode_state(LOST_CID, b"replica", 1_000_000))
    assert isinstance(state, ConnectionState)
    assert core.receive_state(state, 1_000.0) is None
    assert core.receive_state(state, 1_000.0) == "stale_state"  # not newer than the one held
    assert core.unknown_cid(LOST_CID, routed=True, backup=None) == TakeOver(b"replica")
    assert core.unknown_cid(LOST_CID, routed=True, backup=None) is None  # taken once
    assert core.unknown_cid(OWN_CID, routed=False, backup=(2, NODE_2)) == AskBackup(NODE_2)
    assert core.unknown_cid(OWN_CID, routed=True, backup=(2, NODE_2)) is None  # a forwarded record: not ours to ask
    assert core.unknown_cid(OWN_CID, routed=False, backup=None) is None


def test_state_nonces_come_from_the_injected_source() -> None:
    codec = ManagementCodec(SECRET, random_bytes=lambda n: b"\x07" * n)
    first, second = codec.encode_state(OWN_CID, b"s", 1), codec.encode_state(OWN_CID, b"s", 1)
    assert first == second  # the same nonce: the codec drew nothing else
    assert b"\x07" * 12 in first
    assert ManagementCodec(SECRET).encode_state(OWN_CID, b"s", 1) != first
