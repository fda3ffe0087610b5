"""Node tables: static, and the dynamic PING/PONG core with its timing and replay checks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from nettester.cluster.discovery import DynamicDiscovery, StaticDiscovery
from nettester.cluster.nodes import NodeTable
from nettester.cluster.wire import (
    TYPE_PING,
    TYPE_PONG,
    ManagementCodec,
    NodeMessage,
    NodeState,
)
from nettester.interfaces import INodeDiscovery

SECRET = b"s3cret"
A = ("10.0.0.1", 5884)
B = ("10.0.0.2", 5884)
C = ("10.0.0.3", 5884)
T0 = 1_800_000_000.0


Packet = tuple[bytes, tuple[str, int]]


def exchange(sender: NodeTable, receiver: NodeTable, packets: list[Packet], source: tuple[str, int],
             now: float) -> list[Packet]:
    """Deliver ``packets`` from ``sender`` at ``source`` to ``receiver``; its answers."""
    for datagram, _ in packets:
        receiver.receive_datagram(datagram, source, now)
    return receiver.datagrams_to_send()


def tick(table: NodeTable, now: float) -> list[Packet]:
    """The table's timer at ``now``: what it sends."""
    table.handle_timer(now)
    return table.datagrams_to_send()


def receive(table: NodeTable, message: NodeMessage, source: tuple[str, int], now: float) -> list[Packet]:
    """One decoded PING/PONG in; what the table sends in answer."""
    table.receive_message(message, source, now)
    return table.datagrams_to_send()


def changes(table: NodeTable) -> list[tuple[int, object]]:
    """The table's node changes so far, as (node id, address or None)."""
    return [(event.node_id, event.address) for event in iter(table.next_event, None)]


def addresses(packets: list[Packet]) -> list[tuple[str, int]]:
    return [address for _, address in packets]


def test_static_discovery() -> None:
    static = StaticDiscovery(1, {1: A, 2: B, 3: C})
    assert verifyObject(INodeDiscovery, static)
    assert static.management_address(2) == B and static.management_address(1) is None
    assert static.nodes() == {2: B, 3: C}
    seen: list[tuple[int, object]] = []
    static.add_listener(lambda node, address: seen.append((node, address)))
    assert seen == [(2, B), (3, C)]


def test_two_node_group_pings_and_learns_each_other() -> None:
    codec = ManagementCodec(SECRET)
    one = NodeTable(1, codec, group=[A, B], own_addresses=[A])
    two = NodeTable(2, codec, group=[A, B], own_addresses=[B])
    assert verifyObject(INodeDiscovery, DynamicDiscovery(Clock(), one, lambda datagram, address: None))
    pings = tick(one, T0)
    assert addresses(pings) == [B], "a two-node group pings its peer"
    assert codec.decode(pings[0][0]) == NodeMessage(TYPE_PING, 1, NodeState.UP, int(T0 * 1000))
    pongs = exchange(one, two, pings, A, T0)
    assert two.management_address(1) == A
    assert addresses(pongs) == [A] and codec.decode(pongs[0][0]).kind == TYPE_PONG
    assert exchange(two, one, pongs, B, T0) == []
    assert one.management_address(2) == B and changes(one) == [(2, B)]
    assert one.get_timer() == T0 + 2.0


def test_silent_node_is_pinged_after_4s_and_removed_6s_later() -> None:
    codec = ManagementCodec()
    one = NodeTable(1, codec, group=[B], own_addresses=[A])
    receive(one, NodeMessage(TYPE_PONG, 2, NodeState.UP), B, 100.0)
    assert tick(one, 102.0) == []  # known, not silent; its group address is known
    assert addresses(tick(one, 104.0)) == [B]
    assert addresses(tick(one, 106.0)) == [B]
    assert one.management_address(2) == B
    # removed; its address is an unknown group address again: pinged at once, then every 10 s
    assert addresses(tick(one, 110.0)) == [B]
    assert one.management_address(2) is None and changes(one) == [(2, B), (2, None)]
    assert tick(one, 112.0) == []
    assert addresses(tick(one, 120.0)) == [B]


def test_a_node_moving_to_a_new_address_is_reported() -> None:
    one = NodeTable(1, ManagementCodec())
    receive(one, NodeMessage(TYPE_PING, 2, NodeState.UP), B, 1.0)
    receive(one, NodeMessage(TYPE_PING, 2, NodeState.UP), C, 2.0)
    assert changes(one) == [(2, B), (2, C)] and one.management_address(2) == C


def test_own_id_from_another_address_is_a_counted_conflict() -> None:
    one = NodeTable(1, ManagementCodec(), own_addresses=[A])
    assert receive(one, NodeMessage(TYPE_PING, 1, NodeState.UP), A, 1.0) == []
    assert receive(one, NodeMessage(TYPE_PING, 1, NodeState.UP), B, 1.0) == []
    assert one.drops == {"own_id_conflict": 1} and one.nodes() == {}


def test_replayed_and_stale_pings_are_dropped_and_counted() -> None:
    codec = ManagementCodec(SECRET)
    two = NodeTable(2, codec)
    ping = NodeTable(1, codec)._message(TYPE_PING, T0)
    assert len(exchange(two, two, [(ping, A)], A, T0)) == 1
    # the same PING replayed, even from the "right" address, moves nothing
    assert exchange(two, two, [(ping, A)], ("203.0.113.66", 5884), T0 + 1) == []
    assert two.management_address(1) == A and two.drops == {"replay": 1}
    old = NodeTable(1, codec)._message(TYPE_PING, T0 - 120)
    assert exchange(two, two, [(old, A)], A, T0) == []
    future = NodeTable(1, codec)._message(TYPE_PING, T0 + 120)
    assert exchange(two, two, [(future, A)], A, T0) == []
    assert two.drops == {"replay": 1, "stale_timestamp": 2}


def test_ping_and_pong_sent_in_the_same_millisecond_are_both_fresh() -> None:
    codec = ManagementCodec(SECRET)
    one = NodeTable(1, codec)
    first = codec.decode(one._message(TYPE_PING, T0))
    second = codec.decode(one._message(TYPE_PONG, T0))
    assert second.timestamp_ms == first.timestamp_ms + 1
    two = NodeTable(2, codec)
    receive(two, first, A, T0)
    receive(two, second, A, T0)
    assert two.drops == {}


def test_set_group_drops_own_addresses_and_duplicates() -> None:
    one = NodeTable(1, ManagementCodec(), own_addresses=[A])
    one.set_group([A, B, B, C])
    assert sorted(addresses(tick(one, 0.0))) == [B, C]
    one.set_group([C])
    assert tick(one, 2.0) == []
    assert addresses(tick(one, 10.0)) == [C]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30))
def test_hostile_datagrams_never_change_a_keyed_table(datagrams: list[bytes]) -> None:
    """Random bytes, forged PINGs (wrong key) and Californium's unkeyed PINGs move nothing."""
    codec = ManagementCodec(SECRET)
    table = NodeTable(1, codec, own_addresses=[A])
    table.receive_datagram(NodeTable(2, codec)._message(TYPE_PING, T0), B, T0)
    forged = [NodeTable(2, ManagementCodec(b"guess"))._message(TYPE_PING, T0 + 1),
              NodeTable(2, ManagementCodec())._message(TYPE_PING, T0 + 1)]
    for datagram in [*datagrams, *forged]:
        table.receive_datagram(datagram, ("203.0.113.66", 1), T0 + 1)
    assert table.nodes() == {2: B}


def test_node_ids_beyond_one_byte_are_dropped() -> None:
    one = NodeTable(1, ManagementCodec())
    assert receive(one, NodeMessage(TYPE_PING, 256, NodeState.UP), B, 1.0) == []
    assert one.nodes() == {} and one.drops == {"bad_node_id": 1}


def test_a_late_listener_hears_the_nodes_known_so_far() -> None:
    one = NodeTable(1, ManagementCodec())
    discovery = DynamicDiscovery(Clock(), one, lambda datagram, address: None)
    discovery.datagram_received(ManagementCodec().encode_node(TYPE_PING, 2, NodeState.UP), B)
    seen: list[tuple[int, object]] = []
    discovery.add_listener(lambda node, address: seen.append((node, address)))
    assert seen == [(2, B)]


def test_the_discovery_tells_its_listeners_what_the_table_learns() -> None:
    clock = Clock()
    clock.advance(1.0)
    one = NodeTable(1, ManagementCodec())
    sent: list[Packet] = []
    discovery = DynamicDiscovery(clock, one, lambda datagram, address: sent.append((datagram, address)))
    seen: list[tuple[int, object]] = []
    discovery.add_listener(lambda node, address: seen.append((node, address)))
    discovery.datagram_received(ManagementCodec().encode_node(TYPE_PING, 2, NodeState.UP), B)
    assert seen == [(2, B)] and addresses(sent) == [B]  # the PING is answered with a PONG
    assert discovery.management_address(2) == B and discovery.own_node_id == 1
