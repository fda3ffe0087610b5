"""The CID router: which node owns the DTLS record that just arrived?

It looks at the first record of a datagram only (RFC 6347 section 4.1 header:
type(1) version(2) epoch(2) sequence(6), then for ``tls12_cid`` records,
RFC 9146 section 4, the CID before the length). A ``tls12_cid`` record (25)
whose CID starts with another known node's id goes to that node's management
address; anything else (handshakes, alerts, our own CIDs) is local; a CID
naming a node nobody knows is dropped and counted. No full parse: two byte
reads and one dict lookup per datagram.
"""

from __future__ import annotations

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
    """Send the datagram, as an IN management record, to C{address} (node C{node_id})."""

    node_id: int
    address: Address


@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the datagram; C{reason} is its metrics label."""

    reason: str


LOCAL = Local()
DROP_UNKNOWN_NODE = Drop("unknown_node")
DROP_TRUNCATED = Drop("truncated_cid_record")

Decision = Local | Forward | Drop


class CidRouter:
    """Decides per datagram: L{LOCAL}, a L{Forward} or a L{Drop}.

    The forward decisions are precomputed per node and refreshed by the
    discovery's listener, so L{decide} allocates nothing.

    @param cid_length: the cluster's CID length (at least 6), so a record too
        short to hold a whole CID is recognised.
    """

    def __init__(self, discovery: INodeDiscovery, cid_length: int = MIN_CLUSTER_CID_LENGTH) -> None:
        if cid_length < MIN_CLUSTER_CID_LENGTH:
            raise ValueError(f"cluster CIDs need at least {MIN_CLUSTER_CID_LENGTH} bytes, got {cid_length}")
        self.own_node_id = discovery.ownNodeId
        self._minimum_length = CID_OFFSET + cid_length + 2  # + the record length field
        self._routes: dict[int, Decision] = {self.own_node_id: LOCAL}
        self.drops: dict[str, int] = {}
        self.forwarded = 0
        discovery.addListener(self._node_changed)

    def _node_changed(self, node_id: int, address: Address | None) -> None:
        if node_id == self.own_node_id:
            return
        if address is None:
            self._routes.pop(node_id, None)
        else:
            self._routes[node_id] = Forward(node_id, address)

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
