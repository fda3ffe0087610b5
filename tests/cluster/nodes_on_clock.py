"""Dynamic discovery on a ``Clock``, for the router and replication tests."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from nettester.cluster.discovery import DynamicDiscovery
from nettester.cluster.nodes import NodeTable
from nettester.cluster.wire import TYPE_PING, ManagementCodec


class DiscoveryOnClock:
    """Node ``own_node_id``'s dynamic discovery on its own ``Clock``: PINGs arrive as datagrams,
    and the table's 2 s timer runs as the clock is moved on (``at``)."""

    def __init__(self, own_node_id: int, codec: ManagementCodec | None = None, start: float = 0.0) -> None:
        self.clock = Clock()
        self.clock.advance(start)
        self.codec = codec or ManagementCodec()
        self.table = NodeTable(own_node_id, self.codec)
        self.sent: list[tuple[bytes, Any]] = []
        self.discovery = DynamicDiscovery(self.clock, self.table, lambda datagram, address: self.sent.append(
            (datagram, address)))

    def at(self, when: float) -> None:
        """Move the clock on to ``when``, running every tick due by then at its own time."""
        while (calls := self.clock.getDelayedCalls()) and min(call.getTime() for call in calls) <= when:
            self.clock.advance(max(0.0, min(call.getTime() for call in calls) - self.clock.seconds()))
        self.clock.advance(max(0.0, when - self.clock.seconds()))

    def ping_from(self, node_id: int, address: Any, when: float | None = None) -> None:
        """A PING from node ``node_id`` at ``address`` arrives (at ``when``, else now)."""
        if when is not None:
            self.at(when)
        self.discovery.datagram_received(NodeTable(node_id, self.codec)._message(TYPE_PING, self.clock.seconds()),
                                         address)
