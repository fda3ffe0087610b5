"""The tester's client fleet: thousands of Binding-request loops on one timer wheel, sans-IO.

Behaviour of the original tool, per client: its own socket, a random start
delay, one Binding request per interval with a fresh transaction id; a
missing answer is re-sent at once with the SAME transaction id (so every
copy matches Wireshark's ``frame contains``); after N consecutive misses the
client reopens its socket (new port, new NAT mapping) with a new transaction
id; a healthy client also reopens every 120 s plus 1-60 s. ``rfc_retransmit``
switches to RFC 8489 section 6.2.1 timing instead.

Every request carries NETTESTER-SEQUENCE (see
``nettester.protocols.stun.attribution``); a nettester server's
NETTESTER-RECEIVED tells, once a later response arrives, which transmissions
of a loss episode reached it: their responses were lost on the way back, the
others on the way out (``LossResolved``).

The core contract is aioquic's: the adapter calls ``receive_datagram(data,
client, now)`` and ``handle_timer(now)``, sends ``datagrams_to_send()``
(``(data, client)`` pairs), re-arms one timer at ``get_timer()`` and pops
``next_event()``: socket actions (``OpenSocket``, handled before the
datagrams) and findings to log.
"""

from __future__ import annotations

import math
import random
import struct
from collections import deque
from dataclasses import dataclass

from nettester.histogram import RttHistogram
from nettester.protocols.stun.attribution import (
    NETTESTER_RECEIVED,
    AttributionError,
    Receipt,
    sequence_attribute,
)
from nettester.protocols.stun.counters import FleetCounters
from nettester.protocols.stun.message import (
    MAGIC_COOKIE,
    TRANSACTION_ID_LENGTH,
    Address,
    AttributeType,
    ErrorCode,
    MessageClass,
    Method,
    StunDecodeError,
    decode,
)
from nettester.protocols.stun.timerwheel import TimerWheel

_REQUEST_HEADER = struct.Struct("!HHI").pack(0x0001, 0, MAGIC_COOKIE)  # Binding request, no attributes
_TAGGED_REQUEST_HEADER = struct.Struct("!HHI").pack(0x0001, 16, MAGIC_COOKIE)  # with NETTESTER-SEQUENCE
_CLIENT_NUMBER = struct.Struct("!I")

# RFC 8489 section 6.2.1: RTO 500 ms doubling, Rc = 7 sends, last wait Rm x RTO with Rm = 16.
RFC_RTO = 0.5
RFC_RC = 7
RFC_RM = 16

# Loss episodes a client keeps waiting for a receipt; past this the oldest is given up as unattributed.
MAX_OPEN_EPISODES = 8

FORWARD = "forward"
RETURN = "return"
UNATTRIBUTED = "unattributed"

NOT_NETTESTER = "the server does not report what it received (not nettester's stun-server?)"
NOT_COVERED = "the server's record of this session does not cover it (restarted, evicted, or too long ago)"
AT_STOP = "still unresolved at stop"
TOO_MANY = f"more than {MAX_OPEN_EPISODES} loss episodes waiting for an answer"


def binding_request(transaction_id: bytes) -> bytes:
    """A Binding request without attributes: 20 bytes (RFC 8489 section 5)."""
    return _REQUEST_HEADER + transaction_id


def tagged_binding_request(transaction_id: bytes, session: bytes, sequence: int) -> bytes:
    """A Binding request carrying NETTESTER-SEQUENCE: 36 bytes."""
    return _TAGGED_REQUEST_HEADER + transaction_id + sequence_attribute(session, sequence)


# --- events -----------------------------------------------------------------


class FleetEvent:
    """Base class of everything the fleet asks its adapter to do or log."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class OpenSocket(FleetEvent):
    """Close the client's socket if it has one, open a new one (new local port)."""

    client: int
    reason: str  # "start", "failures", "periodic"


@dataclass(frozen=True, slots=True)
class RequestUnanswered(FleetEvent):
    """No answer within the wait; ``consecutive`` misses so far on this transaction id."""

    client: int
    transaction_id: bytes
    mapped: Address | None
    consecutive: int
    sent: int  # transmissions of this transaction id so far


@dataclass(frozen=True, slots=True)
class ConsecutiveFailures(FleetEvent):
    """``count`` consecutive misses: the client gives up this socket."""

    client: int
    transaction_id: bytes
    mapped: Address | None
    count: int


@dataclass(frozen=True, slots=True)
class UnexpectedResponse(FleetEvent):
    """A response whose transaction id matches no outstanding request."""

    client: int
    transaction_id: bytes


@dataclass(frozen=True, slots=True)
class MappingChanged(FleetEvent):
    """The same socket saw its mapped address change (NAT rebinding)."""

    client: int
    old: Address
    new: Address


@dataclass(frozen=True, slots=True)
class ErrorResponse(FleetEvent):
    """The server answered with an error response."""

    client: int
    transaction_id: bytes
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class LossResolved(FleetEvent):
    """A loss episode (a transaction id with unanswered transmissions) is over: where were they lost?

    ``sent`` transmissions, of which ``reached`` arrived at the server (None:
    unknown, see ``reason``) and ``answered`` (0 or 1) had its response arrive.
    """

    client: int
    transaction_id: bytes
    start: float
    end: float
    sent: int
    reached: int | None
    answered: int
    mapped: Address | None
    reason: str = ""

    @property
    def lost_return(self) -> int:
        """Transmissions that reached the server whose response never arrived."""
        return 0 if self.reached is None else self.reached - self.answered

    @property
    def lost_forward(self) -> int:
        """Transmissions that never reached the server."""
        return 0 if self.reached is None else self.sent - self.reached

    @property
    def directions(self) -> tuple[str, ...]:
        """Where its losses happened: one direction, both (a mixed episode), or unattributed."""
        if self.reached is None:
            return (UNATTRIBUTED,)
        return tuple(d for d, n in ((FORWARD, self.lost_forward), (RETURN, self.lost_return)) if n)


@dataclass(frozen=True, slots=True)
class AttributionInvalid(FleetEvent):
    """A NETTESTER-RECEIVED attribute that was malformed or impossible: ignored."""

    client: int
    transaction_id: bytes
    reason: str


Event = (
    OpenSocket
    | RequestUnanswered
    | ConsecutiveFailures
    | UnexpectedResponse
    | MappingChanged
    | ErrorResponse
    | LossResolved
    | AttributionInvalid
)


# --- the fleet ---------------------------------------------------------------------


def loss_percent(timeouts: int, responses: int, error_responses: int) -> float:
    """Waits that ended without an answer (``timeouts``), as a share of all waits that ended."""
    ended = responses + error_responses + timeouts
    return 100.0 * timeouts / ended if ended else 0.0


class _Episode:
    """One transaction id that had unanswered transmissions, until its direction is known."""

    __slots__ = ("transaction_id", "first", "last", "start", "mapped", "answered")

    def __init__(self, transaction_id: bytes, first: int, last: int, start: float, mapped: Address | None) -> None:
        self.transaction_id = transaction_id
        self.first = first  # sequence numbers of its transmissions: first..last (one client sends one at a time)
        self.last = last
        self.start = start
        self.mapped = mapped
        self.answered = 0


class _Client:
    """One tester client's state (the wheel holds its next deadline)."""

    __slots__ = (
        "transaction_id",
        "sent_at",
        "attempt",
        "period_start",
        "failures",
        "mapped",
        "mapped_here",
        "reopen_at",
        "started",
        "sequence",
        "first_sequence",
        "episode",
        "waiting",
        "state_first",
    )

    def __init__(self) -> None:
        self.transaction_id: bytes | None = None  # outstanding request, None when answered
        self.sent_at = 0.0
        self.attempt = 0  # sends of the outstanding transaction id
        self.period_start = 0.0  # when the current interval began
        self.failures = 0
        self.mapped: Address | None = None  # of the last success, on whichever socket (the original's log field)
        self.mapped_here = False  # whether the current socket has had a success (rebinding detection)
        self.reopen_at = 0.0
        self.started = False
        self.sequence = 0  # of the last transmission, across sockets
        self.first_sequence = 0  # of the outstanding transaction's first transmission
        self.episode: _Episode | None = None  # the outstanding transaction, once it missed an answer
        self.waiting: list[_Episode] | None = None  # ended episodes waiting for a receipt
        self.state_first = 0  # ``first`` of the server's state of this session as receipts tell it; 0: none yet


@dataclass(frozen=True)
class FleetConfig:
    """What the tester's options decide."""

    clients: int
    interval: float = 10.0
    start_delay: tuple[float, float] = (1.0, 10.0)
    max_failures: int = 5
    reopen_after: float = 120.0
    reopen_jitter: tuple[float, float] = (1.0, 60.0)
    rfc_retransmit: bool = False
    resolution: float = 0.01
    attribution: bool = True  # NETTESTER-SEQUENCE in every request


class ClientFleet:
    """All clients of one tester process (socket keys: client numbers 0 .. clients-1)."""

    def __init__(self, config: FleetConfig, counters: FleetCounters, now: float, rng: random.Random) -> None:
        self.config = config
        self.counters = counters
        self.rtt = RttHistogram()  # mergeable across --processes (nettester.histogram)
        # How late clients ran compared with their schedule: the tester's own health. Large values mean
        # the process is overloaded and its sends, hence its loss figures, are late too.
        self.timer_lag = RttHistogram()  # mergeable too
        self._rng = rng
        self._clients = [_Client() for _ in range(config.clients)]
        self._wheel = TimerWheel(config.clients, now, config.resolution)
        self._events: deque[Event] = deque()
        self._datagrams: list[tuple[bytes, int]] = []
        self._now = now  # of the call running: sends are stamped with it, not their due time
        # Session id = 4 random bytes for this run + the client number: stable across a client's sockets.
        self._run = rng.randbytes(4)
        low, high = config.start_delay
        for index in range(config.clients):
            self._wheel.schedule(index, now + rng.uniform(low, high))

    @property
    def started(self) -> int:
        """Clients that have opened their socket."""
        return sum(1 for client in self._clients if client.started)

    def session_id(self, index: int) -> bytes:
        """Client ``index``'s tester session id (NETTESTER-SEQUENCE)."""
        return self._run + _CLIENT_NUMBER.pack(index)

    def mapped_address(self, index: int) -> Address | None:
        """The mapped address of client ``index``'s last success, if any."""
        return self._clients[index].mapped

    # --- the core contract ---------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[tuple[bytes, int]]:
        """``(data, client)`` pairs to send, each on that client's socket (after the OpenSocket events)."""
        datagrams, self._datagrams = self._datagrams, []
        return datagrams

    def get_timer(self) -> float | None:
        """When ``handle_timer`` next has work (None: never)."""
        return self._wheel.next_deadline()

    def handle_timer(self, now: float) -> None:
        """Run every client whose deadline has passed."""
        self._now = now
        for index, due in self._wheel.expire(now):
            self.timer_lag.record(now - due)
            self._fire(index, self._clients[index], due, now)

    def receive_datagram(self, data: bytes, client: int, now: float) -> None:
        """A datagram arrived on client ``client``'s socket."""
        counters = self.counters
        self._now = now
        try:
            message = decode(data)
        except StunDecodeError:
            counters.malformed.value += 1
            return
        if message.method != Method.BINDING or message.message_class not in (MessageClass.SUCCESS, MessageClass.ERROR):
            counters.malformed.value += 1
            return
        index = client
        state = self._clients[index]
        if message.transaction_id != state.transaction_id:
            counters.unexpected.value += 1
            self._events.append(UnexpectedResponse(index, message.transaction_id))
            return
        error: ErrorCode | None = None
        mapped: Address | None = None
        try:
            if message.message_class == MessageClass.ERROR:
                error = message.get(AttributeType.ERROR_CODE)
            else:
                mapped = message.get(AttributeType.XOR_MAPPED_ADDRESS) or message.get(AttributeType.MAPPED_ADDRESS)
        except StunDecodeError:
            counters.malformed.value += 1
            return
        state.transaction_id = None
        state.failures = 0
        if self.config.rfc_retransmit:
            self._wheel.schedule(index, self._next_period(state, now))
        episode = state.episode
        if episode is not None:
            episode.answered = 1
            if mapped is not None:
                episode.mapped = mapped  # the address the server saw this transaction come from
            self._end_episode(index, state)
        if message.message_class == MessageClass.ERROR:
            counters.error_responses.value += 1
            code, reason = error if error is not None else (0, "")
            self._events.append(ErrorResponse(index, message.transaction_id, code, reason))
            return
        counters.responses.value += 1
        self.rtt.record(now - state.sent_at)
        receipt = message.find(NETTESTER_RECEIVED)
        if receipt is not None or state.waiting:
            self._attribute(index, state, message.transaction_id, None if receipt is None else receipt.value)
        if mapped is not None:
            if state.mapped_here and mapped != state.mapped:
                assert state.mapped is not None
                counters.mapping_changes.value += 1
                self._events.append(MappingChanged(index, state.mapped, mapped))
            state.mapped = mapped
            state.mapped_here = True

    def close(self, now: float) -> int:
        """The run stops: every episode still waiting is over, unattributed. Returns how many."""
        ended = 0
        for index, client in enumerate(self._clients):
            if client.episode is not None:
                self._end_episode(index, client)
            for episode in client.waiting or ():
                self._resolve(index, episode, now, None, AT_STOP)
                ended += 1
            client.waiting = None
        return ended

    # --- the original tool's loop ----------------------------------------------------

    def _fire(self, index: int, client: _Client, due: float, now: float) -> None:
        if not client.started:
            client.started = True
            self._open(index, client, "start", now)
            self._new_transaction(index, client, due)
        elif client.transaction_id is None:
            if now >= client.reopen_at:
                self._open(index, client, "periodic", now)
            self._new_transaction(index, client, due)
        elif self.config.rfc_retransmit and client.attempt < RFC_RC:
            self._send(index, client)
            self._wheel.schedule(index, due + self._rfc_wait(client.attempt))
        else:
            self._missed(index, client, due)

    def _missed(self, index: int, client: _Client, due: float) -> None:
        """The wait ended without an answer (the interval, or RFC 8489's whole transaction)."""
        assert client.transaction_id is not None
        counters = self.counters
        counters.timeouts.value += 1
        client.failures += 1
        if client.episode is None:
            client.episode = _Episode(
                client.transaction_id, client.first_sequence, client.sequence, self._now, client.mapped
            )
        self._events.append(
            RequestUnanswered(index, client.transaction_id, client.mapped, client.failures, client.attempt)
        )
        if client.failures >= self.config.max_failures:
            counters.failures.value += 1
            self._events.append(ConsecutiveFailures(index, client.transaction_id, client.mapped, client.failures))
            self._end_episode(index, client)
            self._open(index, client, "failures", due)
            self._new_transaction(index, client, due)
        elif self.config.rfc_retransmit:
            # A failed RFC transaction is over; the next one starts at the next interval.
            client.transaction_id = None
            self._end_episode(index, client)
            self._wheel.schedule(index, self._next_period(client, due))
        else:
            # The original tool: re-send at once with the SAME transaction id.
            client.period_start = due
            self._send(index, client)
            self._wheel.schedule(index, due + self.config.interval)

    def _open(self, index: int, client: _Client, reason: str, now: float) -> None:
        if reason != "start":
            self.counters.reopens.value += 1
        client.mapped_here = False  # a new socket gets a new mapping: not a rebinding
        client.failures = 0
        low, high = self.config.reopen_jitter
        client.reopen_at = now + self.config.reopen_after + self._rng.uniform(low, high)
        self._events.append(OpenSocket(index, reason))

    def _new_transaction(self, index: int, client: _Client, due: float) -> None:
        client.transaction_id = self._rng.randbytes(TRANSACTION_ID_LENGTH)
        client.attempt = 0
        client.period_start = due
        self._send(index, client)
        wait = self._rfc_wait(1) if self.config.rfc_retransmit else self.config.interval
        self._wheel.schedule(index, due + wait)

    def _next_period(self, client: _Client, after: float) -> float:
        """The first interval boundary of this client strictly after ``after``."""
        interval = self.config.interval
        return client.period_start + (math.floor((after - client.period_start) / interval) + 1) * interval

    @staticmethod
    def _rfc_wait(sends: int) -> float:
        """RFC 8489 section 6.2.1: RTO doubles after each send; after the last, Rm x RTO."""
        return RFC_RM * RFC_RTO if sends >= RFC_RC else RFC_RTO * 2 ** (sends - 1)

    def _send(self, index: int, client: _Client) -> None:
        transaction_id = client.transaction_id
        assert transaction_id is not None
        client.sequence += 1
        if not client.attempt:
            client.first_sequence = client.sequence
        client.attempt += 1
        client.sent_at = self._now
        if client.episode is not None:
            client.episode.last = client.sequence
        self.counters.requests.value += 1
        if self.config.attribution:
            data = tagged_binding_request(transaction_id, self.session_id(index), client.sequence)
        else:
            data = binding_request(transaction_id)
        self._datagrams.append((data, index))

    # --- loss attribution ----------------------------------------------------------------

    def _end_episode(self, index: int, client: _Client) -> None:
        """The transaction of the current episode is over: it waits for a receipt covering it."""
        episode = client.episode
        assert episode is not None
        client.episode = None
        waiting = client.waiting
        if waiting is None:
            waiting = client.waiting = []
        elif len(waiting) >= MAX_OPEN_EPISODES:
            self._resolve(index, waiting.pop(0), self._now, None, TOO_MANY)
        waiting.append(episode)

    def _attribute(self, index: int, client: _Client, transaction_id: bytes, value: bytes | None) -> None:
        """A success response answered the outstanding transaction: resolve the episodes it covers."""
        now = self._now
        if value is None:
            for episode in client.waiting or ():
                self._resolve(index, episode, now, None, NOT_NETTESTER)
            client.waiting = None
            return
        try:
            receipt = Receipt.decode(value)
            self._check(client, receipt)
        except AttributionError as error:
            self.counters.attribution_invalid.value += 1
            self._events.append(AttributionInvalid(index, transaction_id, str(error)))
            return  # never trusted: the episodes wait for a receipt that makes sense
        # The server's state of this session began with ``first``. Transmissions before it never reached
        # that state; they never reached the server at all unless an earlier state was lost (a restart,
        # an eviction), which shows as ``first`` changing between receipts.
        below_first_lost = client.state_first in (0, receipt.first)
        client.state_first = receipt.first
        if not client.waiting:
            return
        still: list[_Episode] = []
        for episode in client.waiting:
            if receipt.highest < episode.last:
                still.append(episode)  # its last transmissions may yet arrive: a later receipt will tell
                continue
            known = [
                False if below_first_lost and sequence < receipt.first else receipt.reached(sequence)
                for sequence in range(episode.first, episode.last + 1)
            ]
            if None in known:
                self._resolve(index, episode, now, None, NOT_COVERED)
            else:
                self._resolve(index, episode, now, sum(1 for reached in known if reached), "")
        client.waiting = still or None

    def _check(self, client: _Client, receipt: Receipt) -> None:
        """What a receipt claims must be possible for the transaction it answers."""
        if receipt.highest > client.sequence:
            raise AttributionError(f"claims sequence {receipt.highest} received, only {client.sequence} were sent")
        first = client.first_sequence
        if receipt.highest < first:
            raise AttributionError("answers a transaction none of whose transmissions it claims to have received")
        for episode in client.waiting or ():
            if episode.answered and receipt.highest >= episode.last:
                if all(receipt.reached(s) is False for s in range(episode.first, episode.last + 1)):
                    raise AttributionError("denies receiving a transaction that was answered")

    def _resolve(self, index: int, episode: _Episode, now: float, reached: int | None, reason: str) -> None:
        event = LossResolved(
            index,
            episode.transaction_id,
            episode.start,
            now,
            episode.last - episode.first + 1,
            reached,
            episode.answered,
            episode.mapped,
            reason,
        )
        for direction in event.directions:
            self.counters.lost.inc(direction)
        self._events.append(event)

    def loss_percent(self) -> float:
        """Waits that ended without an answer, as a share of all waits that ended."""
        counters = self.counters
        return loss_percent(counters.timeouts.value, counters.responses.value, counters.error_responses.value)
