"""Who the other cluster nodes are, learned with PING/PONG (static tables: :mod:`nettester.cluster.discovery`).

:class:`NodeTable` is the sans-IO core of dynamic (and Kubernetes) discovery:
management PING/PONG messages and the time go in, datagrams to send come
out, and listeners hear node id -> management address changes. Timing, as
Californium's dynamic cluster: a timer every 2 s; a node silent for 4 s is
pinged (again on every tick), and removed once silent for 6 s more; group
addresses that no known node answers from are pinged every 10 s. Unlike
Californium, a two-node group pings too: every group address other than
our own is pinged until it answers, whatever the group's size.

With a group secret, PING/PONG carry the sender's time in ms; a message is
accepted only when that time is within ``replay_window`` of ours and later
than the last one accepted from that node, so a recorded PING/PONG cannot
be replayed to move a node to an attacker's address.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from zope.interface import implementer

from nettester.cluster.wire import (
    TYPE_PING,
    TYPE_PONG,
    ManagementCodec,
    NodeMessage,
    NodeState,
)
from nettester.interfaces import INodeDiscovery

Address = tuple[str, int]
Listener = Callable[[int, "Address | None"], None]

TIMER_INTERVAL = 2.0
PING_AFTER = 4.0
REMOVE_AFTER = 6.0
GROUP_PING_INTERVAL = 10.0
REPLAY_WINDOW = 60.0
MAX_NODE_ID = 255


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A management datagram to send."""

    address: Address
    datagram: bytes


class NodeListeners(ABC):
    """Node change listeners: the base of every INodeDiscovery provider."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    @abstractmethod
    def nodes(self) -> dict[int, Address]:
        """Every known other node id -> management address."""

    def addListener(self, listener: Listener) -> None:
        """Register ``listener`` and tell it every node known now."""
        self._listeners.append(listener)
        for node_id, address in self.nodes().items():
            listener(node_id, address)

    def _notify(self, node_id: int, address: Address | None) -> None:
        for listener in self._listeners:
            listener(node_id, address)


class _Node:
    __slots__ = ("address", "state", "last_seen")

    def __init__(self, address: Address, state: NodeState, now: float) -> None:
        self.address = address
        self.state = state
        self.last_seen = now


@implementer(INodeDiscovery)
class NodeTable(NodeListeners):
    """Dynamic discovery's core (see the module docstring).

    :param group: management addresses of the group (possibly our own among them).
    :param own_addresses: our own management addresses, never pinged.
    """

    def __init__(
        self,
        own_node_id: int,
        codec: ManagementCodec,
        group: Iterable[Address] = (),
        own_addresses: Iterable[Address] = (),
        state: NodeState = NodeState.UP,
        replay_window: float = REPLAY_WINDOW,
    ) -> None:
        super().__init__()
        self.ownNodeId = own_node_id
        self.state = state
        self._codec = codec
        self._own_addresses = set(own_addresses)
        self._group: list[Address] = []
        self._last_group_ping: dict[Address, float] = {}
        self._replay_window_ms = replay_window * 1000.0
        self._nodes: dict[int, _Node] = {}
        self._last_timestamp: dict[int, int] = {}
        self._last_sent_ms = 0
        self._next_tick: float | None = None
        self.drops: dict[str, int] = {}
        self.set_group(group)

    # -- INodeDiscovery ---------------------------------------------------------

    def managementAddress(self, nodeId: int) -> Address | None:
        node = self._nodes.get(nodeId)
        return node.address if node is not None else None

    def nodes(self) -> dict[int, Address]:
        return {node_id: node.address for node_id, node in self._nodes.items()}

    # -- input ------------------------------------------------------------------

    def add_own_address(self, address: Address) -> None:
        """One more address of our own (known once the management socket listens): never pinged."""
        self._own_addresses.add(address)
        self.set_group(self._group)

    def set_group(self, addresses: Iterable[Address]) -> None:
        """Replace the group addresses (Kubernetes discovery re-lists them)."""
        self._group = [address for address in dict.fromkeys(addresses) if address not in self._own_addresses]
        self._last_group_ping = {a: t for a, t in self._last_group_ping.items() if a in self._group}

    def receive(self, message: NodeMessage, source: Address, now: float) -> list[Outgoing]:
        """An authenticated PING or PONG from ``source``; answers a PING with a PONG."""
        if message.node_id > MAX_NODE_ID:
            self._count("bad_node_id")  # a CID names its node in one byte
            return []
        if not self._fresh(message, now):
            return []
        if message.node_id == self.ownNodeId:
            if source not in self._own_addresses:
                self._count("own_id_conflict")
            return []
        node = self._nodes.get(message.node_id)
        if node is None:
            self._nodes[message.node_id] = _Node(source, message.state, now)
            self._notify(message.node_id, source)
        else:
            node.last_seen = now
            node.state = message.state
            if node.address != source:
                node.address = source
                self._notify(message.node_id, source)
        if message.kind == TYPE_PING:
            return [Outgoing(source, self._message(TYPE_PONG, now))]
        return []

    def handle_timer(self, now: float) -> list[Outgoing]:
        """The periodic tick: ping silent nodes and unanswered group addresses, remove dead nodes."""
        self._next_tick = now + TIMER_INTERVAL
        outgoing: list[Outgoing] = []
        for node_id, node in list(self._nodes.items()):
            silent = now - node.last_seen
            if silent >= PING_AFTER + REMOVE_AFTER:
                del self._nodes[node_id]
                self._notify(node_id, None)
            elif silent >= PING_AFTER:
                outgoing.append(Outgoing(node.address, self._message(TYPE_PING, now)))
        known = {node.address for node in self._nodes.values()}
        for address in self._group:
            if address in known:
                continue
            if now - self._last_group_ping.get(address, float("-inf")) >= GROUP_PING_INTERVAL:
                self._last_group_ping[address] = now
                outgoing.append(Outgoing(address, self._message(TYPE_PING, now)))
        return outgoing

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` is due next; None before the first tick (call it at start)."""
        return self._next_tick

    # -- internals --------------------------------------------------------------

    def _message(self, kind: int, now: float) -> bytes:
        # Strictly increasing timestamps, so a PING and a PONG in the same
        # millisecond are both fresh for the receiver.
        self._last_sent_ms = max(int(now * 1000), self._last_sent_ms + 1)
        return self._codec.encode_node(kind, self.ownNodeId, self.state, self._last_sent_ms)

    def _fresh(self, message: NodeMessage, now: float) -> bool:
        timestamp = message.timestamp_ms
        if timestamp is None:
            return True
        if abs(now * 1000.0 - timestamp) > self._replay_window_ms:
            self._count("stale_timestamp")
            return False
        if timestamp <= self._last_timestamp.get(message.node_id, -1):
            self._count("replay")
            return False
        self._last_timestamp[message.node_id] = timestamp
        return True

    def _count(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
