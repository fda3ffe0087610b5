"""The CID router: which node owns the DTLS record that just arrived?

It looks at the first record of a datagram only (RFC 6347 section 4.1 header:
type(1) version(2) epoch(2) sequence(6), then for ``tls12_cid`` records,
RFC 9146 section 4, the CID before the length). A ``tls12_cid`` record (25)
whose CID starts with another known node's id goes to that node's management
address; anything else (handshakes, alerts, our own CIDs) is local; a CID
naming a node nobody knows is dropped and counted. No full parse: two byte
reads and one dict lookup per datagram.

With fail-over (``failover=True``, when nodes replicate their DTLS state, see
:mod:`nettester.cluster.replication`), a node that was known and has left the
cluster is taken over by its successor: the next live node id above it,
wrapping around (:func:`successor`), which holds the replicas of its
connections. Its CIDs are then routed there (or kept local when we are the
successor) instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nettester.interfaces import INodeDiscovery

Address = tuple[str, int]

CONTENT_TYPE_TLS12_CID = 25  # RFC 9146 section 4
CID_OFFSET = 11  # type(1) + version(2) + epoch(2) + sequence number(6)
MIN_CLUSTER_CID_LENGTH = 6


@dataclass(frozen=True, slots=True)
class Local:
    """Hand the datagram to this node's DTLS endpoint."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the datagram, as an IN management record, to ``address`` (node ``node_id``)."""

    node_id: int
    address: Address


@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the datagram; ``reason`` is its metrics label."""

    reason: str


LOCAL = Local()
DROP_UNKNOWN_NODE = Drop("unknown_node")
DROP_TRUNCATED = Drop("truncated_cid_record")

Decision = Local | Forward | Drop


def successor(node_id: int, live: Iterable[int]) -> int | None:
    """The node that backs up and takes over ``node_id``: the next live id above it, wrapping around.

    None when no other node is live.
    """
    others = sorted(other for other in live if other != node_id)
    if not others:
        return None
    return next((other for other in others if other > node_id), others[0])


class CidRouter:
    """Decides per datagram: :data:`LOCAL`, a :class:`Forward` or a :class:`Drop`.

    The decisions are precomputed per node id and refreshed by the
    discovery's listener, so :meth:`decide` allocates nothing.

    :param cid_length: the cluster's CID length (at least 6), so a record too
        short to hold a whole CID is recognised.
    :param failover: route the CIDs of nodes that left to their successor
        (see the module docstring) instead of dropping them.
    """

    def __init__(self, discovery: INodeDiscovery, cid_length: int = MIN_CLUSTER_CID_LENGTH,
                 failover: bool = False) -> None:
        if cid_length < MIN_CLUSTER_CID_LENGTH:
            raise ValueError(f"cluster CIDs need at least {MIN_CLUSTER_CID_LENGTH} bytes, got {cid_length}")
        self.own_node_id = discovery.own_node_id
        self._minimum_length = CID_OFFSET + cid_length + 2  # + the record length field
        self._failover = failover
        self._discovery = discovery
        self._departed: set[int] = set()
        self._routes: dict[int, Decision] = {self.own_node_id: LOCAL}
        self.drops: dict[str, int] = {}
        self.forwarded = 0
        discovery.add_listener(self._node_changed)

    def _node_changed(self, node_id: int, address: Address | None) -> None:
        if node_id == self.own_node_id:
            return
        if address is None:
            self._departed.add(node_id)
        else:
            self._departed.discard(node_id)
        self._rebuild()

    def _rebuild(self) -> None:
        """The decisions from the discovery's current nodes (it has already applied the change)."""
        nodes = self._discovery.nodes()
        routes: dict[int, Decision] = {self.own_node_id: LOCAL}
        for node_id, address in nodes.items():
            routes[node_id] = Forward(node_id, address)
        if self._failover:
            live = [self.own_node_id, *nodes]
            for node_id in self._departed:
                heir = successor(node_id, live)
                if heir is not None:
                    routes[node_id] = routes[heir]
        self._routes = routes

    def backup(self) -> tuple[int, Address] | None:
        """Our successor (id, management address): where our connections' replicas go; None when alone."""
        nodes = self._discovery.nodes()
        heir = successor(self.own_node_id, [self.own_node_id, *nodes])
        return None if heir is None else (heir, nodes[heir])

    def decide(self, datagram: bytes) -> Decision:
        """Where the datagram's first record goes."""
        if not datagram or datagram[0] != CONTENT_TYPE_TLS12_CID:
            return LOCAL
        if len(datagram) < self._minimum_length:
            self.drops["truncated_cid_record"] = self.drops.get("truncated_cid_record", 0) + 1
            return DROP_TRUNCATED
        route = self._routes.get(datagram[CID_OFFSET])
        if route is None:
            self.drops["unknown_node"] = self.drops.get("unknown_node", 0) + 1
            return DROP_UNKNOWN_NODE
        if route is not LOCAL:
            self.forwarded += 1
        return route
