"""DTLS 1.2 handshake messages, extensions, fragmentation and reassembly.

Codecs for the messages of RFC 5246 section 7.4 with the DTLS changes of
RFC 6347 section 4.2 (cookie, HelloVerifyRequest, the 12-byte handshake
header).  Every decoder raises ``DecodeError`` and nothing else on bad input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from nettester.protocols.dtls.alerts import DECODE_ERROR, ILLEGAL_PARAMETER

HELLO_REQUEST = 0
CLIENT_HELLO = 1
SERVER_HELLO = 2
HELLO_VERIFY_REQUEST = 3
CERTIFICATE = 11
SERVER_KEY_EXCHANGE = 12
CERTIFICATE_REQUEST = 13
SERVER_HELLO_DONE = 14
CERTIFICATE_VERIFY = 15
CLIENT_KEY_EXCHANGE = 16
FINISHED = 20

EXT_SERVER_NAME = 0
EXT_SUPPORTED_GROUPS = 10
EXT_EC_POINT_FORMATS = 11
EXT_SIGNATURE_ALGORITHMS = 13
EXT_EXTENDED_MASTER_SECRET = 23
EXT_CONNECTION_ID = 54  # RFC 9146 section 3
EXT_RENEGOTIATION_INFO = 0xFF01

TLS_EMPTY_RENEGOTIATION_INFO_SCSV = 0x00FF
GROUP_SECP256R1 = 23
GROUP_X25519 = 29
ECDSA_SECP256R1_SHA256 = 0x0403
CERT_TYPE_ECDSA_SIGN = 64
NAMED_CURVE = 3

HEADER_LENGTH = 12
_HEADER = struct.Struct("!BHBHHBHB")  # type, len hi16, len lo8, seq, off hi16, off lo8, flen hi16, flen lo8


class DecodeError(ValueError):
    """A handshake message or extension that does not parse; ``alert`` is
    the fatal alert it earns once the peer is known to be where it claims."""

    alert = DECODE_ERROR


class DuplicateExtensionError(DecodeError):
    """The same extension twice in a hello (RFC 5246 section 7.4.1.4)."""

    alert = ILLEGAL_PARAMETER


class Reader:
    """Bounds-checked reading of TLS vectors (RFC 5246 section 4)."""

    __slots__ = ("_data", "_offset")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def take(self, length: int) -> bytes:
        end = self._offset + length
        if end > len(self._data):
            raise DecodeError("truncated")
        chunk = self._data[self._offset : end]
        self._offset = end
        return chunk

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, width: int, minimum: int = 0, maximum: int | None = None) -> bytes:
        length = self.uint(width)
        if length < minimum or (maximum is not None and length > maximum):
            raise DecodeError("vector length out of range")
        return self.take(length)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def finish(self) -> None:
        if self.remaining:
            raise DecodeError("trailing bytes")


def vector(width: int, data: bytes) -> bytes:
    """A length-prefixed TLS vector."""
    return len(data).to_bytes(width, "big") + data


def uint16_list(data: bytes, minimum: int = 2) -> list[int]:
    """A vector of uint16 values (cipher suites, groups, algorithms)."""
    reader = Reader(data)
    body = reader.vector(2, minimum)
    reader.finish()
    if len(body) % 2:
        raise DecodeError("odd uint16 list")
    return [int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2)]


def encode_uint16_list(values: list[int] | tuple[int, ...]) -> bytes:
    return vector(2, b"".join(value.to_bytes(2, "big") for value in values))


def decode_extensions(reader: Reader, strict: bool = True) -> dict[int, bytes]:
    """Extensions of a hello; absent block gives {} (RFC 5246 section 7.4.1.2).
    Duplicates are an error (section 7.4.1.4), unless not ``strict`` (the
    stateless cookie check, which leaves judging them to the connection)."""
    if not reader.remaining:
        return {}
    block = Reader(reader.vector(2))
    extensions: dict[int, bytes] = {}
    while block.remaining:
        extension_type = block.uint(2)
        if extension_type in extensions and strict:
            raise DuplicateExtensionError("duplicate extension %d" % extension_type)
        extensions[extension_type] = block.vector(2)
    return extensions


def encode_extensions(extensions: dict[int, bytes]) -> bytes:
    if not extensions:
        return b""
    return vector(2, b"".join(t.to_bytes(2, "big") + vector(2, d) for t, d in extensions.items()))


@dataclass
class ClientHello:
    """RFC 6347 section 4.2.1: a TLS ClientHello with a cookie."""

    version: int
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: list[int]
    compression_methods: bytes
    extensions: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def decode(cls, body: bytes, strict: bool = True) -> "ClientHello":
        reader = Reader(body)
        version = reader.uint(2)
        random = reader.take(32)
        session_id = reader.vector(1, 0, 32)
        cookie = reader.vector(1, 0, 255)
        suites_bytes = reader.vector(2, 2)
        if len(suites_bytes) % 2:
            raise DecodeError("odd cipher suite list")
        cipher_suites = [int.from_bytes(suites_bytes[i : i + 2], "big") for i in range(0, len(suites_bytes), 2)]
        compression_methods = reader.vector(1, 1)
        extensions = decode_extensions(reader, strict)
        reader.finish()
        return cls(version, random, session_id, cookie, cipher_suites, compression_methods, extensions)

    def encode(self) -> bytes:
        return b"".join(
            (
                self.version.to_bytes(2, "big"),
                self.random,
                vector(1, self.session_id),
                vector(1, self.cookie),
                encode_uint16_list(self.cipher_suites),
                vector(1, self.compression_methods),
                encode_extensions(self.extensions),
            )
        )

    def cookie_input(self) -> bytes:
        """Every parameter except the cookie: what a stateless cookie binds
        (RFC 6347 section 4.2.1), since the client repeats them unchanged."""
        encoded = self.encode()
        split = 2 + 32 + 1 + len(self.session_id)
        return encoded[:split] + encoded[split + 1 + len(self.cookie) :]


@dataclass
class ServerHello:
    version: int
    random: bytes
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def decode(cls, body: bytes) -> "ServerHello":
        reader = Reader(body)
        version = reader.uint(2)
        random = reader.take(32)
        session_id = reader.vector(1, 0, 32)
        cipher_suite = reader.uint(2)
        compression_method = reader.uint(1)
        extensions = decode_extensions(reader)
        reader.finish()
        return cls(version, random, session_id, cipher_suite, compression_method, extensions)

    def encode(self) -> bytes:
        return b"".join(
            (
                self.version.to_bytes(2, "big"),
                self.random,
                vector(1, self.session_id),
                self.cipher_suite.to_bytes(2, "big"),
                bytes((self.compression_method,)),
                encode_extensions(self.extensions),
            )
        )


def decode_hello_verify_request(body: bytes) -> bytes:
    """The cookie of a HelloVerifyRequest (RFC 6347 section 4.2.1)."""
    reader = Reader(body)
    reader.uint(2)
    cookie = reader.vector(1, 0, 255)
    reader.finish()
    return cookie


def encode_hello_verify_request(version: int, cookie: bytes) -> bytes:
    return version.to_bytes(2, "big") + vector(1, cookie)


def decode_certificate(body: bytes) -> list[bytes]:
    """DER certificates, leaf first (RFC 5246 section 7.4.2)."""
    reader = Reader(body)
    chain = Reader(reader.vector(3))
    reader.finish()
    certificates = []
    while chain.remaining:
        certificates.append(chain.vector(3, 1))
    return certificates


def encode_certificate(certificates: list[bytes]) -> bytes:
    return vector(3, b"".join(vector(3, der) for der in certificates))


@dataclass
class ServerKeyExchange:
    """PSK hint and/or ECDHE parameters and their signature (RFC 4279
    section 2, RFC 5489 section 2, RFC 8422 section 5.4)."""

    psk_identity_hint: bytes | None = None
    group: int | None = None
    public_key: bytes | None = None
    signature_algorithm: int | None = None
    signature: bytes | None = None

    @classmethod
    def decode(cls, body: bytes, has_psk: bool, has_ecdhe: bool, signed: bool) -> "ServerKeyExchange":
        reader = Reader(body)
        message = cls()
        if has_psk:
            message.psk_identity_hint = reader.vector(2)
        if has_ecdhe:
            if reader.uint(1) != NAMED_CURVE:
                raise DecodeError("only named curves are supported")
            message.group = reader.uint(2)
            message.public_key = reader.vector(1, 1)
        if signed:
            message.signature_algorithm = reader.uint(2)
            message.signature = reader.vector(2, 1)
        reader.finish()
        return message

    def ecdh_params(self) -> bytes:
        """ServerECDHParams, the part a signature covers after the randoms."""
        assert self.group is not None and self.public_key is not None
        return bytes((NAMED_CURVE,)) + self.group.to_bytes(2, "big") + vector(1, self.public_key)

    def encode(self) -> bytes:
        parts = []
        if self.psk_identity_hint is not None:
            parts.append(vector(2, self.psk_identity_hint))
        if self.group is not None:
            parts.append(self.ecdh_params())
        if self.signature is not None:
            assert self.signature_algorithm is not None
            parts.append(self.signature_algorithm.to_bytes(2, "big") + vector(2, self.signature))
        return b"".join(parts)


@dataclass
class ClientKeyExchange:
    psk_identity: bytes | None = None
    public_key: bytes | None = None

    @classmethod
    def decode(cls, body: bytes, has_psk: bool, has_ecdhe: bool) -> "ClientKeyExchange":
        reader = Reader(body)
        message = cls()
        if has_psk:
            message.psk_identity = reader.vector(2)
        if has_ecdhe:
            message.public_key = reader.vector(1, 1)
        reader.finish()
        return message

    def encode(self) -> bytes:
        parts = []
        if self.psk_identity is not None:
            parts.append(vector(2, self.psk_identity))
        if self.public_key is not None:
            parts.append(vector(1, self.public_key))
        return b"".join(parts)


@dataclass
class CertificateRequest:
    """RFC 5246 section 7.4.4."""

    certificate_types: bytes
    signature_algorithms: list[int]
    authorities: bytes = b""

    @classmethod
    def decode(cls, body: bytes) -> "CertificateRequest":
        reader = Reader(body)
        types = reader.vector(1, 1)
        raw = reader.vector(2, 2)
        if len(raw) % 2:
            raise DecodeError("odd signature algorithm list")
        algorithms = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
        authorities = reader.vector(2)
        reader.finish()
        return cls(types, algorithms, authorities)

    def encode(self) -> bytes:
        return (
            vector(1, self.certificate_types)
            + encode_uint16_list(self.signature_algorithms)
            + vector(2, self.authorities)
        )


def decode_digitally_signed(body: bytes) -> tuple[int, bytes]:
    """(SignatureAndHashAlgorithm, signature) of a CertificateVerify."""
    reader = Reader(body)
    algorithm = reader.uint(2)
    signature = reader.vector(2, 1)
    reader.finish()
    return algorithm, signature


def encode_digitally_signed(algorithm: int, signature: bytes) -> bytes:
    return algorithm.to_bytes(2, "big") + vector(2, signature)


def decode_single_vector(body: bytes, width: int, minimum: int = 0, maximum: int | None = None) -> bytes:
    """A body that is exactly one vector (connection_id, server_name entry...)."""
    reader = Reader(body)
    value = reader.vector(width, minimum, maximum)
    reader.finish()
    return value


def decode_server_name(body: bytes) -> str | None:
    """The host_name of a server_name extension (RFC 6066 section 3)."""
    reader = Reader(decode_single_vector(body, 2, 1))
    while reader.remaining:
        name_type = reader.uint(1)
        name = reader.vector(2, 1)
        if name_type == 0:
            try:
                return name.decode("ascii")
            except UnicodeDecodeError as error:
                raise DecodeError("non-ASCII host name") from error
    return None


def encode_server_name(host: str) -> bytes:
    return vector(2, b"\x00" + vector(2, host.encode("ascii")))


# --- the DTLS handshake header, fragmentation and reassembly -------------------


@dataclass(slots=True)
class Fragment:
    """One handshake fragment (RFC 6347 section 4.2.2)."""

    msg_type: int
    length: int
    message_seq: int
    offset: int
    body: bytes


def parse_fragments(payload: bytes) -> list[Fragment]:
    """Every handshake fragment in one record's plaintext."""
    fragments = []
    offset = 0
    while offset < len(payload):
        if len(payload) - offset < HEADER_LENGTH:
            raise DecodeError("truncated handshake header")
        msg_type, len_hi, len_lo, seq, off_hi, off_lo, flen_hi, flen_lo = _HEADER.unpack_from(payload, offset)
        length = (len_hi << 8) | len_lo
        fragment_offset = (off_hi << 8) | off_lo
        fragment_length = (flen_hi << 8) | flen_lo
        start = offset + HEADER_LENGTH
        if fragment_offset + fragment_length > length or start + fragment_length > len(payload):
            raise DecodeError("fragment outside its message")
        fragments.append(Fragment(msg_type, length, seq, fragment_offset, payload[start : start + fragment_length]))
        offset = start + fragment_length
    return fragments


def encode_header(msg_type: int, length: int, message_seq: int, offset: int, fragment_length: int) -> bytes:
    return _HEADER.pack(
        msg_type,
        length >> 8,
        length & 0xFF,
        message_seq,
        offset >> 8,
        offset & 0xFF,
        fragment_length >> 8,
        fragment_length & 0xFF,
    )


def encode_message(msg_type: int, message_seq: int, body: bytes) -> bytes:
    """An unfragmented message: also its form in the handshake transcript
    (RFC 6347 section 4.2.6)."""
    return encode_header(msg_type, len(body), message_seq, 0, len(body)) + body


def fragment_message(msg_type: int, message_seq: int, body: bytes, max_fragment: int) -> list[bytes]:
    """The message split into fragments of at most ``max_fragment`` body bytes."""
    max_fragment = max(1, max_fragment)
    if len(body) <= max_fragment:
        return [encode_message(msg_type, message_seq, body)]
    return [
        encode_header(msg_type, len(body), message_seq, start, len(body[start : start + max_fragment]))
        + body[start : start + max_fragment]
        for start in range(0, len(body), max_fragment)
    ]


class PartialMessage:
    """A message being reassembled: its buffer and the byte ranges received."""

    __slots__ = ("msg_type", "epoch", "buffer", "ranges")

    def __init__(self, msg_type: int, length: int, epoch: int) -> None:
        self.msg_type = msg_type
        self.epoch = epoch
        self.buffer = bytearray(length)
        self.ranges: list[tuple[int, int]] = []

    def add(self, offset: int, body: bytes) -> None:
        self.buffer[offset : offset + len(body)] = body
        start, end = offset, offset + len(body)
        merged = []
        for low, high in self.ranges:
            if high < start or low > end:
                merged.append((low, high))
            else:
                start, end = min(start, low), max(end, high)
        merged.append((start, end))
        merged.sort()
        self.ranges = merged

    @property
    def complete(self) -> bool:
        return self.ranges == [(0, len(self.buffer))]


class Reassembler:
    """Orders and reassembles incoming handshake messages by message_seq
    (RFC 6347 section 4.2.2).  Only a small window of future messages is
    buffered, and all buffers together stay within ``max_message_length``
    bytes, so a peer cannot make us hold much memory."""

    def __init__(self, max_message_length: int = 32768, window: int = 8) -> None:
        self.next_seq = 0
        self.max_message_length = max_message_length
        self.window = window
        self._pending: dict[int, PartialMessage] = {}
        self._buffered = 0

    def add(self, fragment: Fragment, epoch: int) -> str:
        """Take a fragment: 'old' (a retransmission of something already
        delivered), 'new', or 'rejected' (inconsistent or out of bounds)."""
        seq = fragment.message_seq
        if seq < self.next_seq:
            return "old"
        if seq >= self.next_seq + self.window or fragment.length > self.max_message_length:
            return "rejected"
        partial = self._pending.get(seq)
        if partial is None:
            if self._buffered + fragment.length > self.max_message_length:
                return "rejected"
            partial = self._pending[seq] = PartialMessage(fragment.msg_type, fragment.length, epoch)
            self._buffered += fragment.length
        elif (partial.msg_type, len(partial.buffer), partial.epoch) != (fragment.msg_type, fragment.length, epoch):
            return "rejected"
        partial.add(fragment.offset, fragment.body)
        return "new"

    def pop(self) -> tuple[int, int, int, bytes] | None:
        """The next complete message in order as (msg_type, seq, epoch, body)."""
        partial = self._pending.get(self.next_seq)
        if partial is None or not partial.complete:
            return None
        del self._pending[self.next_seq]
        self._buffered -= len(partial.buffer)
        self.next_seq += 1
        return partial.msg_type, self.next_seq - 1, partial.epoch, bytes(partial.buffer)

    def restart_at(self, seq: int) -> None:
        """Expect ``seq`` next, forgetting anything buffered."""
        self.next_seq = seq
        self._pending.clear()
        self._buffered = 0
