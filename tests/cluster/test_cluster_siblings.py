"""A cluster node of N workers: worker 0's node table, shared with its siblings (on a Clock, no processes)."""

from __future__ import annotations

from typing import Any

from zope.interface.verify import verifyObject

from nettester.cluster.nodes import PING_AFTER, REMOVE_AFTER, TIMER_INTERVAL, NodeTable
from nettester.cluster.router import LOCAL, CidRouter, Forward
from nettester.cluster.siblings import NODES_KEY, DiscoverySharing, SharedDiscovery, decode_nodes, encode_nodes
from nettester.cluster.wire import ManagementCodec
from nettester.interfaces import INodeDiscovery
from nettester.workers import WorkerContext
from tests.cluster.nodes_on_clock import DiscoveryOnClock
from tests.logcapture import log_events

B = ("127.0.0.1", 25884)
C = ("127.0.0.1", 35884)


def context(index: int = 0) -> tuple[WorkerContext, list[Any]]:
    """A worker context whose shared values are collected."""
    shared: list[Any] = []
    worker = WorkerContext(index, 2, publish=lambda key, value: shared.append((key, value)),
                           steer_with=lambda sock, factory: None)
    return worker, shared


def cid_record(node_id: int) -> bytes:
    return bytes((25, 254, 253, 0, 1)) + bytes(6) + bytes((node_id, 1, 9, 9, 9, 9)) + b"\x00\x01x"


def test_the_shared_table_round_trips_and_bad_ones_are_refused() -> None:
    assert decode_nodes(encode_nodes({3: C, 2: B}, True)) == ({2: B, 3: C}, True)
    for bad in (None, [], {"nodes": 1}, {"nodes": [[2, "h"]]}, {"nodes": [[256, "h", 1]]}, {"nodes": [["2", "h", 1]]},
                {"nodes": [[2, "h", 0]]}):
        try:
            decode_nodes(bad)
        except ValueError as error:
            assert "not" in str(error)
        else:
            raise AssertionError(f"accepted {bad!r}")


def test_a_siblings_routers_follow_worker_0s_table_failover_included() -> None:
    shared = SharedDiscovery(1)
    verifyObject(INodeDiscovery, shared)
    router = CidRouter(shared, failover=True)
    assert router.decide(cid_record(2)).reason == "unknown_node"  # type: ignore[union-attr]
    heard: list[tuple[int, Any]] = []
    shared.add_listener(lambda node_id, address: heard.append((node_id, address)))
    shared.received(encode_nodes({1: ("127.0.0.1", 15884), 2: B, 3: C}, False))
    assert shared.nodes() == {2: B, 3: C}, "our own id is not another node"
    assert router.decide(cid_record(2)) == Forward(2, B) and not shared.ready
    shared.received(encode_nodes({2: ("127.0.0.2", 25884), 3: C}, True))  # node 2 moved
    assert router.decide(cid_record(2)) == Forward(2, ("127.0.0.2", 25884))
    shared.received(encode_nodes({3: C}, True))  # node 2 is gone
    assert heard == [(2, B), (3, C), (2, ("127.0.0.2", 25884)), (2, None)]
    assert shared.ready and router.decide(cid_record(2)) == Forward(3, C), "2's successor, 3, took it over"
    shared.received(encode_nodes({}, True))  # every other node gone: node 1 takes them over
    assert router.decide(cid_record(2)) is LOCAL and router.decide(cid_record(3)) is LOCAL


def test_an_unusable_shared_table_is_logged_and_ignored() -> None:
    shared = SharedDiscovery(1)
    shared.received(encode_nodes({2: B}, True))
    with log_events() as events:
        shared.received({"nodes": "garbage"})
    assert shared.nodes() == {2: B}
    assert [event["event"] for event in events] == ["cluster_bad_shared_table"]
    shared.received(None)  # the parent kept nothing yet
    assert shared.nodes() == {2: B}


def test_worker_0_shares_nothing_before_the_kept_copy_and_every_change_after() -> None:
    lab = DiscoveryOnClock(1)
    worker, shared = context()
    DiscoverySharing(worker, lab.discovery, lambda: True)
    lab.discovery.startService()
    lab.ping_from(2, B)
    assert shared == [], "a table the parent's kept copy may still complete is not shared"
    worker.shared_received({NODES_KEY: encode_nodes({2: B, 3: C}, True)})  # worker 0 restarted: its old table
    assert lab.discovery.nodes() == {2: B, 3: C}, "the remembered node 3 is known at once"
    assert shared == [(NODES_KEY, encode_nodes({2: B, 3: C}, True))]
    # Node 3 stays silent: removed like any node it stopped hearing from, and the siblings are told.
    lab.ping_from(2, B, when=PING_AFTER + REMOVE_AFTER - 1.0)
    lab.at(PING_AFTER + REMOVE_AFTER + TIMER_INTERVAL)
    assert shared[-1] == (NODES_KEY, encode_nodes({2: B}, True))
    lab.discovery.stopService()


def test_a_first_worker_0_shares_its_empty_table_at_once() -> None:
    lab = DiscoveryOnClock(1)
    worker, shared = context()
    ready = [False]
    sharing = DiscoverySharing(worker, lab.discovery, lambda: ready[0])
    worker.shared_received({})
    assert shared == [(NODES_KEY, encode_nodes({}, False))], "siblings start from it (not ready: pods unlisted)"
    ready[0] = True
    sharing.publish()  # the pods were listed (KubernetesDiscovery.on_ready)
    assert shared[-1] == (NODES_KEY, encode_nodes({}, True))


def test_a_remembered_node_yields_to_what_the_table_heard() -> None:
    table = NodeTable(1, ManagementCodec())
    table.remember(2, B, 10.0)
    table.remember(2, C, 11.0)  # known already: kept
    table.remember(1, C, 11.0)  # ourselves
    table.remember(300, C, 11.0)  # not a node id
    assert table.nodes() == {2: B}
    assert [(event.node_id, event.address) for event in iter(table.next_event, None)] == [(2, B)]
