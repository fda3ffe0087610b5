"""Peer context shared by the datagram links (plain UDP and DTLS)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PeerContext:
    """What a resource may learn about a peer (``mycontext`` shows it).

    ``via`` names the route a record took when it did not arrive on this
    node's own socket (``dtls-cid-router``); ``previous_address`` is set after
    a DTLS CID address change (RFC 9146 section 6).
    """

    address: tuple[str, int]
    scheme: str = "coap"
    identity: str | None = None
    cipher_suite: str | None = None
    read_cid: bytes | None = None
    write_cid: bytes | None = None
    node_id: int | None = None
    via: str | None = None
    previous_address: tuple[str, int] | None = None
