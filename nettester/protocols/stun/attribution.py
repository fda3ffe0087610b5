"""In-band loss attribution between two nettester ends (STUN), sans-IO.

The method is STAMP's (RFC 8762): the reflector returns what it received, so
the sender can split its losses by direction. Two comprehension-optional
attributes (RFC 8489 section 14: types 0x8000-0xFFFF may be ignored, so
third-party peers see nothing new) carry it; neither code point is in the
IANA STUN attribute registry:

- ``NETTESTER-SEQUENCE`` (0xFE54, in requests, 12 bytes): the tester
  session id (8 bytes, the same for a client across its new sockets) and the
  sequence number of this transmission (4 bytes; a re-send keeps its
  transaction id but gets its own number).
- ``NETTESTER-RECEIVED`` (0xFE55, in success responses, 28 bytes): what the
  server received of that session since it created its state: the number of
  requests (4), the sequence number that created the state (4), the highest
  sequence number (4), a bitmap of the 64 numbers below the highest (8; bit
  ``i`` set: ``highest - 1 - i`` arrived) and the receive time (8,
  microseconds since the Unix epoch).

All integers are big-endian (network order, RFC 8489 section 5).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NETTESTER_SEQUENCE = 0xFE54
NETTESTER_RECEIVED = 0xFE55

WINDOW = 64
_WINDOW_MASK = (1 << WINDOW) - 1
_U32 = 0xFFFFFFFF

_SEQUENCE = struct.Struct("!8sI")
_RECEIVED = struct.Struct("!IIIQQ")
_STATE = struct.Struct("!IIIQ")  # received, first, highest, window: the server's state of one session
_RECEIVED_ATTRIBUTE = struct.Struct("!HHIIIQQ")  # the whole attribute: type, length, value
SEQUENCE_LENGTH = _SEQUENCE.size  # 12
RECEIVED_LENGTH = _RECEIVED.size  # 28
SESSION_ID_LENGTH = 8
SEQUENCE_HEADER = struct.pack("!HH", NETTESTER_SEQUENCE, SEQUENCE_LENGTH)
RECEIVED_HEADER = struct.pack("!HH", NETTESTER_RECEIVED, RECEIVED_LENGTH)


class AttributionError(ValueError):
    """A NETTESTER attribute that is malformed or claims something impossible: counted, never trusted."""


@dataclass(frozen=True, slots=True)
class SequenceTag:
    """The value of NETTESTER-SEQUENCE: which tester session, which transmission."""

    session: bytes
    sequence: int

    def encode(self) -> bytes:
        """The attribute value (12 bytes)."""
        return _SEQUENCE.pack(self.session, self.sequence & _U32)

    @classmethod
    def decode(cls, value: bytes) -> SequenceTag:
        if len(value) != SEQUENCE_LENGTH:
            raise AttributionError(f"NETTESTER-SEQUENCE must be {SEQUENCE_LENGTH} bytes, not {len(value)}")
        session, sequence = _SEQUENCE.unpack(value)
        return cls(session, sequence)


def sequence_attribute(session: bytes, sequence: int) -> bytes:
    """The whole NETTESTER-SEQUENCE attribute (header and value; 16 bytes, no padding needed)."""
    return SEQUENCE_HEADER + _SEQUENCE.pack(session, sequence & _U32)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The value of NETTESTER-RECEIVED: what the server received of one session."""

    received: int  # requests of the session received since the server created its state
    first: int  # the sequence number that created that state
    highest: int
    window: int  # bit i: ``highest - 1 - i`` was received
    time_us: int  # when the answered request arrived, microseconds since the Unix epoch

    def encode(self) -> bytes:
        """The attribute value (28 bytes)."""
        return _RECEIVED.pack(self.received, self.first, self.highest, self.window, self.time_us)

    @classmethod
    def decode(cls, value: bytes) -> Receipt:
        """Parse and check the value on its own: its counts must be possible."""
        if len(value) != RECEIVED_LENGTH:
            raise AttributionError(f"NETTESTER-RECEIVED must be {RECEIVED_LENGTH} bytes, not {len(value)}")
        receipt = cls(*_RECEIVED.unpack(value))
        if receipt.first > receipt.highest:
            raise AttributionError(f"first sequence {receipt.first} above the highest {receipt.highest}")
        below_first = receipt.highest - receipt.first  # window bits at or past this index predate the state
        if below_first < WINDOW and receipt.window >> below_first:
            raise AttributionError("receptions claimed before the session's state began")
        if receipt.received < 1 + receipt.window.bit_count():
            raise AttributionError(
                f"{receipt.received} receptions cannot cover the {1 + receipt.window.bit_count()} it lists"
            )
        return receipt

    def reached(self, sequence: int) -> bool | None:
        """Whether transmission ``sequence`` reached the server; None when this receipt cannot tell."""
        if sequence == self.highest:
            return True
        if sequence < self.first or sequence > self.highest or self.highest - 1 - sequence >= WINDOW:
            return None
        return bool(self.window >> (self.highest - 1 - sequence) & 1)

    @property
    def time(self) -> float:
        """The receive time in seconds since the epoch."""
        return self.time_us / 1e6


def received_attribute(receipt: Receipt) -> bytes:
    """The whole NETTESTER-RECEIVED attribute (header and value; 32 bytes)."""
    return RECEIVED_HEADER + receipt.encode()


class SessionTable:
    """The server's per-session reception state, bounded: least recently used sessions go first.

    One entry is an 8-byte key and a 20-byte packed state in a plain dict
    (re-inserted on use, so its order is the LRU order).
    """

    def __init__(self, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.evicted = 0
        self._sessions: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def answer(self, session: bytes, sequence: int, now: float) -> bytes:
        """Note one received transmission; return the whole NETTESTER-RECEIVED attribute answering it.

        Plain integers and one packed state per session: this runs for every tester request.
        """
        sessions = self._sessions
        state = sessions.pop(session, None)
        if state is None:
            if len(sessions) >= self.max_sessions:
                del sessions[next(iter(sessions))]
                self.evicted += 1
            received, first, highest, window = 1, sequence, sequence, 0
        else:
            received, first, highest, window = _STATE.unpack(state)
            if received < _U32:
                received += 1
            if sequence > highest:
                shift = sequence - highest
                window = ((window << shift) | (1 << (shift - 1))) & _WINDOW_MASK if shift <= WINDOW else 0
                highest = sequence
            elif first <= sequence < highest and highest - 1 - sequence < WINDOW:
                window |= 1 << (highest - 1 - sequence)
            # else a duplicate of the highest, or older than the state or the window: counted only
        sessions[session] = _STATE.pack(received, first, highest, window)
        return _RECEIVED_ATTRIBUTE.pack(
            NETTESTER_RECEIVED, RECEIVED_LENGTH, received, first, highest, window, max(0, int(now * 1e6))
        )

    def record(self, tag: SequenceTag, now: float) -> Receipt:
        """``answer`` for a decoded tag, as a ``Receipt``."""
        return Receipt.decode(self.answer(tag.session, tag.sequence, now)[4:])
