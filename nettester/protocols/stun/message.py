"""STUN message codec (RFC 8489 section 5 and 14, RFC 5780 section 7), sans-IO.

Bytes in, a ``Message`` out, and back. Attribute values stay raw bytes
(with the padding bytes as received, so a decoded message re-encodes byte for
byte, RFC 5769 vectors included); ``Message.get`` decodes a value on
demand, so a reader only pays for the attributes it looks at.

Malformed input raises ``StunDecodeError`` (a ``ValueError``) and nothing
else: from ``decode``, ``Message.get`` and ``decode_attribute_value``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
HEADER_LENGTH = 20
TRANSACTION_ID_LENGTH = 12
# RFC 8489 section 14.7: the CRC-32 is XOR'ed with this constant ("STUN").
FINGERPRINT_XOR = 0x5354554E
FINGERPRINT_LENGTH = 8  # attribute header + 4-byte CRC

_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE_HEADER = struct.Struct("!HH")


class StunDecodeError(ValueError):
    """The only exception malformed STUN input raises."""


class MessageClass(enum.IntEnum):
    """The 2-bit class of a message type (RFC 8489 section 5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(enum.IntEnum):
    """Methods this module speaks (RFC 8489 section 18.2)."""

    BINDING = 0x001


class AttributeType(enum.IntEnum):
    """Attributes with a typed codec (RFC 8489 section 18.3, RFC 5780 section 7)."""

    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003
    SOURCE_ADDRESS = 0x0004  # RFC 3489 section 11.2.5, for classic clients
    CHANGED_ADDRESS = 0x0005  # RFC 3489 section 11.2.3, for classic clients
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    XOR_MAPPED_ADDRESS = 0x0020
    RESPONSE_PORT = 0x0027  # RFC 5780 section 7.5
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C


def message_type(method: int, message_class: int) -> int:
    """The 14-bit type field: method bits M0-M11 interleaved with class bits C0, C1 (RFC 8489 section 5)."""
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def split_message_type(value: int) -> tuple[int, int]:
    """(method, class) of a type field; the inverse of ``message_type``."""
    method = (value & 0x000F) | ((value & 0x00E0) >> 1) | ((value & 0x3E00) >> 2)
    message_class = ((value >> 4) & 0b01) | ((value >> 7) & 0b10)
    return method, message_class


def is_comprehension_required(attribute_type: int) -> bool:
    """Types 0x0000-0x7FFF must be understood or the request fails with 420 (RFC 8489 section 14)."""
    return attribute_type < 0x8000


class Address(NamedTuple):
    """A transport address: IP literal (no brackets) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ErrorCode(NamedTuple):
    """ERROR-CODE value (RFC 8489 section 14.8): code 300-699 and a reason phrase."""

    code: int
    reason: str


class ChangeRequest(NamedTuple):
    """CHANGE-REQUEST flags (RFC 5780 section 7.2)."""

    change_ip: bool
    change_port: bool


@dataclass(frozen=True, slots=True)
class Attribute:
    """One TLV: its type, raw value and the padding bytes after it.

    ``padding`` is what was received (RFC 8489 section 14: padding is
    ignored by receivers and may be any value); empty means zeros on encode.
    """

    type: int
    value: bytes
    padding: bytes = b""

    def encode(self) -> bytes:
        pad = -len(self.value) % 4
        padding = self.padding if len(self.padding) == pad else bytes(pad)
        return _ATTRIBUTE_HEADER.pack(self.type, len(self.value)) + self.value + padding


@dataclass(frozen=True, slots=True)
class Message:
    """A STUN message: method, class, transaction id and attributes in wire order."""

    method: int
    message_class: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...] = ()

    def find(self, attribute_type: int) -> Attribute | None:
        """The first attribute of this type (RFC 8489 section 14: later duplicates are ignored)."""
        for attribute in self.attributes:
            if attribute.type == attribute_type:
                return attribute
        return None

    def get(self, attribute_type: AttributeType) -> Any:
        """The decoded value of the first attribute of this type, or None when absent."""
        attribute = self.find(attribute_type)
        if attribute is None:
            return None
        return decode_attribute_value(attribute_type, attribute.value, self.transaction_id)

    def encode(
        self,
        integrity_key: bytes | None = None,
        integrity_sha256_key: bytes | None = None,
        fingerprint: bool = False,
    ) -> bytes:
        """The wire bytes, appending MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT when asked.

        RFC 8489 sections 14.5-14.7: each is computed over the message so far,
        with the header length already counting the attribute being added.
        """
        if len(self.transaction_id) != TRANSACTION_ID_LENGTH:
            raise ValueError(f"a transaction id has 12 bytes, not {len(self.transaction_id)}")
        data = bytearray(
            _HEADER.pack(message_type(self.method, self.message_class), 0, MAGIC_COOKIE, self.transaction_id)
        )
        for attribute in self.attributes:
            data += attribute.encode()
        if integrity_key is not None:
            _append_integrity(data, AttributeType.MESSAGE_INTEGRITY, integrity_key, hashlib.sha1)
        if integrity_sha256_key is not None:
            _append_integrity(data, AttributeType.MESSAGE_INTEGRITY_SHA256, integrity_sha256_key, hashlib.sha256)
        if fingerprint:
            _set_length(data, len(data) - HEADER_LENGTH + FINGERPRINT_LENGTH)
            data += fingerprint_attribute(data)
        _set_length(data, len(data) - HEADER_LENGTH)
        return bytes(data)


def _set_length(data: bytearray, length: int) -> None:
    struct.pack_into("!H", data, 2, length)


def _crc(data: bytes | bytearray) -> int:
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def fingerprint_attribute(message_so_far: bytes | bytearray) -> bytes:
    """FINGERPRINT for a message whose header length already counts it (RFC 8489 section 14.7)."""
    return _ATTRIBUTE_HEADER.pack(AttributeType.FINGERPRINT, 4) + struct.pack("!I", _crc(message_so_far))


def _append_integrity(data: bytearray, attribute_type: int, key: bytes, digest: Callable[..., Any]) -> None:
    size = digest().digest_size
    _set_length(data, len(data) - HEADER_LENGTH + 4 + size)
    mac = hmac.new(key, bytes(data), digest).digest()
    data += _ATTRIBUTE_HEADER.pack(attribute_type, size) + mac


class _Field(NamedTuple):
    """Where one attribute sits in a message."""

    offset: int  # of the attribute header
    type: int
    length: int  # of the value, without padding


def _walk(data: bytes) -> Iterator[_Field]:
    """The attributes of a whole message whose header was already checked."""
    end = len(data)
    offset = HEADER_LENGTH
    while offset < end:
        if offset + 4 > end:
            raise StunDecodeError(f"truncated attribute header at offset {offset}")
        attribute_type, length = _ATTRIBUTE_HEADER.unpack_from(data, offset)
        if offset + 4 + length > end:
            raise StunDecodeError(f"attribute 0x{attribute_type:04x} overruns the message at offset {offset}")
        yield _Field(offset, attribute_type, length)
        # The length field is a multiple of 4 (checked), so padding never overruns.
        offset += 4 + length + (-length % 4)


def check_header(data: bytes, magic_cookie: bool = True) -> int:
    """Validate the fixed header (RFC 8489 section 5) and return the message length field.

    Accepts a buffer longer than the message (TCP framing reads the length
    from here); ``decode`` also requires the exact size. With
    ``magic_cookie=False`` an RFC 3489 message (no cookie, 128-bit id) passes too.
    """
    if len(data) < HEADER_LENGTH:
        raise StunDecodeError(f"{len(data)} bytes is shorter than the 20-byte STUN header")
    if data[0] & 0xC0:
        raise StunDecodeError("the two most significant bits of a STUN message must be zero")
    if magic_cookie and data[4:8] != MAGIC_COOKIE_BYTES:
        raise StunDecodeError("no STUN magic cookie")
    length = (data[2] << 8) | data[3]
    if length % 4:
        raise StunDecodeError(f"message length {length} is not a multiple of 4")
    return length


def decode(data: bytes, magic_cookie: bool = True) -> Message:
    """Parse one whole STUN message (a UDP datagram or one TCP frame).

    ``magic_cookie=False`` also accepts an RFC 3489 message; its 128-bit id is
    then the cookie field plus ``transaction_id`` (RFC 8489 section 5).
    """
    length = check_header(data, magic_cookie)
    if len(data) != HEADER_LENGTH + length:
        raise StunDecodeError(f"header says {length} bytes of attributes, {len(data) - HEADER_LENGTH} present")
    attributes = []
    seen_fingerprint = False
    for field in _walk(data):
        if seen_fingerprint:
            # RFC 8489 section 14.7: FINGERPRINT is the last attribute.
            raise StunDecodeError("attribute after FINGERPRINT")
        start = field.offset + 4
        value = data[start : start + field.length]
        padding = data[start + field.length : start + field.length + (-field.length % 4)]
        attributes.append(Attribute(field.type, value, padding))
        seen_fingerprint = field.type == AttributeType.FINGERPRINT
    method, message_class = split_message_type((data[0] << 8) | data[1])
    return Message(method, message_class, data[8:20], tuple(attributes))


def check_fingerprint(data: bytes) -> bool:
    """True when the message ends with a correct FINGERPRINT (RFC 8489 section 14.7)."""
    check_header(data)
    for field in _walk(data):
        if field.type == AttributeType.FINGERPRINT:
            if field.length != 4 or field.offset + FINGERPRINT_LENGTH != len(data):
                return False
            received: int = struct.unpack_from("!I", data, field.offset + 4)[0]
            return received == _crc(data[: field.offset])
    return False


def check_integrity(data: bytes, key: bytes, sha256: bool = False) -> bool:
    """True when MESSAGE-INTEGRITY (or -SHA256) matches ``key`` (RFC 8489 sections 14.5, 14.6).

    The HMAC covers the message up to the attribute, with the header length
    adjusted to end just after it.
    """
    check_header(data)
    wanted = AttributeType.MESSAGE_INTEGRITY_SHA256 if sha256 else AttributeType.MESSAGE_INTEGRITY
    digest = hashlib.sha256 if sha256 else hashlib.sha1
    for field in _walk(data):
        if field.type == wanted:
            covered = bytearray(data[: field.offset])
            _set_length(covered, field.offset + 4 + field.length - HEADER_LENGTH)
            received = data[field.offset + 4 : field.offset + 4 + field.length]
            expected = hmac.new(key, bytes(covered), digest).digest()[: field.length]
            return len(received) >= 16 and hmac.compare_digest(received, expected)
    return False


def short_term_key(password: str) -> bytes:
    """Short-term credential key (RFC 8489 section 9.1.1); the password must already be OpaqueString-prepared."""
    return password.encode("utf-8")


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """Long-term credential key, MD5 algorithm (RFC 8489 section 9.2.2); inputs already prepared."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


# --- typed attribute values -------------------------------------------------

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02


def _decode_address(value: bytes, mask: bytes = b"") -> Address:
    """MAPPED-ADDRESS layout (RFC 8489 section 14.1); ``mask`` XORs port and address (section 14.2)."""
    if len(value) < 4:
        raise StunDecodeError("address attribute shorter than 4 bytes")
    family = value[1]
    size = {_FAMILY_IPV4: 4, _FAMILY_IPV6: 16}.get(family)
    if size is None:
        raise StunDecodeError(f"unknown address family 0x{family:02x}")
    if len(value) != 4 + size:
        raise StunDecodeError(f"address attribute of family 0x{family:02x} must be {4 + size} bytes")
    raw = value[2:]
    if mask:
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    port = (raw[0] << 8) | raw[1]
    host = ipaddress.IPv4Address(raw[2:]) if size == 4 else ipaddress.IPv6Address(raw[2:])
    return Address(str(host), port)


def _encode_address(address: Address | tuple[str, int], mask: bytes = b"") -> bytes:
    host = ipaddress.ip_address(address[0])
    raw = struct.pack("!H", address[1]) + host.packed
    if mask:
        raw = bytes(a ^ b for a, b in zip(raw, mask, strict=False))
    family = _FAMILY_IPV4 if host.version == 4 else _FAMILY_IPV6
    return bytes((0, family)) + raw


def xor_mask(transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS mask for port + address: cookie, then transaction id for IPv6 (RFC 8489 section 14.2)."""
    return MAGIC_COOKIE_BYTES[:2] + MAGIC_COOKIE_BYTES + transaction_id


def _decode_text(value: bytes, limit: int) -> str:
    if len(value) > limit:
        raise StunDecodeError(f"text attribute longer than {limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StunDecodeError(f"text attribute is not UTF-8: {error.reason}") from None


def _decode_error_code(value: bytes) -> ErrorCode:
    """RFC 8489 section 14.8: 21 reserved bits, 3-bit class (3-6), number 0-99, UTF-8 reason."""
    if len(value) < 4:
        raise StunDecodeError("ERROR-CODE shorter than 4 bytes")
    error_class, number = value[2] & 0x07, value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunDecodeError(f"ERROR-CODE class {error_class} number {number} out of range")
    return ErrorCode(error_class * 100 + number, _decode_text(value[4:], 763))


def _encode_error_code(error: ErrorCode | tuple[int, str]) -> bytes:
    code, reason = error
    return bytes((0, 0, code // 100, code % 100)) + reason.encode("utf-8")


def _decode_unknown_attributes(value: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise StunDecodeError("UNKNOWN-ATTRIBUTES length is odd")
    return struct.unpack(f"!{len(value) // 2}H", value)


def _decode_change_request(value: bytes) -> ChangeRequest:
    if len(value) != 4:
        raise StunDecodeError("CHANGE-REQUEST must be 4 bytes")
    return ChangeRequest(bool(value[3] & 0x04), bool(value[3] & 0x02))


def _decode_crc(value: bytes) -> int:
    if len(value) != 4:
        raise StunDecodeError("FINGERPRINT must be 4 bytes")
    return int.from_bytes(value, "big")


def _decode_response_port(value: bytes) -> int:
    """RESPONSE-PORT: a 16-bit port and 16 bits of padding (RFC 5780 section 7.5)."""
    if len(value) != 4:
        raise StunDecodeError("RESPONSE-PORT must be 4 bytes")
    return (value[0] << 8) | value[1]


def _decode_fixed(size_check: Callable[[int], bool], what: str) -> Callable[[bytes, bytes], bytes]:
    def decode_value(value: bytes, _transaction_id: bytes) -> bytes:
        if not size_check(len(value)):
            raise StunDecodeError(f"{what} has a bad length {len(value)}")
        return value

    return decode_value


_Decoder = Callable[[bytes, bytes], Any]
_Encoder = Callable[[Any, bytes], bytes]


def _plain_address() -> tuple[_Decoder, _Encoder]:
    return (lambda value, _tid: _decode_address(value)), (lambda address, _tid: _encode_address(address))


_CODECS: dict[int, tuple[_Decoder, _Encoder]] = {
    AttributeType.MAPPED_ADDRESS: _plain_address(),
    AttributeType.SOURCE_ADDRESS: _plain_address(),
    AttributeType.CHANGED_ADDRESS: _plain_address(),
    AttributeType.ALTERNATE_SERVER: _plain_address(),
    AttributeType.RESPONSE_ORIGIN: _plain_address(),
    AttributeType.OTHER_ADDRESS: _plain_address(),
    AttributeType.XOR_MAPPED_ADDRESS: (
        lambda value, tid: _decode_address(value, xor_mask(tid)),
        lambda address, tid: _encode_address(address, xor_mask(tid)),
    ),
    # RFC 8489 sections 14.3 and 14.14: at most 513 and 763 bytes.
    AttributeType.USERNAME: (lambda value, _tid: _decode_text(value, 513), lambda text, _tid: text.encode("utf-8")),
    AttributeType.SOFTWARE: (lambda value, _tid: _decode_text(value, 763), lambda text, _tid: text.encode("utf-8")),
    AttributeType.MESSAGE_INTEGRITY: (_decode_fixed(lambda n: n == 20, "MESSAGE-INTEGRITY"), lambda mac, _tid: mac),
    # RFC 8489 section 14.6: 16 to 32 bytes, a multiple of 4.
    AttributeType.MESSAGE_INTEGRITY_SHA256: (
        _decode_fixed(lambda n: 16 <= n <= 32 and n % 4 == 0, "MESSAGE-INTEGRITY-SHA256"),
        lambda mac, _tid: mac,
    ),
    AttributeType.FINGERPRINT: (lambda value, _tid: _decode_crc(value), lambda crc, _tid: struct.pack("!I", crc)),
    AttributeType.ERROR_CODE: (
        lambda value, _tid: _decode_error_code(value),
        lambda error, _tid: _encode_error_code(error),
    ),
    AttributeType.UNKNOWN_ATTRIBUTES: (
        lambda value, _tid: _decode_unknown_attributes(value),
        lambda types, _tid: struct.pack(f"!{len(types)}H", *types),
    ),
    AttributeType.RESPONSE_PORT: (
        lambda value, _tid: _decode_response_port(value),
        lambda port, _tid: struct.pack("!HH", port, 0),
    ),
    AttributeType.CHANGE_REQUEST: (
        lambda value, _tid: _decode_change_request(value),
        lambda flags, _tid: struct.pack("!I", (0x04 if flags[0] else 0) | (0x02 if flags[1] else 0)),
    ),
}


def decode_attribute_value(attribute_type: int, value: bytes, transaction_id: bytes) -> Any:
    """Decode one value of a known type; unknown types come back as the raw bytes."""
    codec = _CODECS.get(attribute_type)
    return value if codec is None else codec[0](value, transaction_id)


def make_attribute(attribute_type: int, value: Any, transaction_id: bytes = b"", padding: bytes = b"") -> Attribute:
    """Encode a typed value (Address, str, ErrorCode, ChangeRequest, ...) as an attribute.

    ``transaction_id`` is needed by XOR-MAPPED-ADDRESS only; unknown types take raw bytes.
    """
    codec = _CODECS.get(attribute_type)
    raw = value if codec is None else codec[1](value, transaction_id)
    return Attribute(attribute_type, raw, padding)


def format_transaction_id(transaction_id: bytes) -> str:
    """``AA:BB:...`` upper-case hex, the form the tester logs and Wireshark's ``frame contains`` takes."""
    return transaction_id.hex(":").upper()
