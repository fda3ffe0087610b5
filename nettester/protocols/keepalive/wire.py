"""Sans-IO keep-alive protocol: line framing, messages, server and client state machines.

The wire format is the original tester's ASCII messages, one per line,
``\\n``-terminated, so TCP coalescing or splitting cannot break them and a
packet capture stays readable::

    Establish Session <client-id> <conn-id>
    Keep Alive <seq>              ->  Keep Alive Response <seq>
    Short message <hex>           ->  Short message reply <hex>   (32-byte dummy)
    Long message <hex>            ->  Long message reply <hex>    (128-byte dummy)

Nothing here reads a clock or touches a socket: bytes and ``now`` go in,
bytes to write come out of ``data_to_send()``, events out of ``next_event()``
and the next deadline out of ``get_timer()`` (``interfaces.StreamCore``, the
stream twin of the datagram cores' contract). The Twisted adapters live in
``server.py`` and ``client.py``.

Every malformed input raises :exc:`WireError` from the parser; the state machines
turn it into a :class:`ProtocolError` event and stop, so arbitrary bytes never raise
out of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The longest valid line is "Long message reply " plus 256 hex digits; a peer
# that sends more than this without a newline is broken or hostile.
MAX_LINE_LENGTH = 320
SHORT_DUMMY_SIZE = 32
LONG_DUMMY_SIZE = 128
MAX_ID_LENGTH = 64
MAX_SEQ_DIGITS = 20

ESTABLISH = b"Establish Session "
KEEP_ALIVE = b"Keep Alive "
KEEP_ALIVE_RESPONSE = b"Keep Alive Response "
SHORT = b"Short message "
SHORT_REPLY = b"Short message reply "
LONG = b"Long message "
LONG_REPLY = b"Long message reply "

_ID = re.compile(rb"[A-Za-z0-9._:-]{1,%d}\Z" % MAX_ID_LENGTH)
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2}){1,%d}\Z" % LONG_DUMMY_SIZE)


class WireError(ValueError):
    """A line (or a run of bytes without a newline) that is not a valid message."""


# ---------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class EstablishSession:
    """First line a client sends: who it is and which connection this is."""

    client_id: str
    conn_id: str

    def encode(self) -> bytes:
        return b"%s%s %s\n" % (ESTABLISH, self.client_id.encode("ascii"), self.conn_id.encode("ascii"))


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Client request; the server must answer with the same sequence number."""

    seq: int

    def encode(self) -> bytes:
        return b"%s%d\n" % (KEEP_ALIVE, self.seq)


@dataclass(frozen=True, slots=True)
class KeepAliveResponse:
    """Server answer to :class:`KeepAlive`."""

    seq: int

    def encode(self) -> bytes:
        return b"%s%d\n" % (KEEP_ALIVE_RESPONSE, self.seq)


@dataclass(frozen=True, slots=True)
class Dummy:
    """Dummy data (``short`` or ``long``), or the server's echo of it (``reply``)."""

    kind: str
    payload: bytes
    reply: bool = False

    def encode(self) -> bytes:
        return _DUMMY_PREFIXES[self.reply, self.kind] + self.payload.hex().encode("ascii") + b"\n"


_DUMMY_PREFIXES = {
    (False, "short"): SHORT, (True, "short"): SHORT_REPLY, (False, "long"): LONG, (True, "long"): LONG_REPLY,
}


Message = EstablishSession | KeepAlive | KeepAliveResponse | Dummy


def _seq(text: bytes) -> int:
    if not (0 < len(text) <= MAX_SEQ_DIGITS and text.isdigit()):
        raise WireError("sequence number is not a decimal number")
    return int(text)


def _payload(text: bytes) -> bytes:
    if _HEX.match(text) is None:
        raise WireError(f"dummy payload is not 1-{LONG_DUMMY_SIZE} bytes of hex")
    return bytes.fromhex(text.decode("ascii"))


def parse_line(line: bytes) -> Message:
    """Parse one line (without its ``\\n``; a trailing ``\\r`` is tolerated).

    :raises WireError: for anything that is not exactly one known message.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    # Longest prefixes first: "Keep Alive Response" also starts with "Keep Alive ".
    if line.startswith(KEEP_ALIVE_RESPONSE):
        return KeepAliveResponse(_seq(line[len(KEEP_ALIVE_RESPONSE) :]))
    if line.startswith(KEEP_ALIVE):
        return KeepAlive(_seq(line[len(KEEP_ALIVE) :]))
    if line.startswith(SHORT_REPLY):
        return Dummy("short", _payload(line[len(SHORT_REPLY) :]), reply=True)
    if line.startswith(LONG_REPLY):
        return Dummy("long", _payload(line[len(LONG_REPLY) :]), reply=True)
    if line.startswith(SHORT):
        return Dummy("short", _payload(line[len(SHORT) :]))
    if line.startswith(LONG):
        return Dummy("long", _payload(line[len(LONG) :]))
    if line.startswith(ESTABLISH):
        fields = line[len(ESTABLISH) :].split(b" ")
        if len(fields) != 2 or not all(_ID.match(field) for field in fields):
            raise WireError(f"Establish Session needs <client-id> <conn-id> (1-{MAX_ID_LENGTH} of [A-Za-z0-9._:-])")
        return EstablishSession(fields[0].decode("ascii"), fields[1].decode("ascii"))
    raise WireError("unknown message")


class LineFramer:
    """Splits a byte stream into lines; refuses lines longer than ``max_line``."""

    __slots__ = ("_partial", "_max_line")

    def __init__(self, max_line: int = MAX_LINE_LENGTH) -> None:
        self._partial = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines ``data`` finishes, without their ``\\n``.

        :raises WireError: when a line (complete or not) exceeds the limit.
        """
        buffered = self._partial + data if self._partial else data
        *lines, self._partial = buffered.split(b"\n")
        if len(self._partial) > self._max_line or any(len(line) > self._max_line for line in lines):
            raise WireError(f"line longer than {self._max_line} bytes")
        return lines


def _excerpt(line: bytes) -> str:
    """A short printable rendering of a bad line for the log."""
    return repr(line[:48])[2:-1] + ("..." if len(line) > 48 else "")


# ------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    """The client named itself and its connection (server side)."""

    client_id: str
    conn_id: str


@dataclass(frozen=True, slots=True)
class KeepAliveReceived:
    """A keep-alive request was answered (server side)."""

    seq: int


@dataclass(frozen=True, slots=True)
class DummyReceived:
    """A dummy message was echoed (server side) or its echo arrived (client side)."""

    kind: str


@dataclass(frozen=True, slots=True)
class KeepAliveMissing:
    """No keep-alive within the timeout; the server closes the connection."""

    idle: float


@dataclass(frozen=True, slots=True)
class KeepAliveAnswered:
    """The server answered keep-alive ``seq`` after ``rtt`` seconds (client side)."""

    seq: int
    rtt: float


@dataclass(frozen=True, slots=True)
class ResponseMissing:
    """Keep-alive ``seq`` got no answer within the response timeout (client side)."""

    seq: int
    waited: float


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer sent something invalid; the connection must be closed."""

    reason: str
    excerpt: str


Event = (
    SessionEstablished | KeepAliveReceived | DummyReceived | KeepAliveMissing | KeepAliveAnswered | ResponseMissing
    | ProtocolError
)


# ---------------------------------------------------------- state machines


class LineConnection:
    """What both ends' state machines share: the framer, the bytes to write, the events.

    It is an ``interfaces.StreamCore`` (h11's shape): bytes and ``now`` go in
    through :meth:`receive_data` and ``handle_timer``, bytes come out of
    :meth:`data_to_send` and events out of :meth:`next_event`. Subclasses
    handle one complete line in :meth:`_handle_line`. After a terminal event
    it ignores all input: the adapter closes.
    """

    __slots__ = ("_framer", "_outgoing", "_events", "finished")

    def __init__(self, outgoing: bytes = b"") -> None:
        self._framer = LineFramer()
        self._outgoing = outgoing
        self._events: list[Event] = []
        self.finished = False

    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes read from the connection; their events come out of :meth:`next_event`."""
        if self.finished:
            return
        try:
            lines = self._framer.feed(data)
        except WireError as error:
            self._events.append(self._fail(str(error), data))
            return
        for line in lines:
            self._events.append(self._handle_line(line, now))
            if self.finished:
                break

    def _handle_line(self, line: bytes, now: float) -> Event:
        raise NotImplementedError

    def _fail(self, reason: str, line: bytes) -> ProtocolError:
        self.finished = True
        return ProtocolError(reason, _excerpt(line))

    def data_to_send(self) -> bytes:
        """Bytes to write now, emptied by the call."""
        data, self._outgoing = self._outgoing, b""
        return data

    def next_event(self) -> Event | None:
        """The oldest event not handed out yet, or None."""
        return self._events.pop(0) if self._events else None


class ServerConnection(LineConnection):
    """One accepted connection, server side.

    Answers keep-alives and dummies, and reports :class:`KeepAliveMissing` when no
    ``Establish Session`` / ``Keep Alive`` arrived for ``keepalive_timeout``
    seconds.
    """

    __slots__ = ("_timeout", "_deadline", "_last_seen", "client_id", "conn_id")

    def __init__(self, keepalive_timeout: float, now: float) -> None:
        super().__init__()
        self._timeout = keepalive_timeout
        self._last_seen = now
        self._deadline: float | None = now + keepalive_timeout
        self.client_id: str | None = None
        self.conn_id: str | None = None

    def _handle_line(self, line: bytes, now: float) -> Event:
        try:
            message = parse_line(line)
        except WireError as error:
            return self._fail(str(error), line)
        if isinstance(message, KeepAlive):
            if self.conn_id is None:
                return self._fail("Keep Alive before Establish Session", message.encode())
            self._alive(now)
            self._outgoing += KeepAliveResponse(message.seq).encode()
            return KeepAliveReceived(message.seq)
        if isinstance(message, EstablishSession):
            if self.conn_id is not None:
                return self._fail("second Establish Session on one connection", message.encode())
            self.client_id, self.conn_id = message.client_id, message.conn_id
            self._alive(now)
            return SessionEstablished(message.client_id, message.conn_id)
        if isinstance(message, Dummy) and not message.reply:
            self._outgoing += Dummy(message.kind, message.payload, reply=True).encode()
            return DummyReceived(message.kind)
        return self._fail("a client never sends responses", message.encode())

    def _alive(self, now: float) -> None:
        self._last_seen = now
        self._deadline = now + self._timeout

    def _fail(self, reason: str, line: bytes) -> ProtocolError:
        self._deadline = None
        return super()._fail(reason, line)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next, or None."""
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Check the keep-alive deadline."""
        if self._deadline is None or now < self._deadline:
            return
        self.finished = True
        self._deadline = None
        self._events.append(KeepAliveMissing(now - self._last_seen))


@dataclass(frozen=True, slots=True)
class ClientTiming:
    """Settings shared by every connection of a client fleet."""

    keepalive_interval: float
    response_timeout: float
    dummy_interval: float
    short_payload: bytes = bytes(SHORT_DUMMY_SIZE)
    long_payload: bytes = bytes(LONG_DUMMY_SIZE)


class ClientPlan:
    """A fleet's timing plus its dummy lines, encoded once and shared by every connection."""

    __slots__ = ("timing", "dummy_requests", "dummy_replies")

    def __init__(self, timing: ClientTiming) -> None:
        self.timing = timing
        dummies = (("short", timing.short_payload), ("long", timing.long_payload))
        self.dummy_requests = b"".join(Dummy(kind, payload).encode() for kind, payload in dummies)
        # Expected reply line (without its newline) -> kind: one dict lookup per reply.
        self.dummy_replies = {Dummy(kind, payload, reply=True).encode()[:-1]: kind for kind, payload in dummies}


def _next_tick(previous: float, interval: float, now: float) -> float:
    """The next send time on a fixed grid, so a late timer does not stretch the interval;
    after a stall longer than one interval, restart the grid from ``now``."""
    following = previous + interval
    return following if following > now else now + interval


class ClientConnection(LineConnection):
    """One client connection: establish, keep-alives, dummies, response timeout.

    Keep-alive ``seq`` counts from 1 every ``keepalive_interval``; the server
    answers in order (TCP is ordered), so a response must carry the oldest
    outstanding seq. When that one is older than ``response_timeout``,
    :class:`ResponseMissing` is the event and the connection is finished.
    """

    __slots__ = ("_plan", "_next_keepalive", "_next_dummy", "_seq", "_pending", "_dummies")

    def __init__(self, plan: ClientPlan, client_id: str, conn_id: str, now: float) -> None:
        super().__init__(EstablishSession(client_id, conn_id).encode())
        timing = plan.timing
        self._plan = plan
        self._next_keepalive = now + timing.keepalive_interval
        self._next_dummy = now + timing.dummy_interval if timing.dummy_interval > 0 else None
        self._seq = 0
        self._pending: list[tuple[int, float]] = []
        self._dummies: list[str] = []

    def _handle_line(self, line: bytes, now: float) -> Event:
        kind = self._plan.dummy_replies.get(line)
        if kind is not None:
            if not self._dummies or self._dummies[0] != kind:
                return self._fail("unexpected dummy reply", line)
            del self._dummies[0]
            return DummyReceived(kind)
        try:
            message = parse_line(line)
        except WireError as error:
            return self._fail(str(error), line)
        if not isinstance(message, KeepAliveResponse):
            return self._fail("not a response the client expects", line)
        if not self._pending or self._pending[0][0] != message.seq:
            return self._fail("Keep Alive Response for a seq not outstanding", line)
        seq, sent = self._pending.pop(0)
        return KeepAliveAnswered(seq, now - sent)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next, or None once finished."""
        if self.finished:
            return None
        deadline = self._next_keepalive
        if self._next_dummy is not None and self._next_dummy < deadline:
            deadline = self._next_dummy
        if self._pending:
            expiry = self._pending[0][1] + self._plan.timing.response_timeout
            if expiry < deadline:
                deadline = expiry
        return deadline

    def handle_timer(self, now: float) -> None:
        """Send what is due; report the oldest keep-alive if it went unanswered."""
        if self.finished:
            return
        timing = self._plan.timing
        if self._pending and now >= self._pending[0][1] + timing.response_timeout:
            self.finished = True
            seq, sent = self._pending[0]
            self._events.append(ResponseMissing(seq, now - sent))
            return
        if now >= self._next_keepalive:
            self._seq += 1
            self._pending.append((self._seq, now))
            self._outgoing += KeepAlive(self._seq).encode()
            self._next_keepalive = _next_tick(self._next_keepalive, timing.keepalive_interval, now)
        if self._next_dummy is not None and now >= self._next_dummy:
            self._outgoing += self._plan.dummy_requests
            self._dummies += ("short", "long")
            self._next_dummy = _next_tick(self._next_dummy, timing.dummy_interval, now)
