"""CoAP message codec (RFC 7252 section 3), with the option registry.

Bytes in, a ``Message`` out, and back. Option values stay raw bytes in
the message; typed accessors decode them on demand, so a hot path only pays
for the options it reads. ``peek_header`` reads just type, code and
message id, which is all the deduplication decision needs.

Malformed input raises ``CoapDecodeError`` and nothing else. The error
carries whatever part of the header could be read, so the message layer can
answer a Confirmable message as RFC 7252 sections 4.2 and 5.4.1 say (Reset,
or 4.02 Bad Option piggybacked for a request) or count and drop it.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import NamedTuple

#: Whatever identifies a peer to the layers above the socket (an address, a DTLS peer): hashable.
Peer = Hashable

VERSION = 1
MAX_TOKEN_LENGTH = 8
PAYLOAD_MARKER = 0xFF
# RFC 7252 section 3.1: an option value is at most 65535 + 269 bytes long.
MAX_OPTION_EXTENDED = 65535 + 269


class MessageType(enum.IntEnum):
    """The 2-bit message type (RFC 7252 section 3)."""

    CON = 0
    NON = 1
    ACK = 2
    RST = 3


CON, NON, ACK, RST = MessageType.CON, MessageType.NON, MessageType.ACK, MessageType.RST
_TYPES = (CON, NON, ACK, RST)  # index lookup: cheaper than MessageType(n) per datagram


def make_code(code_class: int, detail: int) -> int:
    """The 8-bit code ``c.dd`` (RFC 7252 section 3: 3-bit class, 5-bit detail)."""
    return (code_class << 5) | detail


class Code:
    """Registered method and response codes (RFC 7252 section 12.1, RFC 7959, RFC 8132).

    Plain ints, not an IntEnum: reading an enum member costs ~100 ns, and
    the hot path reads several per datagram. The same holds for
    ``OptionNumber`` and ``ContentFormat``.
    """

    EMPTY = make_code(0, 0)
    GET = make_code(0, 1)
    POST = make_code(0, 2)
    PUT = make_code(0, 3)
    DELETE = make_code(0, 4)
    FETCH = make_code(0, 5)
    PATCH = make_code(0, 6)
    IPATCH = make_code(0, 7)
    CREATED = make_code(2, 1)
    DELETED = make_code(2, 2)
    VALID = make_code(2, 3)
    CHANGED = make_code(2, 4)
    CONTENT = make_code(2, 5)
    CONTINUE = make_code(2, 31)
    BAD_REQUEST = make_code(4, 0)
    UNAUTHORIZED = make_code(4, 1)
    BAD_OPTION = make_code(4, 2)
    FORBIDDEN = make_code(4, 3)
    NOT_FOUND = make_code(4, 4)
    METHOD_NOT_ALLOWED = make_code(4, 5)
    NOT_ACCEPTABLE = make_code(4, 6)
    REQUEST_ENTITY_INCOMPLETE = make_code(4, 8)
    CONFLICT = make_code(4, 9)
    PRECONDITION_FAILED = make_code(4, 12)
    REQUEST_ENTITY_TOO_LARGE = make_code(4, 13)
    UNSUPPORTED_CONTENT_FORMAT = make_code(4, 15)
    UNPROCESSABLE_ENTITY = make_code(4, 22)
    TOO_MANY_REQUESTS = make_code(4, 29)
    INTERNAL_SERVER_ERROR = make_code(5, 0)
    NOT_IMPLEMENTED = make_code(5, 1)
    BAD_GATEWAY = make_code(5, 2)
    SERVICE_UNAVAILABLE = make_code(5, 3)
    GATEWAY_TIMEOUT = make_code(5, 4)
    PROXYING_NOT_SUPPORTED = make_code(5, 5)
    HOP_LIMIT_REACHED = make_code(5, 8)


def code_string(code: int) -> str:
    """``c.dd`` notation of a code, e.g. ``2.05``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


_CODE_NAMES: dict[int, str] = {value: name for name, value in vars(Code).items() if not name.startswith("_")}


def code_name(code: int) -> str:
    """``GET`` for methods, ``2.05 Content`` for responses, ``c.dd`` if unregistered."""
    name = _CODE_NAMES.get(code)
    if name is None:
        return code_string(code)
    if is_request(code):
        return name
    return f"{code_string(code)} {name.replace('_', ' ').title()}"


def is_request(code: int) -> bool:
    """Class 0 and not Empty (RFC 7252 section 5.8)."""
    return 0 < code < 32


def is_response(code: int) -> bool:
    """Classes 2, 4 and 5 (RFC 7252 section 5.9)."""
    return (code >> 5) in (2, 4, 5)


class OptionFormat(enum.Enum):
    """Value formats of RFC 7252 section 3.2."""

    EMPTY = "empty"
    OPAQUE = "opaque"
    UINT = "uint"
    STRING = "string"


class OptionNumber:
    """Registered option numbers (CoAP Option Numbers registry), plain ints."""

    IF_MATCH = 1
    URI_HOST = 3
    ETAG = 4
    IF_NONE_MATCH = 5
    OBSERVE = 6
    URI_PORT = 7
    LOCATION_PATH = 8
    OSCORE = 9
    URI_PATH = 11
    CONTENT_FORMAT = 12
    MAX_AGE = 14
    URI_QUERY = 15
    HOP_LIMIT = 16
    ACCEPT = 17
    Q_BLOCK1 = 19
    LOCATION_QUERY = 20
    EDHOC = 21
    BLOCK2 = 23
    BLOCK1 = 27
    SIZE2 = 28
    Q_BLOCK2 = 31
    PROXY_URI = 35
    PROXY_SCHEME = 39
    SIZE1 = 60
    ECHO = 252
    NO_RESPONSE = 258
    REQUEST_TAG = 292


class OptionSpec(NamedTuple):
    """Format and length bounds of a registered option."""

    name: str
    format: OptionFormat
    min_length: int
    max_length: int
    repeatable: bool


_E, _O, _U, _S = OptionFormat.EMPTY, OptionFormat.OPAQUE, OptionFormat.UINT, OptionFormat.STRING

# RFC 7252 section 5.10 table 4, RFC 7641 section 2, RFC 7959 section 2.1,
# RFC 7967, RFC 8613, RFC 8768, RFC 9175, RFC 9177, RFC 9668.
OPTION_SPECS: dict[int, OptionSpec] = {
    1: OptionSpec("If-Match", _O, 0, 8, True),
    3: OptionSpec("Uri-Host", _S, 1, 255, False),
    4: OptionSpec("ETag", _O, 1, 8, True),
    5: OptionSpec("If-None-Match", _E, 0, 0, False),
    6: OptionSpec("Observe", _U, 0, 3, False),
    7: OptionSpec("Uri-Port", _U, 0, 2, False),
    8: OptionSpec("Location-Path", _S, 0, 255, True),
    9: OptionSpec("OSCORE", _O, 0, 255, False),
    11: OptionSpec("Uri-Path", _S, 0, 255, True),
    12: OptionSpec("Content-Format", _U, 0, 2, False),
    14: OptionSpec("Max-Age", _U, 0, 4, False),
    15: OptionSpec("Uri-Query", _S, 0, 255, True),
    16: OptionSpec("Hop-Limit", _U, 1, 1, False),
    17: OptionSpec("Accept", _U, 0, 2, False),
    19: OptionSpec("Q-Block1", _U, 0, 3, False),
    20: OptionSpec("Location-Query", _S, 0, 255, True),
    21: OptionSpec("EDHOC", _E, 0, 0, False),
    23: OptionSpec("Block2", _U, 0, 3, False),
    27: OptionSpec("Block1", _U, 0, 3, False),
    28: OptionSpec("Size2", _U, 0, 4, False),
    31: OptionSpec("Q-Block2", _U, 0, 3, True),
    35: OptionSpec("Proxy-Uri", _S, 1, 1034, False),
    39: OptionSpec("Proxy-Scheme", _S, 1, 255, False),
    60: OptionSpec("Size1", _U, 0, 4, False),
    252: OptionSpec("Echo", _O, 1, 40, False),
    258: OptionSpec("No-Response", _U, 0, 1, False),
    292: OptionSpec("Request-Tag", _O, 0, 8, True),
    # nettester's loss attribution, experimental range (section 12.2); layouts in attribution.py.
    # Any length passes the decoder so a malformed value is counted there, not silently dropped.
    65020: OptionSpec("Attribution-Tag", _O, 0, 255, False),
    65052: OptionSpec("Attribution-Report", _O, 0, 255, False),
}

# Number -> (min, max) length, the only thing the decoder checks per option.
_LENGTH_BOUNDS: dict[int, tuple[int, int]] = {
    number: (spec.min_length, spec.max_length) for number, spec in OPTION_SPECS.items()
}
_NOT_REPEATABLE = frozenset(number for number, spec in OPTION_SPECS.items() if not spec.repeatable)


def option_name(number: int) -> str:
    """Registered name of an option, or ``Option<number>``."""
    spec = OPTION_SPECS.get(number)
    return spec.name if spec else f"Option{number}"


def is_critical(number: int) -> bool:
    """Odd numbers are critical (RFC 7252 section 5.4.6)."""
    return bool(number & 1)


def is_unsafe(number: int) -> bool:
    """Bit 1 set: unsafe to forward (RFC 7252 section 5.4.6)."""
    return bool(number & 2)


def is_no_cache_key(number: int) -> bool:
    """Bits 1-4 equal to 11100: not part of the cache key (RFC 7252 section 5.4.6)."""
    return (number & 0x1E) == 0x1C


class ContentFormat:
    """Registered CoAP Content-Formats (RFC 7252 section 12.3 and later RFCs), plain ints."""

    TEXT_PLAIN = 0
    COSE_ENCRYPT0 = 16
    COSE_MAC0 = 17
    COSE_SIGN1 = 18
    LINK_FORMAT = 40
    XML = 41
    OCTET_STREAM = 42
    EXI = 47
    JSON = 50
    JSON_PATCH_JSON = 51
    MERGE_PATCH_JSON = 52
    CBOR = 60
    CWT = 61
    MULTIPART_CORE = 62
    CBOR_SEQ = 63
    COSE_ENCRYPT = 96
    COSE_MAC = 97
    COSE_SIGN = 98
    COSE_KEY = 101
    COSE_KEY_SET = 102
    SENML_JSON = 110
    SENSML_JSON = 111
    SENML_CBOR = 112
    SENSML_CBOR = 113
    SENML_EXI = 114
    SENSML_EXI = 115
    COAP_GROUP_JSON = 256
    SENML_XML = 310
    SENSML_XML = 311


CONTENT_FORMAT_MEDIA_TYPES: dict[int, str] = {
    ContentFormat.TEXT_PLAIN: "text/plain;charset=utf-8",
    ContentFormat.COSE_ENCRYPT0: 'application/cose;cose-type="cose-encrypt0"',
    ContentFormat.COSE_MAC0: 'application/cose;cose-type="cose-mac0"',
    ContentFormat.COSE_SIGN1: 'application/cose;cose-type="cose-sign1"',
    ContentFormat.LINK_FORMAT: "application/link-format",
    ContentFormat.XML: "application/xml",
    ContentFormat.OCTET_STREAM: "application/octet-stream",
    ContentFormat.EXI: "application/exi",
    ContentFormat.JSON: "application/json",
    ContentFormat.JSON_PATCH_JSON: "application/json-patch+json",
    ContentFormat.MERGE_PATCH_JSON: "application/merge-patch+json",
    ContentFormat.CBOR: "application/cbor",
    ContentFormat.CWT: "application/cwt",
    ContentFormat.MULTIPART_CORE: "application/multipart-core",
    ContentFormat.CBOR_SEQ: "application/cbor-seq",
    ContentFormat.COSE_ENCRYPT: 'application/cose;cose-type="cose-encrypt"',
    ContentFormat.COSE_MAC: 'application/cose;cose-type="cose-mac"',
    ContentFormat.COSE_SIGN: 'application/cose;cose-type="cose-sign"',
    ContentFormat.COSE_KEY: "application/cose-key",
    ContentFormat.COSE_KEY_SET: "application/cose-key-set",
    ContentFormat.SENML_JSON: "application/senml+json",
    ContentFormat.SENSML_JSON: "application/sensml+json",
    ContentFormat.SENML_CBOR: "application/senml+cbor",
    ContentFormat.SENSML_CBOR: "application/sensml+cbor",
    ContentFormat.SENML_EXI: "application/senml-exi",
    ContentFormat.SENSML_EXI: "application/sensml-exi",
    ContentFormat.COAP_GROUP_JSON: "application/coap-group+json",
    ContentFormat.SENML_XML: "application/senml+xml",
    ContentFormat.SENSML_XML: "application/sensml+xml",
}

MEDIA_TYPE_CONTENT_FORMATS: dict[str, int] = {
    media_type: number for number, media_type in CONTENT_FORMAT_MEDIA_TYPES.items()
}


def media_type(content_format: int) -> str:
    """Media type of a Content-Format number, ``unknown/<n>`` when unregistered."""
    return CONTENT_FORMAT_MEDIA_TYPES.get(content_format, f"unknown/{content_format}")


def parse_content_format(text: str) -> int:
    """A Content-Format from a number, a media type or a short alias.

    Short aliases (``text``, ``json``, ``cbor``, ``xml``, ``link``, ``octet``)
    are what command-line users type for ``--accept``.
    """
    aliases = {
        "text": ContentFormat.TEXT_PLAIN,
        "text/plain": ContentFormat.TEXT_PLAIN,
        "json": ContentFormat.JSON,
        "cbor": ContentFormat.CBOR,
        "xml": ContentFormat.XML,
        "link": ContentFormat.LINK_FORMAT,
        "octet": ContentFormat.OCTET_STREAM,
    }
    text = text.strip()
    if text.isdigit():
        value = int(text)
        if value > 0xFFFF:
            raise ValueError(f"content format {value} is out of range (0..65535)")
        return value
    lowered = text.lower()
    if lowered in aliases:
        return int(aliases[lowered])
    if lowered in MEDIA_TYPE_CONTENT_FORMATS:
        return MEDIA_TYPE_CONTENT_FORMATS[lowered]
    raise ValueError(f"unknown content format {text!r}")


# ---------------------------------------------------------------- values


def encode_uint(value: int) -> bytes:
    """Shortest big-endian encoding of an option uint (RFC 7252 section 3.2)."""
    if value < 0:
        raise ValueError("uint option values are non-negative")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(data: bytes) -> int:
    """Value of an option uint; leading zero bytes are tolerated (section 3.2)."""
    return int.from_bytes(data, "big")


class BlockValue(NamedTuple):
    """A Block1/Block2 option value (RFC 7959 section 2.2): NUM, M and SZX."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        """Block size in bytes: 2 ** (SZX + 4)."""
        return 16 << self.szx

    @property
    def offset(self) -> int:
        """Byte offset of this block in the whole body."""
        return self.num << (self.szx + 4)

    def encode(self) -> bytes:
        """Option value bytes (at most 3)."""
        return encode_block(self.num, self.more, self.szx)


MAX_BLOCK_NUM = (1 << 20) - 1
MAX_SZX = 6  # RFC 7959 section 2.2: SZX 7 is reserved.


def encode_block(num: int, more: bool, szx: int, bert: bool = False) -> bytes:
    """Encode NUM/M/SZX into a Block option value (RFC 7959 section 2.2); ``bert`` allows SZX 7
    (RFC 8323 section 6, reliable transports)."""
    if not 0 <= num <= MAX_BLOCK_NUM:
        raise ValueError(f"block number {num} out of range")
    if not 0 <= szx <= (7 if bert else MAX_SZX):
        raise ValueError(f"block SZX {szx} out of range")
    return encode_uint((num << 4) | (8 if more else 0) | szx)


def decode_block(data: bytes) -> BlockValue:
    """Decode a Block option value; SZX 7 is returned as is for the caller to reject."""
    value = int.from_bytes(data, "big")
    return BlockValue(value >> 4, bool(value & 8), value & 7)


def szx_for_size(size: int) -> int:
    """Largest SZX whose block size is at most ``size`` (clamped to 16..1024)."""
    szx = max(size, 16).bit_length() - 5
    return min(max(szx, 0), MAX_SZX)


# ---------------------------------------------------------------- message


Option = tuple[int, bytes]


@dataclass(slots=True, eq=True)
class Message:
    """One CoAP message.

    ``options`` is a list of ``(number, raw value)`` pairs; the encoder sorts
    them by number, keeping the order of repeated options.
    """

    mtype: MessageType
    code: int
    mid: int = 0
    token: bytes = b""
    options: list[Option] = field(default_factory=list)
    payload: bytes = b""

    # -- generic option access

    def option(self, number: int) -> bytes | None:
        """Raw value of the first occurrence of an option, or None."""
        for opt_number, value in self.options:
            if opt_number == number:
                return value
        return None

    def option_values(self, number: int) -> list[bytes]:
        """Raw values of every occurrence of an option, in order."""
        return [value for opt_number, value in self.options if opt_number == number]

    def has_option(self, number: int) -> bool:
        """True when the option occurs at least once."""
        return any(opt_number == number for opt_number, _ in self.options)

    def remove_option(self, number: int) -> None:
        """Drop every occurrence of an option."""
        self.options = [opt for opt in self.options if opt[0] != number]

    def set_option(self, number: int, value: bytes) -> None:
        """Replace every occurrence of an option by a single value."""
        self.remove_option(number)
        self.options.append((number, value))

    def uint_option(self, number: int) -> int | None:
        """Value of a uint option, or None when absent."""
        value = self.option(number)
        return None if value is None else int.from_bytes(value, "big")

    def set_uint_option(self, number: int, value: int) -> None:
        """Set a uint option (shortest encoding)."""
        self.set_option(number, encode_uint(value))

    # -- typed accessors for the options the stack itself reads

    @property
    def uri_path(self) -> list[str]:
        """Uri-Path segments, decoded as UTF-8 (errors replaced)."""
        return [v.decode("utf-8", "replace") for n, v in self.options if n == OptionNumber.URI_PATH]

    @property
    def uri_query(self) -> list[str]:
        """Uri-Query arguments, decoded as UTF-8 (errors replaced)."""
        return [v.decode("utf-8", "replace") for n, v in self.options if n == OptionNumber.URI_QUERY]

    @property
    def path_string(self) -> str:
        """``/a/b`` form of the Uri-Path (``/`` when empty)."""
        return "/" + "/".join(self.uri_path)

    @property
    def content_format(self) -> int | None:
        """Content-Format, or None."""
        return self.uint_option(OptionNumber.CONTENT_FORMAT)

    @property
    def accept(self) -> int | None:
        """Accept, or None."""
        return self.uint_option(OptionNumber.ACCEPT)

    @property
    def observe(self) -> int | None:
        """Observe, or None."""
        return self.uint_option(OptionNumber.OBSERVE)

    @property
    def block1(self) -> BlockValue | None:
        """Block1 decoded, or None."""
        value = self.option(OptionNumber.BLOCK1)
        return None if value is None else decode_block(value)

    @property
    def block2(self) -> BlockValue | None:
        """Block2 decoded, or None."""
        value = self.option(OptionNumber.BLOCK2)
        return None if value is None else decode_block(value)

    @property
    def size1(self) -> int | None:
        """Size1, or None."""
        return self.uint_option(OptionNumber.SIZE1)

    @property
    def size2(self) -> int | None:
        """Size2, or None."""
        return self.uint_option(OptionNumber.SIZE2)

    @property
    def is_empty(self) -> bool:
        """Code 0.00 (RFC 7252 section 4.1)."""
        return self.code == 0

    def encode(self) -> bytes:
        """Wire bytes of this message."""
        return encode_message(self.mtype, self.code, self.mid, self.token, self.options, self.payload)

    def describe(self) -> str:
        """One readable line for logs: ``CON GET MID=1 token=0a``."""
        kind = code_name(self.code)
        return f"{MessageType(self.mtype).name} {kind} MID={self.mid} token={self.token.hex() or '-'}"


def _option_header_nibble(value: int) -> tuple[int, bytes]:
    """Nibble and extended bytes for an option delta or length (section 3.1)."""
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    if value <= MAX_OPTION_EXTENDED:
        return 14, (value - 269).to_bytes(2, "big")
    raise ValueError(f"option delta/length {value} exceeds {MAX_OPTION_EXTENDED}")


def encode_options(options: list[Option] | tuple[Option, ...]) -> bytes:
    """Encode options in number order (stable for repeated options)."""
    out = bytearray()
    previous = 0
    if len(options) > 1:
        options = sorted(options, key=_OPTION_NUMBER)
    for number, value in options:
        delta = number - previous
        previous = number
        length = len(value)
        if delta < 13 and length < 13:
            out.append((delta << 4) | length)
        else:
            delta_nibble, delta_ext = _option_header_nibble(delta)
            length_nibble, length_ext = _option_header_nibble(length)
            out.append((delta_nibble << 4) | length_nibble)
            out += delta_ext
            out += length_ext
        out += value
    return bytes(out)


_OPTION_NUMBER = itemgetter(0)  # the sort key of options, in C


def encode_message(
    mtype: int,
    code: int,
    mid: int,
    token: bytes = b"",
    options: list[Option] | tuple[Option, ...] = (),
    payload: bytes = b"",
) -> bytes:
    """Wire bytes of a message given its fields (RFC 7252 section 3)."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise ValueError(f"token longer than {MAX_TOKEN_LENGTH} bytes")
    header = bytes(
        (0x40 | (mtype << 4) | len(token), code, (mid >> 8) & 0xFF, mid & 0xFF)
    )
    encoded_options = encode_options(options) if options else b""
    if payload:
        return b"".join((header, token, encoded_options, b"\xff", payload))
    return b"".join((header, token, encoded_options))


def encode_empty(mtype: int, mid: int) -> bytes:
    """An Empty message: ACK or RST matching ``mid``, or a CON ping."""
    return bytes((0x40 | (mtype << 4), 0, (mid >> 8) & 0xFF, mid & 0xFF))


# ---------------------------------------------------------------- decoding


class DecodeFailure(enum.Enum):
    """How a datagram failed to decode; decides the answer (RFC 7252 4.2, 4.3, 5.4.1)."""

    #: Shorter than 4 bytes or version != 1: silently ignored (section 3).
    GARBAGE = "garbage"
    #: Header readable but the rest is not (section 4.2 "message format error").
    FORMAT = "format"
    #: An unrecognized or malformed critical option (sections 5.4.1, 5.4.3).
    BAD_OPTION = "bad_option"


class CoapDecodeError(ValueError):
    """A datagram that is not an acceptable CoAP message.

    ``mtype``, ``code`` and ``mid`` are set unless ``failure`` is GARBAGE;
    ``token`` is set when it could be read (always for BAD_OPTION), and
    ``option`` names the offending option for BAD_OPTION. With these the
    message layer answers a CON with Reset, or a CON request with a bad
    critical option with 4.02 Bad Option (RFC 7252 section 5.4.1).
    """

    def __init__(
        self,
        failure: DecodeFailure,
        reason: str,
        mtype: int | None = None,
        code: int | None = None,
        mid: int | None = None,
        token: bytes | None = None,
        option: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.failure = failure
        self.reason = reason
        self.mtype = mtype
        self.code = code
        self.mid = mid
        self.token = token
        self.option = option


def peek_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(type, token length, code, MID) from the fixed 4-byte header, or None
    when ``data`` is not CoAP version 1: all that deduplication needs."""
    if len(data) < 4:
        return None
    first = data[0]
    if first >> 6 != VERSION:
        return None
    return (first >> 4) & 3, first & 0x0F, data[1], (data[2] << 8) | data[3]


def decode(data: bytes) -> Message:
    """Parse a datagram into a ``Message``.

    Unrecognized elective options, and recognized elective options whose
    length is out of bounds, are dropped (RFC 7252 sections 5.4.1, 5.4.3);
    the same for a critical option raises BAD_OPTION.

    Raises ``CoapDecodeError`` for anything that is not a valid message.
    """
    header = peek_header(data)
    if header is None:
        raise CoapDecodeError(DecodeFailure.GARBAGE, "not a CoAP version 1 datagram")
    return decode_after_header(data, header)


def decode_after_header(data: bytes, header: tuple[int, int, int, int], signalling: bool = False) -> Message:
    """``decode`` for a caller that already has ``peek_header``'s result.

    ``signalling``: an RFC 8323 section 5 signalling message (class 7), whose
    option numbers mean something per code: every option is kept raw, for the
    caller to check.
    """
    mtype, tkl, code, mid = header

    def fail(reason: str, token: bytes | None = None) -> CoapDecodeError:
        return CoapDecodeError(DecodeFailure.FORMAT, reason, mtype, code, mid, token)

    if code == 0:
        # Section 4.1: an Empty message is the 4-byte header and nothing else.
        if len(data) != 4 or tkl:
            raise fail("empty message with token, options or payload")
        return Message(_TYPES[mtype], 0, mid)
    if tkl > MAX_TOKEN_LENGTH:
        raise fail(f"token length {tkl} is reserved")  # Section 3: 9-15 reserved.
    code_class = code >> 5
    if code_class in (1, 6, 7) and not (signalling and code_class == 7):
        raise fail(f"reserved code class {code_class}")  # Section 12.1.
    if mtype == RST or (mtype == ACK and code_class == 0):
        raise fail("request code in an ACK or a Reset with a code")  # Sections 4.2, 4.3.
    end = len(data)
    position = 4 + tkl
    if position > end:
        raise fail("truncated token")
    token = data[4:position]
    options: list[Option] = []
    number = 0
    bad_option: int | None = None
    payload = b""
    while position < end:
        byte = data[position]
        position += 1
        if byte == PAYLOAD_MARKER:
            if position == end:
                raise fail("payload marker followed by no payload", token)  # Section 3.
            payload = data[position:]
            break
        delta = byte >> 4
        length = byte & 0x0F
        if delta >= 13:
            if delta == 15:
                raise fail("option delta 15 without payload marker", token)
            if delta == 13:
                if position >= end:
                    raise fail("truncated option delta", token)
                delta = data[position] + 13
                position += 1
            else:
                if position + 2 > end:
                    raise fail("truncated option delta", token)
                delta = ((data[position] << 8) | data[position + 1]) + 269
                position += 2
        if length >= 13:
            if length == 15:
                raise fail("option length 15 is reserved", token)
            if length == 13:
                if position >= end:
                    raise fail("truncated option length", token)
                length = data[position] + 13
                position += 1
            else:
                if position + 2 > end:
                    raise fail("truncated option length", token)
                length = ((data[position] << 8) | data[position + 1]) + 269
                position += 2
        number += delta
        value_end = position + length
        if value_end > end:
            raise fail("option value runs past the datagram", token)
        value = data[position:value_end]
        position = value_end
        if signalling:
            options.append((number, value))
            continue
        bounds = _LENGTH_BOUNDS.get(number)
        # Section 5.4.5: a repeated non-repeatable option is unrecognized. Options
        # come in number order, so a repeat follows its first occurrence directly.
        if (bounds is not None and bounds[0] <= length <= bounds[1]
                and not (options and options[-1][0] == number and number in _NOT_REPEATABLE)):
            options.append((number, value))
        elif number & 1 and bad_option is None:
            bad_option = number  # Keep parsing: a later format error wins.
    if bad_option is not None:
        raise CoapDecodeError(
            DecodeFailure.BAD_OPTION,
            f"unrecognized or malformed critical option {option_name(bad_option)}",
            mtype,
            code,
            mid,
            token,
            bad_option,
        )
    return Message(_TYPES[mtype], code, mid, token, options, payload)


# Content-Format option values of the formats answered most, encoded once.
_CONTENT_FORMAT_VALUES = {number: encode_uint(number) for number in (0, 40, 41, 42, 50, 60)}


def response(
    code: int,
    payload: bytes = b"",
    content_format: int | None = None,
    options: list[tuple[int, bytes]] | None = None,
) -> Message:
    """A response for ``CoapLayer.respond``; the layer sets type, MID and token."""
    message = Message(ACK, code, 0, b"", list(options) if options else [], payload)
    if content_format is not None:
        value = _CONTENT_FORMAT_VALUES.get(content_format)
        message.options.append((OptionNumber.CONTENT_FORMAT, encode_uint(content_format) if value is None else value))
    return message
