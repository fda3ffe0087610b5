"""The DTLS 1.2 record layer: RFC 6347 section 4.1 and RFC 9146.

Parsing splits a datagram into records without touching their payloads;
``ReadState``/``WriteState`` hold one epoch of one direction (keys, sequence
numbers, the 64-record replay window of RFC 6347 section 4.1.2.6, the CID)
and turn records into plaintext and back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nettester.protocols.dtls.suites import RecordProtection

CHANGE_CIPHER_SPEC = 20
ALERT = 21
HANDSHAKE = 22
APPLICATION_DATA = 23
TLS12_CID = 25  # RFC 9146 section 4
CONTENT_TYPES = frozenset({CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA})

DTLS_1_0 = 0xFEFF
DTLS_1_2 = 0xFEFD
VERSION_BYTES = DTLS_1_2.to_bytes(2, "big")

HEADER_LENGTH = 13
MAX_PLAINTEXT = 2**14
MAX_CIPHERTEXT = 2**14 + 2048  # RFC 5246 section 6.2.3
MAX_SEQUENCE = 2**48 - 1
REPLAY_WINDOW = 64

_HEADER = struct.Struct("!BHHHIH")  # type, version, epoch, seq hi16, seq lo32, length
_AAD = struct.Struct("!HHIBHH")  # epoch, seq hi16, seq lo32, type, version, length
# RFC 9146 section 5: seq_num_placeholder (8 x 0xff) + tls12_cid; cid_length
# and the second tls12_cid follow.
_CID_AAD_PREFIX = b"\xff" * 8 + bytes([TLS12_CID])


class RecordError(ValueError):
    """A record header or record payload that cannot be accepted."""


@dataclass(slots=True)
class Record:
    """One record as received; ``fragment`` is still protected for epoch > 0."""

    content_type: int
    version: int
    epoch: int
    sequence_number: int
    cid: bytes
    fragment: bytes
    #: the 8 header bytes epoch + sequence number, as the additional data needs them
    epoch_and_sequence: bytes = b""


def parse_record(datagram: bytes, offset: int, cid_length: int) -> tuple[Record | None, int]:
    """The record at ``offset`` and the offset after it; (None, end) when the
    rest of the datagram is malformed (dropped, RFC 6347 section 4.1.2.7).
    Records of content type 25 carry a CID of ``cid_length`` bytes."""
    end = len(datagram)
    if end - offset < HEADER_LENGTH:
        return None, end
    content_type = datagram[offset]
    cid = b""
    if content_type == TLS12_CID:
        if cid_length == 0 or end - offset < HEADER_LENGTH + cid_length:
            return None, end
        version, epoch, seq_high, seq_low = struct.unpack_from("!HHHI", datagram, offset + 1)
        cid_start = offset + 11
        cid = datagram[cid_start : cid_start + cid_length]
        (length,) = struct.unpack_from("!H", datagram, cid_start + cid_length)
        start = cid_start + cid_length + 2
    else:
        content_type, version, epoch, seq_high, seq_low, length = _HEADER.unpack_from(datagram, offset)
        start = offset + HEADER_LENGTH
    if length > MAX_CIPHERTEXT or start + length > end or version >> 8 != 0xFE:
        return None, end
    received = Record(
        content_type,
        version,
        epoch,
        (seq_high << 32) | seq_low,
        cid,
        datagram[start : start + length],
        datagram[offset + 3 : offset + 11],
    )
    return received, start + length


def parse_records(datagram: bytes, cid_length: int) -> tuple[list[Record], bool]:
    """Split ``datagram`` into records (RFC 6347 section 4.1.1: several per
    datagram).  Returns the records and whether trailing bytes were malformed."""
    records: list[Record] = []
    offset = 0
    while offset < len(datagram):
        received, offset = parse_record(datagram, offset, cid_length)
        if received is None:
            return records, True
        records.append(received)
    return records, False


def peek_cid(datagram: bytes, cid_length: int) -> bytes | None:
    """The CID of the first record when it is a tls12_cid record, else None:
    all a demultiplexer needs (RFC 9146 section 4)."""
    if cid_length and len(datagram) >= HEADER_LENGTH + cid_length and datagram[0] == TLS12_CID:
        return datagram[11 : 11 + cid_length]
    return None


def encode_plaintext_record(content_type: int, version: int, epoch: int, sequence_number: int, payload: bytes) -> bytes:
    """An unprotected record (epoch 0, or a stateless HelloVerifyRequest)."""
    return (
        _HEADER.pack(content_type, version, epoch, sequence_number >> 32, sequence_number & 0xFFFFFFFF, len(payload))
        + payload
    )


class ReplayWindow:
    """The sliding anti-replay window of RFC 6347 section 4.1.2.6."""

    __slots__ = ("highest", "_bitmap")
    _MASK = (1 << REPLAY_WINDOW) - 1

    def __init__(self) -> None:
        self.highest = -1
        self._bitmap = 0

    @classmethod
    def continuing(cls, highest: int, bitmap: int) -> ReplayWindow:
        """A window that goes on where another one (on another node) stood:
        ``highest`` (-1: nothing received yet) and its ``bitmap``.  Raises
        ValueError for a state ``mark`` cannot produce."""
        if not -1 <= highest <= MAX_SEQUENCE or not 0 <= bitmap <= cls._MASK:
            raise ValueError("replay window out of range")
        # mark() sets bit 0 with the highest number and never marks below 0.
        if (highest >= 0) != bool(bitmap & 1) or bitmap >> (highest + 1):
            raise ValueError("inconsistent replay window")
        window = cls()
        window.highest = highest
        window._bitmap = bitmap
        return window

    @property
    def bitmap(self) -> int:
        """Bit i set: sequence number ``highest - i`` was received."""
        return self._bitmap

    def is_replay(self, sequence_number: int) -> bool:
        """True for a duplicate or a record too old for the window."""
        if sequence_number > self.highest:
            return False
        distance = self.highest - sequence_number
        return distance >= REPLAY_WINDOW or bool((self._bitmap >> distance) & 1)

    def mark(self, sequence_number: int) -> None:
        """Record an authenticated record's sequence number."""
        if sequence_number > self.highest:
            shift = sequence_number - self.highest
            self._bitmap = ((self._bitmap << shift) | 1) & self._MASK if shift < REPLAY_WINDOW else 1
            self.highest = sequence_number
        else:
            self._bitmap |= 1 << (self.highest - sequence_number)


def _cid_additional_data_prefix(cid: bytes) -> bytes:
    """The constant head of the RFC 9146 section 5.3 additional data (and of
    the section 5.1 MAC input): seq_num_placeholder, tls12_cid, cid_length,
    tls12_cid, version.  Epoch + sequence number, the CID and the inner
    plaintext length follow."""
    return _CID_AAD_PREFIX + bytes((len(cid), TLS12_CID)) + VERSION_BYTES


def _additional_data(epoch: int, sequence_number: int, content_type: int, version: int, length: int) -> bytes:
    """RFC 5246 section 6.2.3.3 with the DTLS epoch + sequence number as seq_num."""
    return _AAD.pack(epoch, sequence_number >> 32, sequence_number & 0xFFFFFFFF, content_type, version, length)


class ReadState:
    """One read epoch: its protection (None for epoch 0), replay window and
    the CID records of this epoch must carry (empty: no tls12_cid)."""

    __slots__ = ("epoch", "protection", "window", "cid", "_cid_prefix")

    def __init__(self, epoch: int, protection: RecordProtection | None, cid: bytes = b"") -> None:
        self.epoch = epoch
        self.protection = protection
        self.window = ReplayWindow()
        self.cid = cid
        self._cid_prefix = _cid_additional_data_prefix(cid)

    def open(self, record: Record) -> tuple[int, bytes]:
        """(content type, plaintext) of an authenticated record; raises
        ``RecordError`` when it fails authentication or has the wrong shape.
        The caller checks replay first and marks the window after success."""
        if self.protection is None:
            if record.content_type not in CONTENT_TYPES:
                raise RecordError("unprotected record of type %d" % record.content_type)
            if len(record.fragment) > MAX_PLAINTEXT:
                raise RecordError("oversized plaintext record")
            return record.content_type, record.fragment
        if self.cid:
            if record.content_type != TLS12_CID or record.cid != self.cid:
                raise RecordError("record without our connection id")
            head = self._cid_prefix + record.epoch_and_sequence + self.cid
            inner = self.protection.open(record.fragment, lambda length: head + length.to_bytes(2, "big"))
            if inner is None:
                raise RecordError("bad record mac")
            # DTLSInnerPlaintext: content, real type, zero padding (RFC 9146 section 4).
            stripped = inner.rstrip(b"\x00")
            if not stripped or stripped[-1] not in CONTENT_TYPES:
                raise RecordError("inner plaintext without a valid content type")
            content = stripped[:-1]
            if len(content) > MAX_PLAINTEXT:
                raise RecordError("oversized plaintext record")
            return stripped[-1], content
        content_type = record.content_type
        if content_type not in CONTENT_TYPES:
            raise RecordError("record of type %d" % content_type)
        head = record.epoch_and_sequence + bytes((content_type,)) + record.version.to_bytes(2, "big")
        plaintext = self.protection.open(record.fragment, lambda length: head + length.to_bytes(2, "big"))
        if plaintext is None:
            raise RecordError("bad record mac")
        if len(plaintext) > MAX_PLAINTEXT:
            raise RecordError("oversized plaintext record")
        return content_type, plaintext


class WriteState:
    """One write epoch: protection, next sequence number, the peer's CID."""

    __slots__ = ("epoch", "protection", "next_sequence", "cid", "_cid_prefix", "_cid_header")

    def __init__(self, epoch: int, protection: RecordProtection | None, cid: bytes = b"") -> None:
        self.epoch = epoch
        self.protection = protection
        self.next_sequence = 0
        self.cid = cid
        self._cid_prefix = _cid_additional_data_prefix(cid)
        self._cid_header = bytes((TLS12_CID,)) + VERSION_BYTES

    @property
    def overhead(self) -> int:
        """Bytes a record adds to its payload (header, CID, protection)."""
        if self.protection is None:
            return HEADER_LENGTH
        return HEADER_LENGTH + len(self.cid) + (1 if self.cid else 0) + self.protection.overhead

    def seal(self, content_type: int, payload: bytes) -> bytes:
        """The wire form of one record, consuming a sequence number."""
        sequence_number = self.next_sequence
        if sequence_number > MAX_SEQUENCE:
            raise RecordError("sequence number space exhausted")
        self.next_sequence = sequence_number + 1
        epoch = self.epoch
        if self.protection is None:
            return encode_plaintext_record(content_type, DTLS_1_2, epoch, sequence_number, payload)
        explicit_nonce = struct.pack("!HHI", epoch, sequence_number >> 32, sequence_number & 0xFFFFFFFF)
        cid = self.cid
        if cid:
            inner = payload + bytes((content_type,))
            fragment = self.protection.seal(
                inner, self._cid_prefix + explicit_nonce + cid + len(inner).to_bytes(2, "big"), explicit_nonce
            )
            return self._cid_header + explicit_nonce + cid + len(fragment).to_bytes(2, "big") + fragment
        fragment = self.protection.seal(
            payload, _additional_data(epoch, sequence_number, content_type, DTLS_1_2, len(payload)), explicit_nonce
        )
        return (
            _HEADER.pack(
                content_type, DTLS_1_2, epoch, sequence_number >> 32, sequence_number & 0xFFFFFFFF, len(fragment)
            )
            + fragment
        )
