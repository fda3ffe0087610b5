"""The Binding responder (RFC 8489 section 6.3, RFC 5780 section 6.1), sans-IO.

One call per request: bytes and the peer address in, the response bytes and
the local socket to send it from out. The hot path reads the 20-byte header
first; a request without attributes (what testers and load generators send)
is answered from precomputed parts and a per-peer cache of the address
attributes, without building a :class:`~nettester.protocols.stun.message.Message`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Protocol

from nettester.protocols.stun.message import (
    FINGERPRINT_XOR,
    MAGIC_COOKIE,
    MAGIC_COOKIE_BYTES,
    Address,
    AttributeType,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    StunDecodeError,
    check_fingerprint,
    decode,
    is_comprehension_required,
    make_attribute,
)

# RFC 8489 attributes a server without authentication understands and ignores
# (section 9: credentials are a usage's choice; this server asks for none).
UNDERSTOOD = frozenset(
    {
        AttributeType.MAPPED_ADDRESS,
        AttributeType.USERNAME,
        AttributeType.MESSAGE_INTEGRITY,
        AttributeType.ERROR_CODE,
        AttributeType.UNKNOWN_ATTRIBUTES,
        0x0014,  # REALM
        0x0015,  # NONCE
        AttributeType.MESSAGE_INTEGRITY_SHA256,
        0x001D,  # PASSWORD-ALGORITHM
        0x001E,  # USERHASH
        AttributeType.XOR_MAPPED_ADDRESS,
    }
)

BINDING_REQUEST = b"\x00\x01"
_SUCCESS_HEADER = struct.Struct("!HHI")
_IPV4_ADDRESS_ATTRIBUTES = struct.Struct("!HHBBH4sHHBBH4s")  # XOR-MAPPED-ADDRESS, then MAPPED-ADDRESS
_FINGERPRINT = struct.Struct("!HHI")
_CACHE_LIMIT = 65536

# Socket indexes of an RFC 5780 server: bit 0 = alternate port, bit 1 = alternate IP.
PRIMARY = 0
ALTERNATE_PORT = 1
ALTERNATE_IP = 2


class Count(Protocol):
    value: int


class LabeledCount(Protocol):
    def inc(self, label_value: str, amount: int = 1) -> None: ...


class MetricFactory(Protocol):
    """What :class:`ServerCounters` needs from a ``nettester.metrics.MetricSet``."""

    def counter(self, name: str, help: str) -> Count: ...

    def labeled_counter(self, name: str, help: str, label: str) -> LabeledCount: ...


class ServerCounters:
    """The server's counters; shared by its UDP and TCP responders."""

    def __init__(self, metrics: MetricFactory) -> None:
        self.requests = metrics.counter("requests", "Binding requests received")
        self.responses = metrics.counter("responses", "Binding success responses sent")
        self.errors = metrics.labeled_counter("error_responses", "Error responses sent, by error code", "code")
        self.dropped = metrics.labeled_counter("dropped", "Datagrams dropped without an answer, by reason", "reason")
        self.changed = metrics.counter("change_requests", "Responses sent from another address (RFC 5780)")


class BindingResponder:
    """Answers Binding requests; with four C{addresses} also RFC 5780 CHANGE-REQUEST.

    C{addresses}, when given, are the server's sockets indexed by
    ``ALTERNATE_IP | ALTERNATE_PORT`` bits: (IP1, P1), (IP1, P2), (IP2, P1), (IP2, P2).
    """

    def __init__(
        self,
        counters: ServerCounters,
        software: str,
        addresses: Sequence[Address] | None = None,
    ) -> None:
        self._counters = counters
        self._software_text = software
        self._software = make_attribute(AttributeType.SOFTWARE, software).encode()
        self._addresses = tuple(addresses) if addresses else None
        if self._addresses is not None and len(self._addresses) != 4:
            raise ValueError("an RFC 5780 server needs exactly four addresses")
        self._understood = UNDERSTOOD | {AttributeType.CHANGE_REQUEST} if self._addresses else UNDERSTOOD
        self._ipv4_cache: dict[tuple[str, int], bytes] = {}

    def respond(self, data: bytes, peer: tuple[str, int], via: int = PRIMARY) -> tuple[bytes, int] | None:
        """The response to C{data} from C{peer}, and the socket index to send it from; None to drop."""
        counters = self._counters
        # RFC 8489 section 5: the magic cookie and the two zero bits tell STUN from other traffic.
        if len(data) < 20 or data[4:8] != MAGIC_COOKIE_BYTES or data[0] & 0xC0:
            counters.dropped.inc("not_stun")
            return None
        if data[:2] != BINDING_REQUEST:
            return self._not_binding(data, via)
        counters.requests.value += 1
        if len(data) == 20 and data[3] == 0 and data[2] == 0:
            counters.responses.value += 1
            return self._success(data[8:20], peer, via, via, False), via
        return self._with_attributes(data, peer, via)

    def _not_binding(self, data: bytes, via: int) -> tuple[bytes, int] | None:
        # RFC 8489 section 6.3: only requests are answered; indications and responses are not.
        if data[0] & 0x01 or data[1] & 0x10:
            self._counters.dropped.inc("not_request")
            return None
        self._counters.requests.value += 1
        return self._error(data[8:20], 400, "Bad Request: unsupported method", via, False), via

    def _with_attributes(self, data: bytes, peer: tuple[str, int], via: int) -> tuple[bytes, int] | None:
        transaction_id = data[8:20]
        try:
            message = decode(data)
        except StunDecodeError:
            return self._error(transaction_id, 400, "Bad Request", via, False), via
        has_fingerprint = bool(message.attributes) and message.attributes[-1].type == AttributeType.FINGERPRINT
        if has_fingerprint and not check_fingerprint(data):
            # RFC 8489 section 7.3: a bad FINGERPRINT means the datagram is not STUN.
            self._counters.dropped.inc("bad_fingerprint")
            return None
        unknown = [
            attribute.type
            for attribute in message.attributes
            if is_comprehension_required(attribute.type) and attribute.type not in self._understood
        ]
        if unknown:
            # RFC 8489 section 6.3.1.1: 420 listing every unknown comprehension-required attribute.
            return self._error(transaction_id, 420, "Unknown Attribute", via, has_fingerprint, unknown), via
        send_via = via
        if self._addresses is not None:
            try:
                change = message.get(AttributeType.CHANGE_REQUEST)
            except StunDecodeError:
                return self._error(transaction_id, 400, "Bad Request: malformed CHANGE-REQUEST", via, has_fingerprint), via
            if change is not None:
                # RFC 5780 section 6.1: answer from the other IP and/or the other port.
                send_via = via ^ (ALTERNATE_IP if change.change_ip else 0) ^ (ALTERNATE_PORT if change.change_port else 0)
                if send_via != via:
                    self._counters.changed.value += 1
        self._counters.responses.value += 1
        return self._success(transaction_id, peer, via, send_via, has_fingerprint), send_via

    def _success(
        self, transaction_id: bytes, peer: tuple[str, int], via: int, send_via: int, fingerprint: bool
    ) -> bytes:
        """XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, [RFC 5780 addresses], SOFTWARE, [FINGERPRINT] (RFC 8489 section 10.1.2)."""
        addresses = self._address_attributes(transaction_id, peer)
        if self._addresses is not None:
            addresses += make_attribute(AttributeType.RESPONSE_ORIGIN, self._addresses[send_via]).encode()
            addresses += make_attribute(AttributeType.OTHER_ADDRESS, self._addresses[via ^ 3]).encode()
        length = len(addresses) + len(self._software) + (8 if fingerprint else 0)
        response = b"".join(
            (_SUCCESS_HEADER.pack(0x0101, length, MAGIC_COOKIE), transaction_id, addresses, self._software)
        )
        if fingerprint:
            response += _fingerprint(response)
        return response

    def _address_attributes(self, transaction_id: bytes, peer: tuple[str, int]) -> bytes:
        cached = self._ipv4_cache.get(peer)
        if cached is not None:
            return cached
        host, port = peer[0], peer[1]
        if ":" in host:  # IPv6: the XOR mask includes the transaction id, nothing to cache
            address = Address(host.split("%")[0], port)
            return (
                make_attribute(AttributeType.XOR_MAPPED_ADDRESS, address, transaction_id).encode()
                + make_attribute(AttributeType.MAPPED_ADDRESS, address).encode()
            )
        packed = bytes(int(part) for part in host.split("."))
        xored = (int.from_bytes(packed, "big") ^ MAGIC_COOKIE).to_bytes(4, "big")
        encoded = _IPV4_ADDRESS_ATTRIBUTES.pack(
            AttributeType.XOR_MAPPED_ADDRESS, 8, 0, 1, port ^ (MAGIC_COOKIE >> 16), xored,
            AttributeType.MAPPED_ADDRESS, 8, 0, 1, port, packed,
        )  # fmt: skip
        if len(self._ipv4_cache) >= _CACHE_LIMIT:
            self._ipv4_cache.clear()
        self._ipv4_cache[peer] = encoded
        return encoded

    def _error(
        self,
        transaction_id: bytes,
        code: int,
        reason: str,
        via: int,
        fingerprint: bool,
        unknown: Sequence[int] = (),
    ) -> bytes:
        """An error response (RFC 8489 section 6.3.4) with ERROR-CODE, [UNKNOWN-ATTRIBUTES], SOFTWARE."""
        self._counters.errors.inc(str(code))
        attributes = [make_attribute(AttributeType.ERROR_CODE, ErrorCode(code, reason))]
        if unknown:
            attributes.append(make_attribute(AttributeType.UNKNOWN_ATTRIBUTES, tuple(unknown)))
        attributes.append(make_attribute(AttributeType.SOFTWARE, self._software_text))
        message = Message(Method.BINDING, MessageClass.ERROR, transaction_id, tuple(attributes))
        return message.encode(fingerprint=fingerprint)


def _fingerprint(message_so_far: bytes) -> bytes:
    """The FINGERPRINT attribute for a message whose header length already counts it (RFC 8489 section 14.7)."""
    crc = (zlib.crc32(message_so_far) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return _FINGERPRINT.pack(AttributeType.FINGERPRINT, 4, crc)

