"""Cluster management records: Californium's layout, plus an optional MAC.

Byte 0 is the type: 63 IN (a record forwarded to its owner), 62 OUT (the
owner's answer, sent back through the node that received the request),
61 PING, 60 PONG.

IN/OUT::

    type(1) port(2, little-endian) address-length(1: 4 or 16) address
    [MAC(8)] DTLS record(s), unchanged

PING/PONG::

    type(1) node-id(4, little-endian) state(1) [timestamp(8, little-endian ms) MAC(8)]

With a group secret (``--dtls-cluster-group-security``) every record carries
the MAC: HMAC-SHA256 truncated to 8 bytes, over the header (every byte before
the MAC) followed by the payload (the DTLS records; nothing for PING/PONG).
The MAC key is HKDF-SHA256 (RFC 5869) of the secret with an empty salt and
the info ``nettester dtls-cid cluster management mac v1``, 32 bytes, so the
secret itself never keys HMAC directly and one secret could key other
purposes later. PING/PONG then also carry the sender's wall-clock time in
milliseconds, which the receiver checks against replay
(L{nettester.cluster.nodes}). Without a secret the layout is exactly
Californium's, and the cluster works unauthenticated.
"""

from __future__ import annotations

import hmac
import socket
import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from hashlib import sha256

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TYPE_IN = 63
TYPE_OUT = 62
TYPE_PING = 61
TYPE_PONG = 60

MAC_LENGTH = 8
KDF_INFO = b"nettester dtls-cid cluster management mac v1"
_NODE = struct.Struct("<BIB")  # type, node id, state
_TIMESTAMP = struct.Struct("<Q")
_ADDRESS_FAMILIES = {4: socket.AF_INET, 16: socket.AF_INET6}

Address = tuple[str, int]


class NodeState(IntEnum):
    """The state byte of PING/PONG."""

    START = 0
    UP = 1
    INITIALIZED = 2


class ManagementError(ValueError):
    """A management record that is dropped; C{reason} is its metrics label.

    Reasons: ``empty``, ``unknown_type``, ``truncated``, ``bad_address``,
    ``bad_state``, ``bad_length``, ``missing_mac`` (too short to hold one),
    ``bad_mac``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ForwardedRecords:
    """IN (C{kind} 63) or OUT (62): DTLS records on behalf of C{client}."""

    kind: int
    client: Address
    records: bytes


@dataclass(frozen=True, slots=True)
class NodeMessage:
    """PING (C{kind} 61) or PONG (60). C{timestamp_ms} is None without a secret."""

    kind: int
    node_id: int
    state: NodeState
    timestamp_ms: int | None = None


def derive_mac_key(secret: bytes) -> bytes:
    """The HMAC key of the management records (see the module docstring)."""
    if not secret:
        raise ValueError("the cluster group secret must not be empty")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KDF_INFO).derive(secret)


# Clients send many records each: both address conversions are cached (bounded).
ADDRESS_CACHE_SIZE = 65536


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _pack_address(client: Address) -> bytes:
    """port(2, little-endian), address length, address."""
    host, port = client
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(family, host)
    return struct.pack("<HB", port, len(packed)) + packed


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _unpack_address(packed: bytes) -> Address:
    """The inverse of L{_pack_address}; C{packed} has a valid length byte."""
    return socket.inet_ntop(_ADDRESS_FAMILIES[packed[2]], packed[3:]), packed[0] | packed[1] << 8


class ManagementCodec:
    """Encodes and decodes management records, with the MAC when keyed.

    @param secret: the group secret, or None for Californium's unauthenticated layout.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._mac = hmac.new(derive_mac_key(secret), digestmod=sha256) if secret is not None else None

    @property
    def authenticated(self) -> bool:
        return self._mac is not None

    def _tag(self, header: bytes, payload: bytes) -> bytes:
        assert self._mac is not None
        mac = self._mac.copy()
        mac.update(header)
        mac.update(payload)
        return mac.digest()[:MAC_LENGTH]

    # -- encoding ---------------------------------------------------------------

    def encode_records(self, kind: int, client: Address, records: bytes) -> bytes:
        """An IN or OUT record carrying C{records} for C{client}."""
        if kind not in (TYPE_IN, TYPE_OUT):
            raise ValueError(f"not a records type: {kind}")
        header = bytes((kind,)) + _pack_address(client)
        if self._mac is None:
            return header + records
        return header + self._tag(header, records) + records

    def encode_node(self, kind: int, node_id: int, state: NodeState, timestamp_ms: int = 0) -> bytes:
        """A PING or PONG; C{timestamp_ms} is sent only when keyed."""
        if kind not in (TYPE_PING, TYPE_PONG):
            raise ValueError(f"not a node message type: {kind}")
        header = _NODE.pack(kind, node_id, state)
        if self._mac is None:
            return header
        header += _TIMESTAMP.pack(timestamp_ms)
        return header + self._tag(header, b"")

    # -- decoding ---------------------------------------------------------------

    def decode(self, datagram: bytes) -> ForwardedRecords | NodeMessage:
        """Parse and authenticate one management datagram.

        @raise ManagementError: for anything that must be dropped.
        """
        if not datagram:
            raise ManagementError("empty")
        kind = datagram[0]
        if kind == TYPE_IN or kind == TYPE_OUT:
            return self._decode_records(kind, datagram)
        if kind == TYPE_PING or kind == TYPE_PONG:
            return self._decode_node(kind, datagram)
        raise ManagementError("unknown_type")

    def _decode_records(self, kind: int, datagram: bytes) -> ForwardedRecords:
        if len(datagram) < 4:
            raise ManagementError("truncated")
        if datagram[3] not in _ADDRESS_FAMILIES:
            raise ManagementError("bad_address")
        header_end = 4 + datagram[3]
        payload_start = header_end + (MAC_LENGTH if self._mac is not None else 0)
        if len(datagram) < header_end:
            raise ManagementError("truncated")
        if len(datagram) < payload_start:
            raise ManagementError("missing_mac")
        if len(datagram) == payload_start:
            raise ManagementError("truncated")  # no DTLS record
        header = datagram[:header_end]
        records = datagram[payload_start:]
        if self._mac is not None and not hmac.compare_digest(
            self._tag(header, records), datagram[header_end:payload_start]
        ):
            raise ManagementError("bad_mac")
        return ForwardedRecords(kind, _unpack_address(header[1:]), records)

    def _decode_node(self, kind: int, datagram: bytes) -> NodeMessage:
        expected = _NODE.size + (_TIMESTAMP.size + MAC_LENGTH if self._mac is not None else 0)
        if len(datagram) != expected:
            if self._mac is not None and len(datagram) == _NODE.size:
                raise ManagementError("missing_mac")
            raise ManagementError("bad_length")
        header_end = expected - MAC_LENGTH
        if self._mac is not None and not hmac.compare_digest(
            self._tag(datagram[:header_end], b""), datagram[header_end:]
        ):
            raise ManagementError("bad_mac")
        _, node_id, state = _NODE.unpack_from(datagram)
        if state > NodeState.INITIALIZED:
            raise ManagementError("bad_state")
        timestamp = _TIMESTAMP.unpack_from(datagram, _NODE.size)[0] if self._mac is not None else None
        return NodeMessage(kind, node_id, NodeState(state), timestamp)
