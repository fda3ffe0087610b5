"""The CID router's decision per datagram."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.cluster.discovery import StaticDiscovery
from nettester.cluster.router import LOCAL, CidRouter, Drop, Forward
from tests.cluster.nodes_on_clock import DiscoveryOnClock

A = ("10.0.0.1", 15884)
B = ("10.0.0.2", 25884)


def cid_record(cid: bytes, payload: bytes = b"\x00" * 24) -> bytes:
    """A tls12_cid record header (RFC 9146 section 4) and payload."""
    return bytes([25, 254, 253, 0, 1]) + (7).to_bytes(6, "big") + cid + len(payload).to_bytes(2, "big") + payload


def handshake_record() -> bytes:
    return bytes([22, 254, 253, 0, 0]) + bytes(6) + (10).to_bytes(2, "big") + bytes(10)


def router(own: int = 1, cid_length: int = 6) -> CidRouter:
    return CidRouter(StaticDiscovery(own, {1: A, 2: B}), cid_length=cid_length)


def test_own_cid_and_handshakes_are_local() -> None:
    r = router()
    assert r.decide(cid_record(b"\x01abcde")) is LOCAL
    assert r.decide(handshake_record()) is LOCAL
    assert r.decide(bytes([23, 254, 253]) + bytes(20)) is LOCAL
    assert r.decide(b"") is LOCAL
    assert r.forwarded == 0 and r.drops == {}


def test_another_nodes_cid_is_forwarded_to_its_management_address() -> None:
    r = router()
    assert r.decide(cid_record(b"\x02abcde")) == Forward(2, B)
    assert r.decide(cid_record(b"\x02abcde") + handshake_record()) == Forward(2, B)  # first record decides
    assert r.forwarded == 2


def test_unknown_node_and_truncated_records_are_dropped_and_counted() -> None:
    r = router()
    assert r.decide(cid_record(b"\x07abcde")) == Drop("unknown_node")
    assert r.decide(cid_record(b"\x02abcde")[:18]) == Drop("truncated_cid_record")
    assert r.drops == {"unknown_node": 1, "truncated_cid_record": 1}


def test_cid_length_is_honoured_and_at_least_6() -> None:
    r = router(cid_length=8)
    assert r.decide(cid_record(b"\x02" * 6, b"")) == Drop("truncated_cid_record")  # 6 + 2 < 8 + 2
    assert r.decide(cid_record(b"\x02abcdefg")) == Forward(2, B)
    with pytest.raises(ValueError, match="at least 6"):
        router(cid_length=5)


def test_dynamic_discovery_changes_the_routes() -> None:
    nodes = DiscoveryOnClock(1)
    r = CidRouter(nodes.discovery)
    assert r.decide(cid_record(b"\x03abcde")) == Drop("unknown_node")
    nodes.ping_from(3, B, 0.0)
    assert r.decide(cid_record(b"\x03abcde")) == Forward(3, B)
    nodes.at(10.0)
    assert r.decide(cid_record(b"\x03abcde")) == Drop("unknown_node")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_datagram_gets_a_decision(datagram: bytes) -> None:
    decision = router().decide(datagram)
    assert decision is LOCAL or isinstance(decision, (Forward, Drop))
    if isinstance(decision, Forward):
        assert datagram[0] == 25 and datagram[11] == 2


# -- fail-over: a lost node's CIDs go to its successor ------------------------------------------


def test_successor_is_the_next_live_id_wrapping_around() -> None:
    from nettester.cluster.router import successor

    assert successor(2, [1, 2, 3]) == 3
    assert successor(3, [1, 2, 3]) == 1
    assert successor(2, [1, 3]) == 3  # 2 is gone: 3 takes over
    assert successor(5, [1, 3]) == 1
    assert successor(1, [1]) is None


def test_a_lost_nodes_cids_go_to_its_successor_with_failover() -> None:
    nodes = DiscoveryOnClock(1)
    r = CidRouter(nodes.discovery, failover=True)
    C = ("10.0.0.3", 35884)
    nodes.ping_from(2, B, 0.0)
    nodes.ping_from(3, C, 0.0)
    assert r.backup() == (2, B)
    assert r.decide(cid_record(b"\x07abcde")) == Drop("unknown_node")  # never known: still dropped
    nodes.ping_from(3, C, 9.0)
    nodes.at(10.0)  # node 2 silent for 10 s: removed
    assert r.decide(cid_record(b"\x02abcde")) == Forward(3, C)  # 3 is 2's successor
    assert r.backup() == (3, C)
    nodes.at(20.0)  # node 3 lost too: we take over both
    assert r.decide(cid_record(b"\x02abcde")) is LOCAL
    assert r.decide(cid_record(b"\x03abcde")) is LOCAL
    assert r.backup() is None
    nodes.ping_from(2, B, 21.0)  # 2 is back: its CIDs go home
    assert r.decide(cid_record(b"\x02abcde")) == Forward(2, B)
    assert r.decide(cid_record(b"\x03abcde")) is LOCAL  # 3's successor is still us (wrapping around)


def test_without_failover_a_lost_nodes_cids_are_dropped() -> None:
    nodes = DiscoveryOnClock(1)
    r = CidRouter(nodes.discovery)
    nodes.ping_from(2, B, 0.0)
    nodes.at(10.0)
    assert r.decide(cid_record(b"\x02abcde")) == Drop("unknown_node")
