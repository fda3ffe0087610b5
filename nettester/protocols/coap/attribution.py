"""In-band loss attribution for CoAP: which direction lost a request (sans-IO).

When both ends are nettester, ``coap-bench`` tags every request with an
elective option carrying its tester session id and a sequence number, and
the extended server answers with what it has received of that session
(STAMP, RFC 8762, splits loss by direction the same way). A request that
failed but reached the server lost its response on the way back; one that
did not reach it was lost on the way out. Other servers ignore the option
(RFC 7252 section 5.4.1: unrecognised elective options are ignored), so
their losses stay unattributed.

Code points, from the experimental range 65000-65535 (RFC 7252 section
12.2). Both are elective (even), safe-to-forward and NoCacheKey (bits 2-4
set, section 5.4.6), so proxies pass them and caches ignore them:

- ``65020`` Attribution-Tag, in requests, 12 bytes: session id (8 bytes),
  sequence number of the exchange (4 bytes, big-endian, starting at 1).
- ``65052`` Attribution-Report, in responses, 16 bytes: requests of the
  session received (4 bytes), highest sequence number seen (4 bytes), and a
  64-bit window (8 bytes): bit ``i`` set when sequence ``highest - i``
  arrived.

Retransmissions of a CON keep their message and so their tag: the server's
deduplication answers them from its cache, and a tag counts once.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nettester.protocols.coap.message import Message
from nettester.report.model import FORWARD, RETURN, UNATTRIBUTED

TAG_OPTION = 65020
REPORT_OPTION = 65052
SESSION_BYTES = 8
WINDOW = 64
DEFAULT_MAX_SESSIONS = 100_000

_TAG = struct.Struct("!8sI")
_REPORT = struct.Struct("!IIQ")
_WINDOW_MASK = (1 << WINDOW) - 1
_SEQUENCE_LIMIT = 1 << 32


@dataclass(frozen=True, slots=True)
class Report:
    """What the server had received of a session when it answered."""

    received: int
    highest: int
    window: int

    def reached(self, sequence: int) -> bool | None:
        """Whether ``sequence`` reached the server; None when the window cannot tell."""
        behind = self.highest - sequence
        if not 0 <= behind < WINDOW:
            return None
        return bool(self.window >> behind & 1)

    def encode(self) -> bytes:
        return _REPORT.pack(self.received, self.highest, self.window)


def encode_tag(session: bytes, sequence: int) -> bytes:
    """The Attribution-Tag option value."""
    return _TAG.pack(session, sequence)


def decode_tag(value: bytes) -> tuple[bytes, int] | None:
    """``(session, sequence)``, or None when ``value`` is not a tag."""
    if len(value) != _TAG.size:
        return None
    session, sequence = _TAG.unpack(value)
    return (session, sequence) if sequence else None


def decode_report(value: bytes) -> Report | None:
    """The report, or None when ``value`` is not one."""
    if len(value) != _REPORT.size:
        return None
    return Report(*_REPORT.unpack(value))


class SessionTable:
    """Server side: per tester session, what arrived; a bounded LRU.

    Each session costs one OrderedDict entry holding its 8-byte id and a
    3-item list (count, highest, window): about 300 bytes (measured in the
    tests); past ``max_sessions`` the least recently heard one goes (counted).
    """

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[bytes, list[int]] = OrderedDict()
        self.evicted = 0
        self.invalid = 0

    def record(self, value: bytes) -> Report | None:
        """Count the request tagged ``value``; the report to answer with (None: a malformed tag, counted)."""
        tag = decode_tag(value)
        if tag is None:
            self.invalid += 1
            return None
        session, sequence = tag
        state = self.sessions.get(session)
        if state is None:
            if len(self.sessions) >= self.max_sessions:
                self.sessions.popitem(last=False)
                self.evicted += 1
            state = self.sessions[session] = [0, 0, 0]
        else:
            self.sessions.move_to_end(session)
        received, highest, window = state
        if sequence > highest:
            window = (window << (sequence - highest) | 1) & _WINDOW_MASK
            highest = sequence
            received += 1
        elif highest - sequence < WINDOW:
            bit = 1 << (highest - sequence)
            if not window & bit:
                window |= bit
                received += 1
        else:
            received += 1  # older than the window: counted, its bit is gone
        state[:] = received, highest, window
        return Report(received, highest, window)

    def annotate(self, request: Message, answer: Any) -> Any:
        """``answer`` (a Message, a Deferred of one, or None) with the report when ``request`` is tagged."""
        options = request.options
        # Decoded options come in wire order (RFC 7252 section 3.1): an untagged request costs one comparison.
        if not options or options[-1][0] < TAG_OPTION or answer is None:
            return answer
        value = request.option(TAG_OPTION)
        if value is None:
            return answer
        report = self.record(value)
        if report is None:
            return answer
        encoded = report.encode()

        def tagged(message: Message) -> Message:
            # A copy: resources may hand out cached answers (the benchmark does). Built field by field:
            # dataclasses.replace costs several microseconds per call, on every tagged request.
            return Message(message.mtype, message.code, message.mid, message.token,
                           [*message.options, (REPORT_OPTION, encoded)], message.payload)

        if isinstance(answer, Message):
            return tagged(answer)
        return answer.addCallback(lambda message: tagged(message) if isinstance(message, Message) else message)


def attach(site: Any, table: SessionTable | None = None) -> SessionTable:
    """Make ``site`` (a resources Site) answer tagged requests with reports; its table."""
    table = table or SessionTable()
    handle: Callable[[Any, Any], Any] = site.handle_request

    def handle_request(incoming: Any, endpoint: Any) -> Any:
        return table.annotate(incoming.request, handle(incoming, endpoint))

    site.handle_request = handle_request
    return table


class Attributor:
    """Client side, one per tester session: tags requests, attributes its failed ones.

    ``failed`` exchanges wait for the next report; ``answered`` resolves
    those the report can tell, and every one when the server sends no
    report (a third-party server: unattributed). A report that claims more
    than was sent is counted in ``invalid`` and not trusted.
    """

    def __init__(self, session: bytes) -> None:
        if len(session) != SESSION_BYTES:
            raise ValueError(f"a session id is {SESSION_BYTES} bytes")
        self.session = session
        self.sequence = 0
        self.pending: dict[int, Any] = {}
        self.invalid = 0
        self.reports = 0

    def next_tag(self) -> tuple[int, bytes]:
        """The next exchange's sequence number and option value."""
        self.sequence = self.sequence + 1 if self.sequence + 1 < _SEQUENCE_LIMIT else 1
        return self.sequence, encode_tag(self.session, self.sequence)

    def failed(self, sequence: int, what: Any) -> None:
        """Exchange ``sequence`` ended without a response; ``what`` comes back when it resolves."""
        self.pending[sequence] = what

    def answered(self, value: bytes | None) -> list[tuple[Any, str]]:
        """A response carried report ``value`` (None: none); the ``(what, direction)`` it resolves."""
        report = decode_report(value) if value is not None else None
        if value is not None and (report is None or report.highest > self.sequence
                                  or report.received > self.sequence):
            self.invalid += 1
            report = None
        if report is not None:
            self.reports += 1
        resolved = []
        for sequence in list(self.pending):
            reached = report.reached(sequence) if report is not None else None
            if reached is None and report is not None and sequence > report.highest:
                continue  # sent after what the report covers: a later report tells
            direction = UNATTRIBUTED if reached is None else RETURN if reached else FORWARD
            resolved.append((self.pending.pop(sequence), direction))
        return resolved

    def open(self) -> list[Any]:
        """The failed exchanges still unresolved (at stop: unattributed); forgets them."""
        left = list(self.pending.values())
        self.pending.clear()
        return left
