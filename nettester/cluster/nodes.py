"""Who the other cluster nodes are, learned with PING/PONG (static tables: ``nettester.cluster.discovery``).

``NodeTable`` is the sans-IO core of dynamic (and Kubernetes) discovery, an
``interfaces.DatagramCore``: management PING/PONG datagrams and the time go
in; PINGs and PONGs to send, one timer, and ``NodeChanged`` events (node id ->
management address, or gone) come out. Timing, as Californium's dynamic
cluster: a timer every 2 s; a node silent for 4 s is pinged (again on every
tick), and removed once silent for 6 s more; group addresses that no known
node answers from are pinged every 10 s. Unlike Californium, a two-node
group pings too: every group address other than our own is pinged until it
answers, whatever the group's size.

With a group secret, PING/PONG carry the sender's time in ms; a message is
accepted only when that time is within ``replay_window`` of ours and later
than the last one accepted from that node, so a recorded PING/PONG cannot
be replayed to move a node to an attacker's address.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nettester.cluster.wire import (
    TYPE_PING,
    TYPE_PONG,
    ManagementCodec,
    ManagementError,
    NodeMessage,
    NodeState,
)

Address = tuple[str, int]
Listener = Callable[[int, "Address | None"], None]

TIMER_INTERVAL = 2.0
PING_AFTER = 4.0
REMOVE_AFTER = 6.0
GROUP_PING_INTERVAL = 10.0
REPLAY_WINDOW = 60.0
MAX_NODE_ID = 255


@dataclass(frozen=True, slots=True)
class NodeChanged:
    """Node ``node_id`` appeared at or moved to ``address``; ``None``: it is gone."""

    node_id: int
    address: Address | None


class NodeListeners(ABC):
    """Node change listeners: the base of every ``INodeDiscovery`` provider."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    @abstractmethod
    def nodes(self) -> dict[int, Address]:
        """Every known other node id -> management address."""

    def add_listener(self, listener: Listener) -> None:
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


class NodeTable:
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
        self.own_node_id = own_node_id
        self.state = state
        self._codec = codec
        self._own_addresses = set(own_addresses)
        self._group: list[Address] = []
        self._last_group_ping: dict[Address, float] = {}
        self._replay_window_ms = replay_window * 1000.0
        self._nodes: dict[int, _Node] = {}
        self._last_timestamp: dict[int, int] = {}
        self._last_sent_ms = 0
        self._next_tick = 0.0  # the first tick is due at once
        self._outgoing: list[tuple[bytes, Address]] = []
        self._events: deque[NodeChanged] = deque()
        self.drops: dict[str, int] = {}
        self.set_group(group)

    # -- queries ------------------------------------------------------------------

    def management_address(self, node_id: int) -> Address | None:
        node = self._nodes.get(node_id)
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

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A management datagram from ``addr``: an authenticated PING is answered with a PONG;
        anything else that is not a valid PING or PONG is a counted drop."""
        try:
            message = self._codec.decode(data)
        except ManagementError as error:
            self._count(error.reason)
            return
        if not isinstance(message, NodeMessage):
            self._count("not_ping_pong")
            return
        self.receive_message(message, addr, now)

    def receive_message(self, message: NodeMessage, source: Address, now: float) -> None:
        """An authenticated, decoded PING or PONG from ``source``."""
        if message.node_id > MAX_NODE_ID:
            self._count("bad_node_id")  # a CID names its node in one byte
            return
        if not self._fresh(message, now):
            return
        if message.node_id == self.own_node_id:
            if source not in self._own_addresses:
                self._count("own_id_conflict")
            return
        node = self._nodes.get(message.node_id)
        if node is None:
            self._nodes[message.node_id] = _Node(source, message.state, now)
            self._events.append(NodeChanged(message.node_id, source))
        else:
            node.last_seen = now
            node.state = message.state
            if node.address != source:
                node.address = source
                self._events.append(NodeChanged(message.node_id, source))
        if message.kind == TYPE_PING:
            self._outgoing.append((self._message(TYPE_PONG, now), source))

    def remember(self, node_id: int, address: Address, now: float) -> None:
        """A node another process of ours knew (the worker that ran this table before a restart):
        known from now on, as if it had just answered, until its silence removes it as usual.
        A node this table knows already keeps what it heard itself."""
        if node_id == self.own_node_id or node_id in self._nodes or not 0 <= node_id <= MAX_NODE_ID:
            return
        self._nodes[node_id] = _Node(address, NodeState.UP, now)
        self._events.append(NodeChanged(node_id, address))

    def handle_timer(self, now: float) -> None:
        """The periodic tick: ping silent nodes and unanswered group addresses, remove dead nodes."""
        self._next_tick = now + TIMER_INTERVAL
        for node_id, node in list(self._nodes.items()):
            silent = now - node.last_seen
            if silent >= PING_AFTER + REMOVE_AFTER:
                del self._nodes[node_id]
                self._events.append(NodeChanged(node_id, None))
            elif silent >= PING_AFTER:
                self._outgoing.append((self._message(TYPE_PING, now), node.address))
        known = {node.address for node in self._nodes.values()}
        for address in self._group:
            if address in known:
                continue
            if now - self._last_group_ping.get(address, float("-inf")) >= GROUP_PING_INTERVAL:
                self._last_group_ping[address] = now
                self._outgoing.append((self._message(TYPE_PING, now), address))

    # -- output -----------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """PINGs and PONGs as ``(datagram, address)``; each is handed out once."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def get_timer(self) -> float:
        """When ``handle_timer`` is due next (at once before the first tick)."""
        return self._next_tick

    def next_event(self) -> NodeChanged | None:
        return self._events.popleft() if self._events else None

    # -- internals --------------------------------------------------------------

    def _message(self, kind: int, now: float) -> bytes:
        # Strictly increasing timestamps, so a PING and a PONG in the same
        # millisecond are both fresh for the receiver.
        self._last_sent_ms = max(int(now * 1000), self._last_sent_ms + 1)
        return self._codec.encode_node(kind, self.own_node_id, self.state, self._last_sent_ms)

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
