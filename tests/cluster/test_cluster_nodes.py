"""Node tables: static, and the dynamic PING/PONG core with its timing and replay checks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from nettester.cluster.discovery import StaticDiscovery
from nettester.cluster.nodes import NodeTable, Outgoing
from nettester.cluster.wire import (
    TYPE_PING,
    TYPE_PONG,
    ManagementCodec,
    ManagementError,
    NodeMessage,
    NodeState,
)
from nettester.interfaces import INodeDiscovery

SECRET = b"s3cret"
A = ("10.0.0.1", 5884)
B = ("10.0.0.2", 5884)
C = ("10.0.0.3", 5884)
T0 = 1_800_000_000.0


def exchange(sender: NodeTable, receiver: NodeTable, packets: list[Outgoing], source: tuple[str, int],
             now: float) -> list[Outgoing]:
    """Deliver ``packets`` from ``sender`` at ``source`` to ``receiver``; its answers."""
    answers: list[Outgoing] = []
    for packet in packets:
        answers.extend(receiver.receive(receiver._codec.decode(packet.datagram), source, now))
    return answers


def test_static_discovery() -> None:
    static = StaticDiscovery(1, {1: A, 2: B, 3: C})
    assert verifyObject(INodeDiscovery, static)
    assert static.managementAddress(2) == B and static.managementAddress(1) is None
    assert static.nodes() == {2: B, 3: C}
    seen: list[tuple[int, object]] = []
    static.addListener(lambda node, address: seen.append((node, address)))
    assert seen == [(2, B), (3, C)]


def test_two_node_group_pings_and_learns_each_other() -> None:
    codec = ManagementCodec(SECRET)
    one = NodeTable(1, codec, group=[A, B], own_addresses=[A])
    two = NodeTable(2, codec, group=[A, B], own_addresses=[B])
    assert verifyObject(INodeDiscovery, one)
    changes: list[tuple[int, object]] = []
    one.addListener(lambda node, address: changes.append((node, address)))
    pings = one.handle_timer(T0)
    assert [p.address for p in pings] == [B], "a two-node group pings its peer"
    assert codec.decode(pings[0].datagram) == NodeMessage(TYPE_PING, 1, NodeState.UP, int(T0 * 1000))
    pongs = exchange(one, two, pings, A, T0)
    assert two.managementAddress(1) == A
    assert [p.address for p in pongs] == [A] and codec.decode(pongs[0].datagram).kind == TYPE_PONG
    assert exchange(two, one, pongs, B, T0) == []
    assert one.managementAddress(2) == B and changes == [(2, B)]
    assert one.get_timer() == T0 + 2.0


def test_silent_node_is_pinged_after_4s_and_removed_6s_later() -> None:
    codec = ManagementCodec()
    one = NodeTable(1, codec, group=[B], own_addresses=[A])
    changes: list[tuple[int, object]] = []
    one.addListener(lambda node, address: changes.append((node, address)))
    one.receive(NodeMessage(TYPE_PONG, 2, NodeState.UP), B, 100.0)
    assert one.handle_timer(102.0) == []  # known, not silent; its group address is known
    assert [p.address for p in one.handle_timer(104.0)] == [B]
    assert [p.address for p in one.handle_timer(106.0)] == [B]
    assert one.managementAddress(2) == B
    # removed; its address is an unknown group address again: pinged at once, then every 10 s
    assert [p.address for p in one.handle_timer(110.0)] == [B]
    assert one.managementAddress(2) is None and changes == [(2, B), (2, None)]
    assert one.handle_timer(112.0) == []
    assert [p.address for p in one.handle_timer(120.0)] == [B]


def test_a_node_moving_to_a_new_address_is_reported() -> None:
    one = NodeTable(1, ManagementCodec())
    changes: list[tuple[int, object]] = []
    one.addListener(lambda node, address: changes.append((node, address)))
    one.receive(NodeMessage(TYPE_PING, 2, NodeState.UP), B, 1.0)
    one.receive(NodeMessage(TYPE_PING, 2, NodeState.UP), C, 2.0)
    assert changes == [(2, B), (2, C)] and one.managementAddress(2) == C


def test_own_id_from_another_address_is_a_counted_conflict() -> None:
    one = NodeTable(1, ManagementCodec(), own_addresses=[A])
    assert one.receive(NodeMessage(TYPE_PING, 1, NodeState.UP), A, 1.0) == []
    assert one.receive(NodeMessage(TYPE_PING, 1, NodeState.UP), B, 1.0) == []
    assert one.drops == {"own_id_conflict": 1} and one.nodes() == {}


def test_replayed_and_stale_pings_are_dropped_and_counted() -> None:
    codec = ManagementCodec(SECRET)
    two = NodeTable(2, codec)
    ping = NodeTable(1, codec)._message(TYPE_PING, T0)
    assert len(two.receive(codec.decode(ping), A, T0)) == 1
    # the same PING replayed, even from the "right" address, moves nothing
    assert two.receive(codec.decode(ping), ("203.0.113.66", 5884), T0 + 1) == []
    assert two.managementAddress(1) == A and two.drops == {"replay": 1}
    old = NodeTable(1, codec)._message(TYPE_PING, T0 - 120)
    assert two.receive(codec.decode(old), A, T0) == []
    future = NodeTable(1, codec)._message(TYPE_PING, T0 + 120)
    assert two.receive(codec.decode(future), A, T0) == []
    assert two.drops == {"replay": 1, "stale_timestamp": 2}


def test_ping_and_pong_sent_in_the_same_millisecond_are_both_fresh() -> None:
    codec = ManagementCodec(SECRET)
    one = NodeTable(1, codec)
    first = codec.decode(one._message(TYPE_PING, T0))
    second = codec.decode(one._message(TYPE_PONG, T0))
    assert second.timestamp_ms == first.timestamp_ms + 1
    two = NodeTable(2, codec)
    two.receive(first, A, T0)
    two.receive(second, A, T0)
    assert two.drops == {}


def test_set_group_drops_own_addresses_and_duplicates() -> None:
    one = NodeTable(1, ManagementCodec(), own_addresses=[A])
    one.set_group([A, B, B, C])
    assert sorted(p.address for p in one.handle_timer(0.0)) == [B, C]
    one.set_group([C])
    assert one.handle_timer(2.0) == []
    assert [p.address for p in one.handle_timer(10.0)] == [C]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_hostile_datagrams_never_change_a_keyed_table(datagrams: list[bytes]) -> None:
    """Random bytes, forged PINGs (wrong key) and Californium's unkeyed PINGs move nothing."""
    codec = ManagementCodec(SECRET)
    table = NodeTable(1, codec, own_addresses=[A])
    table.receive(codec.decode(NodeTable(2, codec)._message(TYPE_PING, T0)), B, T0)
    forged = [NodeTable(2, ManagementCodec(b"guess"))._message(TYPE_PING, T0 + 1),
              NodeTable(2, ManagementCodec())._message(TYPE_PING, T0 + 1)]
    for datagram in [*datagrams, *forged]:
        try:
            message = codec.decode(datagram)
        except ManagementError:
            continue
        if isinstance(message, NodeMessage):
            table.receive(message, ("203.0.113.66", 1), T0 + 1)
    assert table.nodes() == {2: B}


def test_node_ids_beyond_one_byte_are_dropped() -> None:
    one = NodeTable(1, ManagementCodec())
    assert one.receive(NodeMessage(TYPE_PING, 256, NodeState.UP), B, 1.0) == []
    assert one.nodes() == {} and one.drops == {"bad_node_id": 1}


def test_a_late_listener_hears_the_nodes_known_so_far() -> None:
    one = NodeTable(1, ManagementCodec())
    one.receive(NodeMessage(TYPE_PING, 2, NodeState.UP), B, 1.0)
    seen: list[tuple[int, object]] = []
    one.addListener(lambda node, address: seen.append((node, address)))
    assert seen == [(2, B)]
