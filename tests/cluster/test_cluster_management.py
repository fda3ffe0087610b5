"""The management endpoint and the dynamic discovery driver, on fakes and a Clock."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from nettester.cluster.discovery import DynamicDiscovery
from nettester.cluster.management import ManagementEndpoint
from nettester.cluster.nodes import NodeTable
from nettester.cluster.wire import (
    TYPE_IN,
    TYPE_OUT,
    TYPE_PING,
    TYPE_PONG,
    ManagementCodec,
    NodeState,
)
from nettester.metrics import MetricSet
from tests.logcapture import log_events

A = ("10.0.0.1", 5884)
B = ("10.0.0.2", 5884)
CLIENT = ("192.0.2.9", 40000)


class FakeUdp:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, datagram: bytes, address: Any) -> None:
        self.written.append((datagram, address))


def endpoint(codec: ManagementCodec, table: NodeTable | None = None, sibling: bool = False
             ) -> tuple[ManagementEndpoint, FakeUdp, list[tuple[str, bytes, Any, Any]]]:
    """A management endpoint on a fake socket; with ``table``, dynamic discovery answers through it;
    ``sibling``: a worker other than the discovery worker (``--workers``)."""
    calls: list[tuple[str, bytes, Any, Any]] = []
    clock = Clock()
    management: ManagementEndpoint | None = None

    def send(datagram: bytes, address: Any) -> bool:
        assert management is not None
        return management.send(datagram, address)

    discovery = DynamicDiscovery(clock, table, send) if table is not None else None
    management = ManagementEndpoint(
        clock, codec,
        lambda records, client, node: calls.append(("in", records, client, node)),
        lambda records, client, node: calls.append(("out", records, client, node)),
        MetricSet("test"), discovery, sibling=sibling,
    )
    udp = FakeUdp()
    management.transport = udp  # type: ignore[assignment]
    return management, udp, calls


def test_in_and_out_records_reach_their_handlers_and_ping_gets_a_pong() -> None:
    codec = ManagementCodec(b"k")
    table = NodeTable(1, codec)
    management, udp, calls = endpoint(codec, table)
    management.datagramReceived(codec.encode_records(TYPE_IN, CLIENT, b"\x19rec"), B)
    management.datagramReceived(codec.encode_records(TYPE_OUT, CLIENT, b"\x19ans"), B)
    assert calls == [("in", b"\x19rec", CLIENT, B), ("out", b"\x19ans", CLIENT, B)]
    management.datagramReceived(NodeTable(2, codec)._message(TYPE_PING, 0.0), B)
    ((pong, address),) = udp.written
    assert address == B and codec.decode(pong).kind == TYPE_PONG
    assert table.management_address(2) == B
    management.forward(b"\x19x", CLIENT, A)
    management.backward(b"\x19y", CLIENT, B)
    assert [codec.decode(d).kind for d, _ in udp.written[1:]] == [TYPE_IN, TYPE_OUT]
    assert (management.sent_in.value, management.sent_out.value) == (1, 1)
    assert (management.received_in.value, management.received_out.value) == (1, 1)


def test_drops_are_counted_with_the_node_tables_reasons() -> None:
    codec = ManagementCodec(b"k")
    table = NodeTable(1, codec)
    management, _, calls = endpoint(codec, table)
    ping = NodeTable(2, codec)._message(TYPE_PING, 0.0)
    management.datagramReceived(ping, B)
    management.datagramReceived(ping, B)  # replayed
    management.datagramReceived(b"\x3f", B)
    management.datagramReceived(ManagementCodec().encode_records(TYPE_IN, CLIENT, b"\x19" * 20), B)
    assert management.dropped.values == {"replay": 1, "truncated": 1, "bad_mac": 1}
    assert calls == []


def test_static_mode_drops_pings_and_unauthenticated_mode_warns() -> None:
    with log_events() as events:
        management, udp, _ = endpoint(ManagementCodec())
    assert [e.get("event") for e in events] == ["cluster_unauthenticated"]
    management.datagramReceived(ManagementCodec().encode_node(TYPE_PING, 2, NodeState.UP), B)
    assert management.dropped.values == {"static_cluster_ping": 1} and udp.written == []


def test_a_sibling_worker_drops_the_pings_the_kernel_hands_it_while_worker_0_is_down() -> None:
    codec = ManagementCodec(b"k")
    management, udp, calls = endpoint(codec, sibling=True)
    management.datagramReceived(NodeTable(2, codec)._message(TYPE_PING, 0.0), B)
    assert management.dropped.values == {"ping_on_sibling_worker": 1} and udp.written == [] and calls == []
    # The records themselves are any worker's business.
    management.datagramReceived(codec.encode_records(TYPE_IN, CLIENT, b"\x19" * 20), B)
    assert [call[0] for call in calls] == ["in"]


def test_dynamic_discovery_ticks_every_2_seconds() -> None:
    clock = Clock()
    clock.advance(1000.0)
    table = NodeTable(1, ManagementCodec(), group=[B])
    sent: list[tuple[bytes, Any]] = []
    service = DynamicDiscovery(clock, table, lambda datagram, address: sent.append((datagram, address)))
    service.startService()
    assert [address for _, address in sent] == [B]
    clock.advance(2.0)
    assert len(sent) == 1  # the unknown group address is pinged every 10 s only
    clock.advance(8.0)
    assert len(sent) == 2
    assert clock.getDelayedCalls()[0].getTime() == 1012.0
    service.stopService()
    assert clock.getDelayedCalls() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=48) | st.builds(lambda kind, tail: bytes([kind]) + tail,
                                                   st.sampled_from([60, 61, 62, 63]), st.binary(max_size=40)),
                max_size=20))
def test_hostile_datagrams_never_raise_nor_reach_the_handlers(datagrams: list[bytes]) -> None:
    codec = ManagementCodec(b"k")
    table = NodeTable(1, codec)
    management, udp, calls = endpoint(codec, table)
    for datagram in datagrams:
        management.datagramReceived(datagram, B)
    assert calls == [] and udp.written == [] and table.nodes() == {}
    assert management.dropped.total == len(datagrams)


def test_a_refused_send_is_a_counted_drop() -> None:
    codec = ManagementCodec()
    management, udp, _ = endpoint(codec)

    def refuse(datagram: bytes, address: Any) -> None:
        raise OSError(105, "No buffer space available")

    udp.write = refuse  # type: ignore[method-assign]
    management.forward(b"\x19x", CLIENT, A)
    management.backward(b"\x19y", CLIENT, B)
    assert management.dropped.values == {"send_error": 2}
    assert (management.sent_in.value, management.sent_out.value) == (0, 0)


def test_state_records_reach_replication_and_forged_ones_are_dropped() -> None:
    codec = ManagementCodec(b"k")
    management, _, calls = endpoint(codec, NodeTable(1, codec))
    genuine = codec.encode_state(b"\x02abcde", b"snapshot", 5)
    management.datagramReceived(genuine, B)
    assert management.dropped.values == {"state_not_replicating": 1}  # no replication running (static mode)
    states: list[Any] = []
    management.on_state = lambda state, source: states.append((state.cid, state.snapshot, source))  # type: ignore
    management.datagramReceived(genuine, B)
    management.on_state = lambda state, source: "stale_state"
    management.datagramReceived(genuine, B)
    management.datagramReceived(ManagementCodec(b"attacker").encode_state(b"\x02abcde", b"forged", 6), B)
    management.datagramReceived(genuine[:-1] + bytes([genuine[-1] ^ 1]), B)
    assert states == [(b"\x02abcde", b"snapshot", B)]
    assert management.dropped.values == {"state_not_replicating": 1, "stale_state": 1, "bad_state_record": 2}
    assert calls == []
