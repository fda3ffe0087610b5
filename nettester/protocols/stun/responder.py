"""The Binding responder (RFC 8489 section 6.3, RFC 5780 section 6.1), sans-IO.

One call per request: bytes, the peer address and the time in, the response
bytes and the local socket to send it from out. The hot path reads the
20-byte header first; a request without attributes (what load generators
send), or with only NETTESTER-SEQUENCE (what nettester's tester sends, see
``nettester.protocols.stun.attribution``), is answered from precomputed
parts and a per-peer cache of the address attributes, without building a
``nettester.protocols.stun.message.Message``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from nettester.protocols.stun.attribution import (
    NETTESTER_SEQUENCE,
    SEQUENCE_HEADER,
    AttributionError,
    SequenceTag,
    SessionTable,
)
from nettester.protocols.stun.counters import ServerCounters
from nettester.protocols.stun.message import (
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
    fingerprint_attribute,
    is_comprehension_required,
    make_attribute,
)

# RFC 8489 attributes a server without authentication understands and ignores
# (section 9: credentials are a usage's choice; this server asks for none).
UNDERSTOOD = frozenset(
    {
        AttributeType.MAPPED_ADDRESS,
        AttributeType.CHANGE_REQUEST,  # honoured with an alternate address, 420 when it asks for one we lack
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

# With an alternate address the server is an RFC 5780 server and also honours RESPONSE-PORT (section 6.1).
UNDERSTOOD_RFC5780 = UNDERSTOOD | {AttributeType.RESPONSE_PORT}

# (response, index of the socket to send it from, port to send it to: 0 = the request's source port)
Reply = tuple[bytes, int, int]

BINDING_REQUEST = b"\x00\x01"
BARE_BINDING_REQUEST = BINDING_REQUEST + b"\x00\x00" + MAGIC_COOKIE_BYTES  # type, zero length, cookie
# The tester's request: the header, then NETTESTER-SEQUENCE alone (16 bytes).
TESTER_BINDING_REQUEST = BINDING_REQUEST + b"\x00\x10" + MAGIC_COOKIE_BYTES
_TYPE_AND_LENGTH = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_CACHE_LIMIT = 65536

# Socket indexes of an RFC 5780 server: bit 0 = alternate port, bit 1 = alternate IP.
PRIMARY = 0
ALTERNATE_PORT = 1
ALTERNATE_IP = 2


class BindingResponder:
    """Answers Binding requests; with four ``addresses`` also RFC 5780 CHANGE-REQUEST.

    ``addresses``, when given, are the server's sockets indexed by
    ``ALTERNATE_IP | ALTERNATE_PORT`` bits: (IP1, P1), (IP1, P2), (IP2, P1), (IP2, P2).
    ``sessions`` records NETTESTER-SEQUENCE and answers it with NETTESTER-RECEIVED;
    None ignores it like any other comprehension-optional attribute.
    """

    def __init__(
        self,
        counters: ServerCounters,
        software: str,
        addresses: Sequence[Address] | None = None,
        sessions: SessionTable | None = None,
    ) -> None:
        self._counters = counters
        self.sessions = sessions
        self._software_text = software
        self._software = make_attribute(AttributeType.SOFTWARE, software).encode()
        # Success header (type and length) by the size of the address attributes: IPv4 24, IPv6 48 bytes.
        self._headers = {size: _TYPE_AND_LENGTH.pack(0x0101, size + len(self._software)) for size in (24, 48)}
        self._classic_software = make_attribute(AttributeType.SOFTWARE, _classic_text(software)).encode()
        self._addresses = tuple(addresses) if addresses else None
        if self._addresses is not None and len(self._addresses) != 4:
            raise ValueError("an RFC 5780 server needs exactly four addresses")
        self._understood = UNDERSTOOD if self._addresses is None else UNDERSTOOD_RFC5780
        self._ipv4_cache: dict[tuple[str, int], bytes] = {}
        #: IPv4 peer -> its bare request's response after the transaction id (``bare_answer``)
        self._bare_tails: dict[tuple[str, int], bytes] = {}
        self._bare_head = self._headers[24]
        self._requests, self._responses = counters.requests, counters.responses  # one lookup less each

    @property
    def rfc5780(self) -> bool:
        """Whether this responder answers CHANGE-REQUEST (four addresses): then every request takes ``respond``."""
        return self._addresses is not None

    def bare_answer(self, data: bytes, peer: tuple[str, int]) -> bytes | None:
        """The response to a Binding request without attributes from an IPv4 peer answered before, or None.

        The datagram path's first try (``server.StunDatagramProtocol``): the
        response is the precomputed head, the request's cookie and transaction
        id, and the peer's precomputed address attributes and SOFTWARE, byte for
        byte what ``respond`` gives, counted alike. None: ``respond`` decides.
        """
        tail = self._bare_tails.get(peer)
        if tail is None or len(data) != 20 or data[:8] != BARE_BINDING_REQUEST:
            return None
        self._requests.value += 1
        self._responses.value += 1
        return self._bare_head + data[4:] + tail

    def respond(self, data: bytes, peer: tuple[str, int], via: int = PRIMARY, now: float = 0.0) -> Reply | None:
        """The response to ``data`` from ``peer``, the socket index to send it from and the port to send it to.

        None means drop. ``now`` (seconds since the epoch) is the receive time
        NETTESTER-RECEIVED reports. The first branches are the hot path: a
        Binding request without attributes (load generators), and one with
        NETTESTER-SEQUENCE alone (nettester's tester).
        """
        head = data[:8]
        if head == BARE_BINDING_REQUEST and len(data) == 20 and self._addresses is None:
            counters = self._counters
            counters.requests.value += 1
            counters.responses.value += 1
            addresses = self._ipv4_cache.get(peer) or self._address_attributes(data[8:20], peer)
            return b"".join((self._headers[len(addresses)], data[4:20], addresses, self._software)), via, 0
        if (
            head == TESTER_BINDING_REQUEST
            and len(data) == 36
            and data[20:24] == SEQUENCE_HEADER
            and self._addresses is None
            and self.sessions is not None
        ):
            counters = self._counters
            counters.requests.value += 1
            counters.responses.value += 1
            counters.attributed.value += 1
            receipt = self.sessions.answer(data[24:32], _U32.unpack_from(data, 32)[0], now)
            addresses = self._ipv4_cache.get(peer) or self._address_attributes(data[8:20], peer)
            header = _TYPE_AND_LENGTH.pack(0x0101, len(addresses) + len(receipt) + len(self._software))
            return b"".join((header, data[4:20], addresses, receipt, self._software)), via, 0
        return self._respond(data, peer, via, now)

    def _respond(self, data: bytes, peer: tuple[str, int], via: int, now: float) -> Reply | None:
        """Every case but the hot path: attributes, RFC 5780, RFC 3489 clients, errors, noise."""
        counters = self._counters
        if len(data) < 20 or data[0] & 0xC0:
            counters.dropped.inc("not_stun")
            return None
        if data[4:8] != MAGIC_COOKIE_BYTES:
            return self._classic(data, peer, via)
        if data[:2] != BINDING_REQUEST:
            return self._not_binding(data, via)
        counters.requests.value += 1
        return self._with_attributes(data, peer, via, False, now)

    def _classic(self, data: bytes, peer: tuple[str, int], via: int) -> Reply | None:
        """An RFC 3489 client: no magic cookie (RFC 8489 section 12, RFC 5389 section 12.2)."""
        if data[:2] != BINDING_REQUEST:
            self._counters.dropped.inc("not_stun")
            return None
        return self._with_attributes(data, peer, via, True, 0.0)

    def _not_binding(self, data: bytes, via: int) -> Reply | None:
        # RFC 8489 section 6.3: only requests are answered; indications and responses are not.
        if data[0] & 0x01 or data[1] & 0x10:
            self._counters.dropped.inc("not_request")
            return None
        self._counters.requests.value += 1
        return self._error(data, 400, "Bad Request: unsupported method", False), via, 0

    def _with_attributes(
        self, data: bytes, peer: tuple[str, int], via: int, classic: bool, now: float
    ) -> Reply | None:
        counters = self._counters
        try:
            message = decode(data, magic_cookie=not classic)
        except StunDecodeError:
            if classic:  # without the cookie, a malformed message cannot be told from noise
                counters.dropped.inc("not_stun")
                return None
            return self._error(data, 400, "Bad Request", False), via, 0
        if classic:
            counters.requests.value += 1
        attributes = message.attributes
        fingerprint = not classic and bool(attributes) and attributes[-1].type == AttributeType.FINGERPRINT
        if fingerprint and not check_fingerprint(data):
            # RFC 8489 section 7.3: a bad FINGERPRINT means the datagram is not STUN.
            counters.dropped.inc("bad_fingerprint")
            return None
        receipt = None if classic else self._record(message, now)
        unknown = [a.type for a in attributes if is_comprehension_required(a.type) and a.type not in self._understood]
        if unknown:
            # RFC 8489 section 6.3.1.1: 420 listing every unknown comprehension-required attribute.
            return self._error(data, 420, "Unknown Attribute", fingerprint, unknown, classic), via, 0
        try:
            change = message.get(AttributeType.CHANGE_REQUEST)
        except StunDecodeError:
            return self._error(data, 400, "Bad Request: malformed CHANGE-REQUEST", fingerprint, (), classic), via, 0
        send_via = via
        if change is not None and (change.change_ip or change.change_port):
            if self._addresses is None:
                # RFC 5780 section 6.1: without an alternate address the change cannot be made.
                unknown = [AttributeType.CHANGE_REQUEST]
                reason = "Unknown Attribute: no alternate address"
                return self._error(data, 420, reason, fingerprint, unknown, classic), via, 0
            # RFC 5780 section 6.1: answer from the other IP and/or the other port.
            send_via = via ^ (ALTERNATE_IP if change.change_ip else 0) ^ (ALTERNATE_PORT if change.change_port else 0)
            counters.changed.value += 1
        try:
            # RFC 5780 section 7.5: answer to this port of the request's source IP (understood only with
            # an alternate address; otherwise it was reported unknown above).
            response_port = message.get(AttributeType.RESPONSE_PORT) or 0
        except StunDecodeError:
            return self._error(data, 400, "Bad Request: malformed RESPONSE-PORT", fingerprint, (), classic), via, 0
        counters.responses.value += 1
        if receipt is not None:
            counters.attributed.value += 1
        return self._success(data, peer, via, send_via, fingerprint, classic, receipt), send_via, response_port

    def _record(self, message: Message, now: float) -> bytes | None:
        """Note a NETTESTER-SEQUENCE (recorded even when the answer is an error): the NETTESTER-RECEIVED
        attribute to answer with; None without one."""
        attribute = message.find(NETTESTER_SEQUENCE)
        if attribute is None or self.sessions is None:
            return None
        try:
            tag = SequenceTag.decode(attribute.value)
        except AttributionError:
            self._counters.attribution_invalid.value += 1  # answered as if it were absent
            return None
        return self.sessions.answer(tag.session, tag.sequence, now)

    def _success(
        self,
        request: bytes,
        peer: tuple[str, int],
        via: int,
        send_via: int,
        fingerprint: bool,
        classic: bool,
        receipt: bytes | None = None,
    ) -> bytes:
        """RFC 8489 section 10.1.2: XOR-MAPPED-ADDRESS, MAPPED-ADDRESS, [RFC 5780 addresses], SOFTWARE, [FINGERPRINT].

        An RFC 3489 client gets MAPPED-ADDRESS and, where known, SOURCE-ADDRESS
        and CHANGED-ADDRESS instead (RFC 3489 section 11.2).
        """
        if classic:
            addresses = make_attribute(AttributeType.MAPPED_ADDRESS, _address(peer)).encode()
            origin, other = AttributeType.SOURCE_ADDRESS, AttributeType.CHANGED_ADDRESS
        else:
            addresses = self._address_attributes(request[8:20], peer)
            origin, other = AttributeType.RESPONSE_ORIGIN, AttributeType.OTHER_ADDRESS
        if self._addresses is not None:
            addresses += make_attribute(origin, self._addresses[send_via]).encode()
            addresses += make_attribute(other, self._addresses[via ^ 3]).encode()
        if receipt is not None:
            addresses += receipt
        software = self._classic_software if classic else self._software
        length = len(addresses) + len(software) + (8 if fingerprint else 0)
        # Bytes 4-20 are echoed: the magic cookie and transaction id (or an RFC 3489 128-bit id).
        response = b"".join((_TYPE_AND_LENGTH.pack(0x0101, length), request[4:20], addresses, software))
        if fingerprint:
            response += fingerprint_attribute(response)
        return response

    def _address_attributes(self, transaction_id: bytes, peer: tuple[str, int]) -> bytes:
        """XOR-MAPPED-ADDRESS then MAPPED-ADDRESS of ``peer``.

        Cached per IPv4 peer: its XOR mask is the cookie alone, while an
        IPv6 mask includes the transaction id (RFC 8489 section 14.2).
        """
        cached = self._ipv4_cache.get(peer)
        if cached is not None:
            return cached
        address = _address(peer)
        encoded = (
            make_attribute(AttributeType.XOR_MAPPED_ADDRESS, address, transaction_id).encode()
            + make_attribute(AttributeType.MAPPED_ADDRESS, address).encode()
        )
        if ":" not in address.host:
            if len(self._ipv4_cache) >= _CACHE_LIMIT:
                self._ipv4_cache.clear()
                self._bare_tails.clear()
            self._ipv4_cache[peer] = encoded
            # the same tail for every bare request of this peer (bare_answer), made once per peer
            self._bare_tails[peer] = encoded + self._software
        return encoded

    def _error(
        self,
        request: bytes,
        code: int,
        reason: str,
        fingerprint: bool,
        unknown: Sequence[int] = (),
        classic: bool = False,
    ) -> bytes:
        """An error response (RFC 8489 section 6.3.4) with ERROR-CODE, [UNKNOWN-ATTRIBUTES], SOFTWARE.

        For an RFC 3489 client every value is a multiple of 4 bytes, as its
        parser expects (RFC 3489 sections 11.2.9 and 11.2.10).
        """
        self._counters.errors.inc(str(code))
        software = self._software_text
        if classic:
            reason, software = _classic_text(reason), _classic_text(software)
            unknown = [*unknown, unknown[-1]] if len(unknown) % 2 else unknown
        attributes = [make_attribute(AttributeType.ERROR_CODE, ErrorCode(code, reason))]
        if unknown:
            attributes.append(make_attribute(AttributeType.UNKNOWN_ATTRIBUTES, tuple(unknown)))
        attributes.append(make_attribute(AttributeType.SOFTWARE, software))
        response = Message(Method.BINDING, MessageClass.ERROR, request[8:20], tuple(attributes))
        encoded = response.encode(fingerprint=fingerprint)
        # Echo the cookie field: equal to the cookie for RFC 8489 clients, part of the id for RFC 3489 ones.
        return encoded[:4] + request[4:8] + encoded[8:]


def _classic_text(text: str) -> str:
    """Pad with spaces to a multiple of 4 bytes: RFC 3489 parsers skip attributes by their length alone."""
    return text + " " * (-len(text.encode("utf-8")) % 4)


def _address(peer: tuple[str, int]) -> Address:
    """The peer as an Address, without an IPv6 zone suffix."""
    return Address(peer[0].split("%")[0], peer[1])
