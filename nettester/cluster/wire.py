"""Cluster management records: Californium's layout, plus an optional MAC.

Byte 0 is the type: 63 IN (a record forwarded to its owner), 62 OUT (the
owner's answer, sent back through the node that received the request),
61 PING, 60 PONG, and ours beyond Californium: 59 STATE (a DTLS connection's
snapshot for the node that takes over if its owner is lost).

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
purposes later. The HMAC is computed as RFC 2104 section 2 defines it, from
the two padded-key hash states prepared once per codec, which costs half of
what copying an ``hmac.HMAC`` object does (four MACs per forwarded request).
PING/PONG then also carry the sender's wall-clock time in
milliseconds, which the receiver checks against replay
(:mod:`nettester.cluster.nodes`). Without a secret the layout is exactly
Californium's, and the cluster works unauthenticated.

STATE (only with a secret: a snapshot carries the session's keys)::

    type(1) cid-length(1) cid nonce(12) AES-256-GCM(timestamp(8, little-endian ms) snapshot) tag(16)

The AEAD key is HKDF-SHA256 of the secret with the info
``nettester dtls-cid cluster state v1`` (another key than the MAC's), the
header before the nonce (type, CID length, CID) is the additional data and
the nonce is random (RFC 5116 section 3: 96 bits; random nonces are safe far
beyond the snapshots a cluster sends under one key). The CID travels in the
clear, as it does in every record of its session (RFC 9146 section 4), so
the kernel can steer a replica to the worker that will adopt the session
(CID byte 1 at offset 3, ``nettester.steering``); the additional data binds
it to the snapshot. The timestamp lets the receiver keep only a connection's
newest snapshot, so an old one replayed cannot roll its replay window back.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from hashlib import sha256
from hmac import compare_digest
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nettester.addresses import unmapped_host

if TYPE_CHECKING:
    from hashlib import _Hash

TYPE_IN = 63
TYPE_OUT = 62
TYPE_PING = 61
TYPE_PONG = 60
TYPE_STATE = 59

RECORD_TYPES = (TYPE_IN, TYPE_OUT)

MAC_LENGTH = 8
HMAC_BLOCK_SIZE = 64  # SHA-256's block size (RFC 2104 section 2: B)
KDF_INFO = b"nettester dtls-cid cluster management mac v1"
STATE_KDF_INFO = b"nettester dtls-cid cluster state v1"
STATE_NONCE_LENGTH = 12  # RFC 5116 section 3.2: N_MIN = N_MAX = 12 for AES-GCM
STATE_TAG_LENGTH = 16
_STATE_HEADER = bytes((TYPE_STATE,))
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
    """A management record that is dropped; ``reason`` is its metrics label.

    Reasons: ``empty``, ``unknown_type``, ``truncated``, ``bad_address``,
    ``bad_state``, ``bad_length``, ``missing_mac`` (too short to hold one),
    ``bad_mac``, ``state_without_secret`` (a STATE record to a node without
    a secret), ``bad_state_record`` (a STATE record that does not decrypt or
    parse).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ForwardedRecords:
    """IN (``kind`` 63) or OUT (62): DTLS records on behalf of ``client``."""

    kind: int
    client: Address
    records: bytes


@dataclass(frozen=True, slots=True)
class NodeMessage:
    """PING (``kind`` 61) or PONG (60). ``timestamp_ms`` is None without a secret."""

    kind: int
    node_id: int
    state: NodeState
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """STATE (``kind`` 59): the snapshot of the DTLS connection whose read CID is ``cid``."""

    cid: bytes
    snapshot: bytes
    timestamp_ms: int
    kind: int = TYPE_STATE


def derive_mac_key(secret: bytes) -> bytes:
    """The HMAC key of the management records (see the module docstring)."""
    return _derive(secret, KDF_INFO)


def _derive(secret: bytes, info: bytes) -> bytes:
    if not secret:
        raise ValueError("the cluster group secret must not be empty")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


# Clients send many records each: both address conversions are cached (bounded).
ADDRESS_CACHE_SIZE = 65536


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _records_header(kind: int, client: Address) -> bytes:
    """type, port(2, little-endian), address length, address: constant per client and direction."""
    host, port = client
    host = unmapped_host(host)  # an IPv4 client is written with 4 bytes, as Californium does
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    packed = socket.inet_pton(family, host)
    return struct.pack("<BHB", kind, port, len(packed)) + packed


@lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def _unpack_address(header: bytes) -> Address:
    """The client address of a records header (the inverse of :func:`_records_header`); its length byte is valid."""
    return socket.inet_ntop(_ADDRESS_FAMILIES[header[3]], header[4:]), header[1] | header[2] << 8


class ManagementCodec:
    """Encodes and decodes management records, with the MAC when keyed.

    :param secret: the group secret, or None for Californium's unauthenticated layout.
    """

    def __init__(self, secret: bytes | None = None, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        """``random_bytes(n)`` makes the STATE records' nonces (injected, like every source of chance here)."""
        self._random_bytes = random_bytes
        self._mac: tuple[_Hash, _Hash] | None = None
        self._mac_length = 0
        if secret is not None:
            self._mac_length = MAC_LENGTH
            # RFC 2104 section 2: H(K xor opad, H(K xor ipad, text)); the 32-byte key is zero-padded to B.
            key = derive_mac_key(secret).ljust(HMAC_BLOCK_SIZE, b"\0")
            self._mac = sha256(bytes(k ^ 0x36 for k in key)), sha256(bytes(k ^ 0x5C for k in key))
            self._state_aead: AESGCM | None = AESGCM(_derive(secret, STATE_KDF_INFO))
        else:
            self._state_aead = None

    @property
    def authenticated(self) -> bool:
        return self._mac is not None

    @property
    def mac_length(self) -> int:
        """Bytes of MAC between an IN/OUT record's header and its DTLS records (0 unauthenticated)."""
        return self._mac_length

    def _tag(self, header: bytes, payload: bytes) -> bytes:
        """HMAC-SHA256 of header + payload, truncated to :data:`MAC_LENGTH` (RFC 2104 section 5)."""
        assert self._mac is not None
        inner_pad, outer_pad = self._mac
        inner = inner_pad.copy()
        inner.update(header)
        inner.update(payload)
        outer = outer_pad.copy()
        outer.update(inner.digest())
        return outer.digest()[:MAC_LENGTH]

    # -- encoding ---------------------------------------------------------------

    def encode_records(self, kind: int, client: Address, records: bytes) -> bytes:
        """An IN or OUT record carrying ``records`` for ``client``."""
        if kind not in RECORD_TYPES:
            raise ValueError(f"not a records type: {kind}")
        header = _records_header(kind, client)
        if self._mac is None:
            return header + records
        return header + self._tag(header, records) + records

    def encode_node(self, kind: int, node_id: int, state: NodeState, timestamp_ms: int = 0) -> bytes:
        """A PING or PONG; ``timestamp_ms`` is sent only when keyed."""
        if kind not in (TYPE_PING, TYPE_PONG):
            raise ValueError(f"not a node message type: {kind}")
        header = _NODE.pack(kind, node_id, state)
        if self._mac is None:
            return header
        header += _TIMESTAMP.pack(timestamp_ms)
        return header + self._tag(header, b"")

    def encode_state(self, cid: bytes, snapshot: bytes, timestamp_ms: int) -> bytes:
        """A STATE record (encrypted; see the module docstring).

        :raises ValueError: without a secret, or for a CID over 255 bytes.
        """
        if self._state_aead is None:
            raise ValueError("STATE records need the cluster group secret: a snapshot carries session keys")
        if not 0 < len(cid) < 256:
            raise ValueError(f"a CID is 1 to 255 bytes, got {len(cid)}")
        nonce = self._random_bytes(STATE_NONCE_LENGTH)
        header = _STATE_HEADER + bytes((len(cid),)) + cid
        return header + nonce + self._state_aead.encrypt(nonce, _TIMESTAMP.pack(timestamp_ms) + snapshot, header)

    # -- decoding ---------------------------------------------------------------

    def decode(self, datagram: bytes) -> ForwardedRecords | NodeMessage | ConnectionState:
        """Parse and authenticate one management datagram.

        :raises ManagementError: for anything that must be dropped.
        """
        if not datagram:
            raise ManagementError("empty")
        kind = datagram[0]
        if kind == TYPE_IN or kind == TYPE_OUT:
            return ForwardedRecords(kind, *self.decode_records(datagram))
        if kind == TYPE_PING or kind == TYPE_PONG:
            return self._decode_node(kind, datagram)
        if kind == TYPE_STATE:
            return self._decode_state(datagram)
        raise ManagementError("unknown_type")

    def _decode_state(self, datagram: bytes) -> ConnectionState:
        if self._state_aead is None:
            raise ManagementError("state_without_secret")
        if len(datagram) < 2 or not datagram[1]:
            raise ManagementError("bad_state_record")  # no CID
        header_end = 2 + datagram[1]
        nonce_end = header_end + STATE_NONCE_LENGTH
        if len(datagram) < nonce_end + STATE_TAG_LENGTH:
            raise ManagementError("bad_state_record")
        header = datagram[:header_end]
        try:
            plaintext = self._state_aead.decrypt(datagram[header_end:nonce_end], datagram[nonce_end:], header)
        except InvalidTag:
            raise ManagementError("bad_state_record") from None
        if len(plaintext) <= _TIMESTAMP.size:
            raise ManagementError("bad_state_record")  # no snapshot
        (timestamp,) = _TIMESTAMP.unpack_from(plaintext)
        return ConnectionState(header[2:], plaintext[_TIMESTAMP.size:], timestamp)

    def decode_records(self, datagram: bytes) -> tuple[Address, bytes]:
        """The hot path of :meth:`decode` for a datagram whose first byte is IN or OUT: (client, records).

        No event object: the management endpoint calls this once per relayed record.

        :raises ManagementError: for anything that must be dropped.
        """
        length = len(datagram)
        if length < 4:
            raise ManagementError("truncated")
        if datagram[3] not in _ADDRESS_FAMILIES:
            raise ManagementError("bad_address")
        header_end = 4 + datagram[3]
        payload_start = header_end + self._mac_length
        if length < header_end:
            raise ManagementError("truncated")
        if length < payload_start:
            raise ManagementError("missing_mac")
        if length == payload_start:
            raise ManagementError("truncated")  # no DTLS record
        header = datagram[:header_end]
        records = datagram[payload_start:]
        if self._mac is not None and not compare_digest(self._tag(header, records), datagram[header_end:payload_start]):
            raise ManagementError("bad_mac")
        return _unpack_address(header), records

    def _decode_node(self, kind: int, datagram: bytes) -> NodeMessage:
        expected = _NODE.size + (_TIMESTAMP.size + MAC_LENGTH if self._mac is not None else 0)
        if len(datagram) != expected:
            if self._mac is not None and len(datagram) == _NODE.size:
                raise ManagementError("missing_mac")
            raise ManagementError("bad_length")
        header_end = expected - MAC_LENGTH
        if self._mac is not None and not compare_digest(
            self._tag(datagram[:header_end], b""), datagram[header_end:]
        ):
            raise ManagementError("bad_mac")
        _, node_id, state = _NODE.unpack_from(datagram)
        if state > NodeState.INITIALIZED:
            raise ManagementError("bad_state")
        timestamp = _TIMESTAMP.unpack_from(datagram, _NODE.size)[0] if self._mac is not None else None
        return NodeMessage(kind, node_id, NodeState(state), timestamp)
