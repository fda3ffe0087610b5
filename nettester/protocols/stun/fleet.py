"""The tester's client fleet: thousands of Binding-request loops on one timer wheel, sans-IO.

Behaviour of the original tool, per client: its own socket, a random start
delay, one Binding request per interval with a fresh transaction id; a
missing answer is re-sent at once with the SAME transaction id (so every
copy matches Wireshark's ``frame contains``); after N consecutive misses the
client reopens its socket (new port, new NAT mapping) with a new transaction
id; a healthy client also reopens every 120 s plus 1-60 s. ``rfc_retransmit``
switches to RFC 8489 section 6.2.1 timing instead.

The adapter feeds datagrams and the time in and pops events out: socket
actions (:class:`OpenSocket`, :class:`Send`) and findings to log.
"""

from __future__ import annotations

import math
import random
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nettester.protocols.stun.counters import FleetCounters
from nettester.protocols.stun.message import (
    MAGIC_COOKIE,
    TRANSACTION_ID_LENGTH,
    Address,
    AttributeType,
    MessageClass,
    Method,
    StunDecodeError,
    decode,
)
from nettester.protocols.stun.timerwheel import TimerWheel

_REQUEST_HEADER = struct.Struct("!HHI").pack(0x0001, 0, MAGIC_COOKIE)  # Binding request, no attributes

# RFC 8489 section 6.2.1: RTO 500 ms doubling, Rc = 7 sends, last wait Rm x RTO with Rm = 16.
RFC_RTO = 0.5
RFC_RC = 7
RFC_RM = 16


def binding_request(transaction_id: bytes) -> bytes:
    """A Binding request without attributes: 20 bytes (RFC 8489 section 5)."""
    return _REQUEST_HEADER + transaction_id


# --- events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Close the client's socket if it has one, open a new one (new local port)."""

    client: int
    reason: str  # "start", "failures", "periodic"


@dataclass(frozen=True, slots=True)
class Send:
    """Send C{data} on the client's socket."""

    client: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseMissing:
    """No answer within the wait; ``consecutive`` misses so far on this transaction id."""

    client: int
    transaction_id: bytes
    mapped: Address | None
    consecutive: int


@dataclass(frozen=True, slots=True)
class ConsecutiveFailures:
    """``count`` consecutive misses: the client gives up this socket."""

    client: int
    transaction_id: bytes
    mapped: Address | None
    count: int


@dataclass(frozen=True, slots=True)
class UnexpectedResponse:
    """A response whose transaction id matches no outstanding request."""

    client: int
    transaction_id: bytes


@dataclass(frozen=True, slots=True)
class MappingChanged:
    """The same socket saw its mapped address change (NAT rebinding)."""

    client: int
    old: Address
    new: Address


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """The server answered with an error response."""

    client: int
    transaction_id: bytes
    code: int
    reason: str


Event = OpenSocket | Send | ResponseMissing | ConsecutiveFailures | UnexpectedResponse | MappingChanged | ErrorResponse


# --- statistics ---------------------------------------------------------------


class DelayHistogram:
    """Delays (round-trip times, timer lag) in log-spaced buckets, 10 % wide, 10 us to ~60 s: fixed memory."""

    _FLOOR = 1e-5
    _GROWTH = math.log(1.1)
    _BUCKETS = 165

    def __init__(self) -> None:
        self._counts = [0] * self._BUCKETS
        self.count = 0

    def add(self, seconds: float) -> None:
        index = int(math.log(max(seconds, self._FLOOR) / self._FLOOR) / self._GROWTH)
        self._counts[min(index, self._BUCKETS - 1)] += 1
        self.count += 1

    def buckets(self) -> Iterator[tuple[float, int]]:
        """``(upper bound in seconds, count)`` of every bucket, in increasing order (for /metrics)."""
        for index, count in enumerate(self._counts):
            yield self._FLOOR * math.exp((index + 1) * self._GROWTH), count

    def percentile(self, fraction: float) -> float:
        """Upper bound (seconds) of the bucket holding the C{fraction} quantile; 0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                return self._FLOOR * math.exp((index + 1) * self._GROWTH)
        raise AssertionError("unreachable: counts add up to count")


# --- the fleet ---------------------------------------------------------------------


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


class ClientFleet:
    """All clients of one tester process, driven by C{handle_timer(now)} and C{receive()}."""

    def __init__(self, config: FleetConfig, counters: FleetCounters, now: float, rng: random.Random) -> None:
        self.config = config
        self.counters = counters
        self.rtt = DelayHistogram()
        # How late clients ran compared with their schedule: the tester's own health. Large values mean
        # the process is overloaded and its sends, hence its loss figures, are late too.
        self.timer_lag = DelayHistogram()
        self._rng = rng
        self._clients = [_Client() for _ in range(config.clients)]
        self._wheel = TimerWheel(config.clients, now, config.resolution)
        self._events: deque[Any] = deque()
        self._now = now  # of the handle_timer call running: sends are stamped with it, not their due time
        low, high = config.start_delay
        for index in range(config.clients):
            self._wheel.schedule(index, now + rng.uniform(low, high))

    @property
    def started(self) -> int:
        """Clients that have opened their socket."""
        return sum(1 for client in self._clients if client.started)

    def mapped_address(self, index: int) -> Address | None:
        """The mapped address of client C{index}'s last success, if any."""
        return self._clients[index].mapped

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def handle_timer(self, now: float) -> None:
        """Run every client whose deadline has passed."""
        self._now = now
        for index, due in self._wheel.expire(now):
            self.timer_lag.add(now - due)
            self._fire(index, self._clients[index], due, now)

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
        self._events.append(ResponseMissing(index, client.transaction_id, client.mapped, client.failures))
        if client.failures >= self.config.max_failures:
            counters.failures.value += 1
            self._events.append(ConsecutiveFailures(index, client.transaction_id, client.mapped, client.failures))
            self._open(index, client, "failures", due)
            self._new_transaction(index, client, due)
        elif self.config.rfc_retransmit:
            # A failed RFC transaction is over; the next one starts at the next interval.
            client.transaction_id = None
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
        """The first interval boundary of this client strictly after C{after}."""
        interval = self.config.interval
        return client.period_start + (math.floor((after - client.period_start) / interval) + 1) * interval

    @staticmethod
    def _rfc_wait(sends: int) -> float:
        """RFC 8489 section 6.2.1: RTO doubles after each send; after the last, Rm x RTO."""
        return RFC_RM * RFC_RTO if sends >= RFC_RC else RFC_RTO * 2 ** (sends - 1)

    def _send(self, index: int, client: _Client) -> None:
        assert client.transaction_id is not None
        client.attempt += 1
        client.sent_at = self._now
        self.counters.requests.value += 1
        self._events.append(Send(index, binding_request(client.transaction_id)))

    def receive(self, index: int, data: bytes, now: float) -> None:
        """A datagram arrived on client C{index}'s socket."""
        counters = self.counters
        try:
            message = decode(data)
        except StunDecodeError:
            counters.malformed.value += 1
            return
        if message.method != Method.BINDING or message.message_class not in (MessageClass.SUCCESS, MessageClass.ERROR):
            counters.malformed.value += 1
            return
        client = self._clients[index]
        if message.transaction_id != client.transaction_id:
            counters.unexpected.value += 1
            self._events.append(UnexpectedResponse(index, message.transaction_id))
            return
        try:
            if message.message_class == MessageClass.ERROR:
                error = message.get(AttributeType.ERROR_CODE)
                mapped = None
            else:
                mapped = message.get(AttributeType.XOR_MAPPED_ADDRESS) or message.get(AttributeType.MAPPED_ADDRESS)
        except StunDecodeError:
            counters.malformed.value += 1
            return
        client.transaction_id = None
        client.failures = 0
        if self.config.rfc_retransmit:
            self._wheel.schedule(index, self._next_period(client, now))
        if message.message_class == MessageClass.ERROR:
            counters.error_responses.value += 1
            code, reason = error if error is not None else (0, "")
            self._events.append(ErrorResponse(index, message.transaction_id, code, reason))
            return
        counters.responses.value += 1
        self.rtt.add(now - client.sent_at)
        if mapped is not None:
            if client.mapped_here and mapped != client.mapped:
                assert client.mapped is not None
                counters.mapping_changes.value += 1
                self._events.append(MappingChanged(index, client.mapped, mapped))
            client.mapped = mapped
            client.mapped_here = True

    def loss_percent(self) -> float:
        """Waits that ended without an answer, as a share of all waits that ended."""
        ended = self.counters.responses.value + self.counters.error_responses.value + self.counters.timeouts.value
        return 100.0 * self.counters.timeouts.value / ended if ended else 0.0
