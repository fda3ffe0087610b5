"""Sans-IO CoAP: the message layer and the request/response layer.

:class:`CoapLayer` is one CoAP endpoint (server and client at once) talking
to many peers. It never reads a clock, never touches a socket and never
imports ``twisted.internet``: datagrams and the current time go in
(:meth:`CoapLayer.receive_datagram`, :meth:`CoapLayer.handle_timer`),
datagrams, one timer and events come out (:meth:`CoapLayer.datagrams_to_send`,
:meth:`CoapLayer.get_timer`, :meth:`CoapLayer.next_event`). The application
answers requests and issues its own through method calls that take ``now``.

Message layer (RFC 7252 section 4): CON/NON/ACK/RST, retransmission with
exponential back-off, deduplication of CON and NON by (peer, message id) with
the cached answer re-sent, Empty-CON ping answered by Reset, NSTART.

Request/response layer: token matching (RFC 7252 section 5.3.2),
piggybacked and separate responses, block-wise transfers in both directions
on both sides (RFC 7959), observe on both sides (RFC 7641).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from nettester.protocols.coap.message import (
    ACK,
    CON,
    NON,
    RST,
    BlockValue,
    CoapDecodeError,
    Code,
    DecodeFailure,
    Message,
    OptionNumber,
    code_string,
    decode_after_header,
    decode_block,
    encode_block,
    encode_empty,
    encode_message,
    encode_uint,
    is_no_cache_key,
    is_request,
    peek_header,
)
from nettester.protocols.coap.store import ExpiringStore

Peer = Hashable

# RFC 7641 section 4.4: the Observe sequence number is 24 bits.
OBSERVE_MODULO = 1 << 24
# RFC 7641 section 3.4: notifications more than 128 s apart are always fresh.
OBSERVE_FRESHNESS_SECONDS = 128.0


@dataclass(frozen=True, slots=True)
class TransmissionParameters:
    """RFC 7252 section 4.8 parameters and the stack's own limits."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    nstart: int = 1
    max_latency: float = 100.0
    #: Preferred block size exponent (RFC 7959): 6 = 1024 bytes.
    block_szx: int = 6
    #: Largest request body accepted block-wise (Block1) and response body
    #: reassembled (Block2); beyond it 4.13 / a failure (RFC 7959 section 2.9.3).
    max_body_size: int = 1 << 20
    #: Block-wise transfers kept at once (uploads, and bodies being served):
    #: with max_body_size this bounds the memory block-wise can take.
    max_block_transfers: int = 4096
    token_length: int = 8
    dedup_buckets: int = 4
    #: Hard cap of the deduplication store (about 400 bytes per entry with
    #: its cached answer): past it the oldest bucket goes early (counted).
    max_dedup_entries: int = 1 << 20
    #: RFC 7641 section 4.5: NON notifications turn CON now and then, so an
    #: observer that went away is noticed (its CON times out) and forgotten.
    notification_check_count: int = 100
    notification_check_interval: float = 24 * 3600.0

    @property
    def max_transmit_span(self) -> float:
        """RFC 7252 section 4.8.2."""
        return self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def exchange_lifetime(self) -> float:
        """RFC 7252 section 4.8.2: span + 2 * MAX_LATENCY + PROCESSING_DELAY (= ACK_TIMEOUT)."""
        return self.max_transmit_span + 2 * self.max_latency + self.ack_timeout

    @property
    def non_lifetime(self) -> float:
        """RFC 7252 section 4.8.2: span + MAX_LATENCY."""
        return self.max_transmit_span + self.max_latency


@dataclass(slots=True)
class LayerStats:
    """Plain counters; the role exports them as metrics."""

    received: int = 0
    sent: int = 0
    garbage: int = 0
    format_errors: int = 0
    bad_options: int = 0
    duplicates: int = 0
    pings: int = 0
    resets_received: int = 0
    retransmissions: int = 0
    transmission_failures: int = 0
    unmatched: int = 0
    stale_notifications: int = 0
    block_errors: int = 0


# ---------------------------------------------------------------- handles


class IncomingRequest:
    """A request received from a peer, waiting for the application's answer.

    ``request`` is the whole request: after a block-wise upload its payload
    is the reassembled body and its Block1 option is gone.
    """

    __slots__ = (
        "peer", "request", "observe", "accept", "block2", "has_block1", "answered", "accepted",
        "_dedup_bucket", "_dedup_key", "_block1",
    )

    def __init__(self, peer: Peer, request: Message) -> None:
        self.peer = peer
        self.request = request
        #: The request's Observe value (0 register, 1 deregister), Accept and Block2, read once.
        self.observe: int | None = None
        self.accept: int | None = None
        self.block2: BlockValue | None = None
        self.has_block1 = False
        for number, value in request.options:
            if number == OptionNumber.OBSERVE:
                self.observe = int.from_bytes(value, "big")
            elif number == OptionNumber.ACCEPT:
                self.accept = int.from_bytes(value, "big")
            elif number == OptionNumber.BLOCK2:
                self.block2 = decode_block(value)
            elif number == OptionNumber.BLOCK1:
                self.has_block1 = True
        #: True once a response was sent (further responses are refused).
        self.answered = False
        #: True once an empty ACK announced a separate response.
        self.accepted = False
        self._dedup_bucket: dict[Hashable, bytes | None] | None = None
        self._dedup_key: Hashable = None
        self._block1: BlockValue | None = None

    def __repr__(self) -> str:
        return f"<IncomingRequest {self.request.describe()} from {self.peer!r}>"


class OutgoingRequest:
    """A request this endpoint sent (client side), until its final response.

    An observe registration stays open after the first response: every
    notification is another :class:`ResponseReceived` until it is cancelled.
    """

    __slots__ = (
        "peer", "request", "token", "observe", "done", "sent_at", "mid",
        "_current_token", "_body", "_block1_offset", "_block1_sent", "_block1_szx", "_assembled", "_etag",
        "_block_observe", "_last_observe", "_response_deadline", "_response_timeout", "_expires", "_transmission",
        "_holds_slot",
    )

    def __init__(self, peer: Peer, request: Message, token: bytes, response_timeout: float | None) -> None:
        self.peer = peer
        self.request = request
        self.token = token
        #: True when this is an observe registration (Observe: 0).
        self.observe = request.observe == 0
        self.done = False
        #: When the first datagram of the request left (for RTT).
        self.sent_at: float | None = None
        #: Message ID of the latest datagram sent for it (to find it in a capture).
        self.mid: int | None = None
        self._current_token = token
        self._body = request.payload
        self._block1_offset = 0
        self._block1_sent = 0
        self._block1_szx = 0
        self._assembled: bytearray | None = None
        self._etag: bytes | None = None
        self._block_observe: int | None = None
        self._last_observe: tuple[int, float] | None = None
        self._response_deadline: float | None = None
        self._response_timeout = response_timeout
        self._expires: float | None = None
        self._transmission: _Transmission | None = None
        self._holds_slot = False

    def __repr__(self) -> str:
        return (f"<OutgoingRequest {self.request.describe()} to {self.peer!r}: latest MID={self.mid} "
                f"token={self.token.hex() or '-'}>")


class ObserveRelation:
    """A server-side observer (RFC 7641 section 4.1): a peer, a token and the request."""

    __slots__ = ("peer", "token", "request", "active", "sequence", "_transmission", "_non_mid",
                 "_non_in_a_row", "_last_con")

    def __init__(self, peer: Peer, token: bytes, request: Message, sequence: int, now: float) -> None:
        self.peer = peer
        self.token = token
        self.request = request
        self.active = True
        self.sequence = sequence
        self._transmission: _Transmission | None = None
        self._non_mid: int | None = None
        self._non_in_a_row = 0
        self._last_con = now

    def __repr__(self) -> str:
        return f"<ObserveRelation {self.request.path_string} of {self.peer!r}>"


Owner = OutgoingRequest | ObserveRelation | IncomingRequest


class _Transmission:
    """A CON message being retransmitted until acknowledged (RFC 7252 section 4.2)."""

    __slots__ = ("peer", "mid", "data", "owner", "retransmissions", "timeout", "deadline", "cancelled")

    def __init__(self, peer: Peer, mid: int, data: bytes, owner: Owner, timeout: float, now: float) -> None:
        self.peer = peer
        self.mid = mid
        self.data = data
        self.owner = owner
        self.retransmissions = 0
        self.timeout = timeout
        self.deadline = now + timeout
        self.cancelled = False


class _Block1Upload:
    """Server-side reassembly of one block-wise request body (RFC 7959 section 2.5)."""

    __slots__ = ("body",)

    def __init__(self) -> None:
        self.body = bytearray()


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A complete request for the application; answer it with ``respond``."""

    request: IncomingRequest


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A (reassembled) response or notification for one of our requests."""

    request: OutgoingRequest
    response: Message
    rtt: float | None


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """One of our requests ended without a response: timeout, reset, ..."""

    request: OutgoingRequest
    reason: str


@dataclass(frozen=True, slots=True)
class ObserveCancelled:
    """A server-side observe relation ended: deregistered, reset, timeout, replaced."""

    relation: ObserveRelation
    reason: str


@dataclass(frozen=True, slots=True)
class MessageRejected:
    """A datagram that was not acceptable CoAP: counted, answered or dropped.

    ``mid`` is None when even the header was unreadable; ``answer`` names what
    was sent back (``RST``, ``4.02``) or is None for a silent drop.
    """

    peer: Peer
    reason: str
    mid: int | None
    answer: str | None


Event = RequestReceived | ResponseReceived | RequestFailed | ObserveCancelled | MessageRejected


# Content-Format option values of the formats answered most, encoded once.
_CONTENT_FORMAT_VALUES = {number: encode_uint(number) for number in (0, 40, 41, 42, 50, 60)}


def response(
    code: int,
    payload: bytes = b"",
    content_format: int | None = None,
    options: list[tuple[int, bytes]] | None = None,
) -> Message:
    """A response for :meth:`CoapLayer.respond`; the layer sets type, MID and token."""
    message = Message(ACK, code, 0, b"", list(options) if options else [], payload)
    if content_format is not None:
        value = _CONTENT_FORMAT_VALUES.get(content_format)
        message.options.append((OptionNumber.CONTENT_FORMAT, encode_uint(content_format) if value is None else value))
    return message


_NOT_CACHE_KEY = frozenset(
    (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE, OptionNumber.SIZE1, OptionNumber.SIZE2)
)
_BLOCK_OPTIONS = frozenset((OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.SIZE1, OptionNumber.SIZE2))


def cache_key(message: Message) -> tuple[int, tuple[tuple[int, bytes], ...]]:
    """Method plus the cache-key options (RFC 7252 section 5.4.6), minus block and observe.

    Block-wise state is keyed by it (RFC 7959 section 2.4: follow-up block
    requests carry the same options).
    """
    return message.code, tuple(
        (number, value)
        for number, value in message.options
        if number not in _NOT_CACHE_KEY and not is_no_cache_key(number)
    )


# ---------------------------------------------------------------- the layer


class CoapLayer:
    """One sans-IO CoAP endpoint serving and requesting at once."""

    def __init__(
        self,
        now: float,
        params: TransmissionParameters | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.params = params or TransmissionParameters()
        self.stats = LayerStats()
        self._rng = rng or random.Random()
        self._next_mid = self._rng.randrange(1 << 16)
        self._out: list[tuple[bytes, Peer]] = []
        self._events: deque[Event] = deque()
        lifetime = self.params.exchange_lifetime
        buckets = self.params.dedup_buckets
        # (peer, mid) -> cached answer bytes, or None while the application works.
        self._dedup: ExpiringStore[bytes | None] = ExpiringStore(
            lifetime, now, buckets, self.params.max_dedup_entries
        )
        # (peer, cache key) -> whole response body being served block-wise.
        transfers = self.params.max_block_transfers
        self._block2_bodies: ExpiringStore[Message] = ExpiringStore(lifetime, now, buckets, transfers)
        # (peer, cache key) -> body being uploaded block-wise.
        self._block1_uploads: ExpiringStore[_Block1Upload] = ExpiringStore(lifetime, now, buckets, transfers)
        self._transmissions: dict[tuple[Peer, int], _Transmission] = {}
        self._timers: list[tuple[float, int, _Transmission | OutgoingRequest]] = []
        self._timer_seq = 0
        #: Changes whenever :meth:`get_timer` may have become earlier: an
        #: adapter whose timer is armed can skip asking when it is unchanged.
        self.timer_version = 0
        self._requests: dict[tuple[Peer, bytes], OutgoingRequest] = {}
        self._active: dict[Peer, int] = {}
        self._queued: dict[Peer, deque[OutgoingRequest]] = {}
        self._relations: dict[tuple[Peer, bytes], ObserveRelation] = {}
        self._non_notifications: dict[tuple[Peer, int], ObserveRelation] = {}

    # ------------------------------------------------------------ sans-IO surface

    def datagrams_to_send(self) -> list[tuple[bytes, Peer]]:
        """Datagrams to write, in order, as (data, peer); the list is handed over."""
        out = self._out
        self._out = []
        return out

    def next_event(self) -> Event | None:
        """The next event for the application, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        """When :meth:`handle_timer` must be called next (absolute time)."""
        timers = self._timers
        while timers and self._timer_is_stale(timers[0]):
            heapq.heappop(timers)
        deadline = min(self._dedup.next_sweep, self._block2_bodies.next_sweep, self._block1_uploads.next_sweep)
        if timers and timers[0][0] < deadline:
            return timers[0][0]
        return deadline

    def handle_timer(self, now: float) -> None:
        """Retransmit, give up, expire requests and sweep stores as due at ``now``."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            if self._timer_is_stale(entry):
                continue
            target = entry[2]
            if isinstance(target, _Transmission):
                self._retransmit(target, now)
            else:
                self._fail_request(target, "timeout", now)
        self._dedup.sweep(now)
        self._block2_bodies.sweep(now)
        self._block1_uploads.sweep(now)

    def receive_datagram(self, data: bytes, peer: Peer, now: float) -> None:
        """Process one datagram from ``peer``."""
        stats = self.stats
        stats.received += 1
        header = peek_header(data)
        if header is None:
            stats.garbage += 1
            self._events.append(MessageRejected(peer, "not a CoAP version 1 datagram", None, None))
            return
        mtype, _, code, mid = header
        dedup_bucket = None
        if mtype <= NON and code:
            # RFC 7252 section 4.5: only the header is needed to spot a duplicate.
            dedup_bucket, cached = self._dedup.get_or_put((peer, mid), None, now)
            if dedup_bucket is None:
                stats.duplicates += 1
                if cached is not None:
                    self._out.append((cached, peer))
                    stats.sent += 1
                return
        try:
            message = decode_after_header(data, header)
        except CoapDecodeError as error:
            self._reject(error, peer, dedup_bucket)
            return
        if mtype == ACK or mtype == RST:
            self._receive_ack_or_reset(message, peer, now)
        elif not code:
            # RFC 7252 section 4.3: an Empty CON is a ping, answered by Reset.
            stats.pings += 1
            self._send(encode_empty(RST, mid), peer)
        elif code < 32:  # a request (RFC 7252 section 5.8)
            incoming = IncomingRequest(peer, message)
            incoming._dedup_bucket = dedup_bucket
            incoming._dedup_key = (peer, mid)
            self._receive_request(incoming, now)
        else:
            self._receive_separate_response(message, peer, dedup_bucket, now)

    # ------------------------------------------------------------ server side

    def accept(self, incoming: IncomingRequest) -> None:
        """Announce a separate response: an empty ACK now (RFC 7252 section 5.2.2)."""
        if incoming.request.mtype != CON or incoming.accepted or incoming.answered:
            return
        incoming.accepted = True
        data = encode_empty(ACK, incoming.request.mid)
        self._cache_answer(incoming, data)
        self._send(data, incoming.peer)

    def respond(self, incoming: IncomingRequest, answer: Message, now: float) -> ObserveRelation | None:
        """Send ``answer`` to ``incoming``; piggybacked if still possible.

        Large bodies go block-wise (RFC 7959 section 2.4). When the request
        registered for observation and ``answer`` is a 2.xx carrying an
        Observe option, the observer is registered and returned (RFC 7641
        section 4.1); the layer numbers the notifications itself.
        """
        if incoming.answered:
            raise ValueError(f"{incoming!r} was already answered")
        incoming.answered = True
        request = incoming.request
        answer.token = request.token
        relation = None
        wants_observe = False
        for number, _ in answer.options:
            if number == OptionNumber.OBSERVE:
                wants_observe = True
        if wants_observe:
            if incoming.observe == 0 and answer.code >> 5 == 2:
                relation = self._register_observer(incoming, now)
                answer.set_uint_option(OptionNumber.OBSERVE, relation.sequence)
            else:
                answer.remove_option(OptionNumber.OBSERVE)  # RFC 7641 section 4.1: not registered
        if incoming._block1 is not None:
            answer.set_option(OptionNumber.BLOCK1, encode_block(incoming._block1.num, False, incoming._block1.szx))
        block2 = incoming.block2
        if block2 is not None or len(answer.payload) > (16 << self.params.block_szx):
            answer = self._first_block_of(incoming.peer, request, answer, block2, now)
        self._send_response(incoming, answer, now)
        return relation

    def notify(self, relation: ObserveRelation, notification: Message, now: float, confirmable: bool) -> None:
        """Send a notification to an observer (RFC 7641 section 4.2).

        A CON notification replaces one still being retransmitted and keeps
        its retransmission state (RFC 7641 section 4.5.2). A notification
        that is not 2.xx carries no Observe option and ends the relation
        (RFC 7641 sections 3.2 and 4.2).
        """
        if not relation.active:
            raise ValueError(f"{relation!r} is no longer active")
        notification.token = relation.token
        final = notification.code >> 5 != 2
        if final:
            notification.remove_option(OptionNumber.OBSERVE)
        else:
            relation.sequence = (relation.sequence + 1) % OBSERVE_MODULO
            notification.set_uint_option(OptionNumber.OBSERVE, relation.sequence)
        if len(notification.payload) > (16 << self.params.block_szx):
            notification = self._first_block_of(relation.peer, relation.request, notification, None, now)
        mid = self._allocate_mid()
        notification.mid = mid
        if relation._non_mid is not None:
            self._non_notifications.pop((relation.peer, relation._non_mid), None)
            relation._non_mid = None
        params = self.params
        if not confirmable and (relation._non_in_a_row + 1 >= params.notification_check_count
                                or now - relation._last_con >= params.notification_check_interval):
            confirmable = True  # RFC 7641 section 4.5: check the observer is still there
        if confirmable:
            relation._non_in_a_row = 0
            relation._last_con = now
            notification.mtype = CON
            data = notification.encode()
            previous = relation._transmission
            transmission = self._start_transmission(relation.peer, mid, data, relation, now)
            if previous is not None and not previous.cancelled:
                self._stop_transmission(previous)
                transmission.retransmissions = previous.retransmissions
                transmission.timeout = previous.timeout
                transmission.deadline = previous.deadline
                self._schedule(transmission.deadline, transmission)
            relation._transmission = transmission
        else:
            relation._non_in_a_row += 1
            notification.mtype = NON
            data = notification.encode()
            relation._non_mid = mid
            self._non_notifications[(relation.peer, mid)] = relation
        self._send(data, relation.peer)
        if final:
            relation._transmission = None  # the final CON keeps being retransmitted
            self.cancel_relation(relation, f"final notification {code_string(notification.code)}")

    def cancel_relation(self, relation: ObserveRelation, reason: str) -> None:
        """End an observe relation from the server side (resource deleted, shutdown)."""
        if not relation.active:
            return
        relation.active = False
        self._relations.pop((relation.peer, relation.token), None)
        if relation._transmission is not None:
            self._stop_transmission(relation._transmission)
        if relation._non_mid is not None:
            self._non_notifications.pop((relation.peer, relation._non_mid), None)
        self._events.append(ObserveCancelled(relation, reason))

    @property
    def observer_count(self) -> int:
        """Active observe relations."""
        return len(self._relations)

    @property
    def dedup_size(self) -> int:
        """(peer, MID) pairs remembered for deduplication."""
        return len(self._dedup)

    @property
    def dedup_evicted(self) -> int:
        """Dedup entries dropped before EXCHANGE_LIFETIME because of the cap."""
        return self._dedup.evicted

    def _receive_request(self, incoming: IncomingRequest, now: float) -> None:
        request = incoming.request
        peer = incoming.peer
        observe = incoming.observe
        if observe is not None:
            existing = self._relations.get((peer, request.token))
            if existing is not None:
                # RFC 7641 section 3.6 deregistration, section 4.1 re-registration.
                self.cancel_relation(existing, "deregistered" if observe == 1 else "replaced")
        if incoming.has_block1 and not self._receive_block1(incoming, now):
            return
        block2 = incoming.block2
        if block2 is not None:
            if block2.szx > 6:
                self._respond_error(incoming, Code.BAD_REQUEST, b"Block2 SZX 7 is reserved", now)
                return
            if block2.num > 0:
                stored = self._block2_bodies.get((peer, cache_key(request)))
                if stored is not None:
                    incoming.answered = True
                    self._send_response(incoming, self._block_of(stored[1], block2), now)
                    return
        self._events.append(RequestReceived(incoming))

    def _receive_block1(self, incoming: IncomingRequest, now: float) -> bool:
        """Collect one uploaded block (RFC 7959 section 2.5); True when the body is complete."""
        request = incoming.request
        block1 = request.block1
        assert block1 is not None
        params = self.params
        if block1.szx > 6:
            self._respond_error(incoming, Code.BAD_REQUEST, b"Block1 SZX 7 is reserved", now)
            return False
        size1 = request.size1
        if size1 is not None and size1 > params.max_body_size:
            self._respond_too_large(incoming, now)
            return False
        key = (incoming.peer, cache_key(request))
        if block1.num == 0:
            upload = _Block1Upload()
            self._block1_uploads.pop(key)
            self._block1_uploads.put(key, upload, now)
        else:
            found = self._block1_uploads.get(key)
            if found is None or len(found[1].body) != block1.offset:
                self.stats.block_errors += 1
                self._respond_error(incoming, Code.REQUEST_ENTITY_INCOMPLETE, b"", now)
                return False
            upload = found[1]
        if block1.more and len(request.payload) != block1.size:
            self.stats.block_errors += 1
            self._respond_error(incoming, Code.BAD_REQUEST, b"Block1 with M set must be full size", now)
            return False
        upload.body += request.payload
        if len(upload.body) > params.max_body_size:
            self._block1_uploads.pop(key)
            self._respond_too_large(incoming, now)
            return False
        if block1.more:
            # RFC 7959 section 2.5: 2.31 Continue, possibly asking for smaller blocks.
            szx = min(block1.szx, params.block_szx)
            incoming.answered = True
            self._send_response(
                incoming,
                response(Code.CONTINUE, options=[(OptionNumber.BLOCK1, encode_block(block1.num, True, szx))]),
                now,
            )
            return False
        self._block1_uploads.pop(key)
        incoming._block1 = block1
        request.options = [(n, v) for n, v in request.options if n != OptionNumber.BLOCK1 and n != OptionNumber.SIZE1]
        request.payload = bytes(upload.body)
        return True

    def _respond_too_large(self, incoming: IncomingRequest, now: float) -> None:
        """4.13 with Size1 telling the limit (RFC 7959 section 2.9.3)."""
        self.stats.block_errors += 1
        answer = response(
            Code.REQUEST_ENTITY_TOO_LARGE, options=[(OptionNumber.SIZE1, encode_uint(self.params.max_body_size))]
        )
        self.respond(incoming, answer, now)

    def _respond_error(self, incoming: IncomingRequest, code: int, diagnostic: bytes, now: float) -> None:
        self.respond(incoming, response(code, diagnostic), now)

    def _first_block_of(
        self, peer: Peer, request: Message, whole: Message, block2: BlockValue | None, now: float
    ) -> Message:
        """Remember a large body and cut the requested (or first) block from it."""
        szx = self.params.block_szx if block2 is None else min(block2.szx, self.params.block_szx)
        wanted = BlockValue(0 if block2 is None else block2.num, False, szx)
        if len(whole.payload) > wanted.size:
            self._block2_bodies.put((peer, cache_key(request)), whole, now)
        return self._block_of(whole, wanted)

    def _block_of(self, whole: Message, wanted: BlockValue) -> Message:
        """One Block2 slice of ``whole`` (RFC 7959 section 2.4), Size2 on the first block."""
        szx = min(wanted.szx, self.params.block_szx)
        size = 16 << szx
        offset = wanted.num * (16 << wanted.szx)
        body = whole.payload
        if offset and offset >= len(body):
            return response(Code.BAD_OPTION, b"Block2 beyond the end of the body")
        num = offset // size
        chunk = body[num * size: num * size + size]
        more = num * size + size < len(body)
        options = [(n, v) for n, v in whole.options if n != OptionNumber.BLOCK2 and n != OptionNumber.SIZE2]
        options.append((OptionNumber.BLOCK2, encode_block(num, more, szx)))
        if num == 0:
            options.append((OptionNumber.SIZE2, encode_uint(len(body))))
        if num > 0:
            # Notifications are only numbered on the first block (RFC 7959 section 3.4).
            options = [(n, v) for n, v in options if n != OptionNumber.OBSERVE]
        return Message(whole.mtype, whole.code, whole.mid, whole.token, options, chunk)

    def _send_response(self, incoming: IncomingRequest, answer: Message, now: float) -> None:
        """Piggyback on the ACK, or send separately (CON or NON) with a new MID."""
        request = incoming.request
        peer = incoming.peer
        answer.token = request.token
        if request.mtype == CON and not incoming.accepted:
            # The hot path: a piggybacked answer, remembered for duplicates (section 4.5).
            data = encode_message(ACK, answer.code, request.mid, request.token, answer.options, answer.payload)
            bucket = incoming._dedup_bucket
            if bucket is not None:
                bucket[incoming._dedup_key] = data
            self._out.append((data, peer))
            self.stats.sent += 1
            return
        mid = self._allocate_mid()
        if request.mtype == CON:
            data = encode_message(CON, answer.code, mid, request.token, answer.options, answer.payload)
            self._start_transmission(peer, mid, data, incoming, now)
        else:
            # RFC 7252 section 5.2.3: a NON request gets a NON response.
            data = encode_message(NON, answer.code, mid, request.token, answer.options, answer.payload)
        self._send(data, peer)

    def _cache_answer(self, incoming: IncomingRequest, data: bytes) -> None:
        """Remember what answered this CON so a duplicate gets it again (section 4.5)."""
        bucket = incoming._dedup_bucket
        if bucket is not None:
            bucket[incoming._dedup_key] = data

    def _register_observer(self, incoming: IncomingRequest, now: float) -> ObserveRelation:
        key = (incoming.peer, incoming.request.token)
        existing = self._relations.get(key)
        if existing is not None:
            self.cancel_relation(existing, "replaced")
        relation = ObserveRelation(
            incoming.peer, incoming.request.token, incoming.request, self._rng.randrange(OBSERVE_MODULO), now
        )
        self._relations[key] = relation
        return relation

    # ------------------------------------------------------------ client side

    def request(
        self, peer: Peer, message: Message, now: float, response_timeout: float | None = None,
        timeout: float | None = None,
    ) -> OutgoingRequest:
        """Send a request (CON or NON as ``message.mtype``); returns its handle.

        Bodies larger than the preferred block size go block-wise (Block1);
        block-wise responses are reassembled (Block2). An ``Observe: 0``
        option registers for notifications. ``response_timeout`` bounds the
        wait for a response after the request was acknowledged (default
        EXCHANGE_LIFETIME, NON_LIFETIME for NON requests); ``timeout``, when
        given, bounds the whole request from now, retransmissions included
        (a load generator's request timeout).
        """
        token = self._new_token(peer)
        message.token = token
        outgoing = OutgoingRequest(peer, message, token, response_timeout)
        if timeout is not None:
            outgoing._expires = now + timeout
        self._requests[(peer, token)] = outgoing
        if self._active.get(peer, 0) >= self.params.nstart:
            # RFC 7252 section 4.7: at most NSTART outstanding interactions.
            self._queued.setdefault(peer, deque()).append(outgoing)
        else:
            self._start_request(outgoing, now)
        return outgoing

    def cancel(self, outgoing: OutgoingRequest, now: float, deregister: bool = True) -> None:
        """Stop a request or an observation.

        With ``deregister`` an observation is ended proactively by a GET with
        Observe: 1 (RFC 7641 section 3.6), whose response ends the handle;
        otherwise the handle is forgotten and the next notification reset.
        """
        if outgoing.done:
            return
        if outgoing.observe and deregister and outgoing._last_observe is not None:
            outgoing.observe = False
            deregistration = outgoing.request
            deregistration.set_uint_option(OptionNumber.OBSERVE, 1)
            self._send_request_message(outgoing, deregistration, outgoing.token, now)
            return
        self._finish(outgoing, now)

    def ping(self, peer: Peer, now: float) -> OutgoingRequest:
        """CoAP ping (RFC 7252 section 4.3): an Empty CON; the Reset answer ends it."""
        outgoing = OutgoingRequest(peer, Message(CON, 0), b"", None)
        mid = self._allocate_mid()
        outgoing.mid = mid
        outgoing.sent_at = now
        data = encode_empty(CON, mid)
        outgoing._transmission = self._start_transmission(peer, mid, data, outgoing, now)
        self._send(data, peer)
        return outgoing

    def _start_request(self, outgoing: OutgoingRequest, now: float) -> None:
        """Take an NSTART slot and send the first (or only) datagram."""
        outgoing._holds_slot = True
        self._active[outgoing.peer] = self._active.get(outgoing.peer, 0) + 1
        body = outgoing._body
        block_size = 16 << self.params.block_szx
        message = outgoing.request
        if len(body) > block_size:
            outgoing._block1_szx = self.params.block_szx
            message = self._block1_message(outgoing, 0)
        outgoing.sent_at = now
        self._send_request_message(outgoing, message, outgoing.token, now)

    def _block1_message(self, outgoing: OutgoingRequest, offset: int) -> Message:
        """The request carrying the Block1 slice at ``offset`` (RFC 7959 section 2.5)."""
        size = 16 << outgoing._block1_szx
        body = outgoing._body
        base = outgoing.request
        options = [(n, v) for n, v in base.options if n not in _BLOCK_OPTIONS]
        more = offset + size < len(body)
        options.append((OptionNumber.BLOCK1, encode_block(offset // size, more, outgoing._block1_szx)))
        if offset == 0:
            options.append((OptionNumber.SIZE1, encode_uint(len(body))))
        chunk = body[offset: offset + size]
        outgoing._block1_offset = offset
        outgoing._block1_sent = len(chunk)
        return Message(base.mtype, base.code, 0, base.token, options, chunk)

    def _send_request_message(self, outgoing: OutgoingRequest, message: Message, token: bytes, now: float) -> None:
        peer = outgoing.peer
        if token != outgoing._current_token:
            if outgoing._current_token != outgoing.token:
                self._requests.pop((peer, outgoing._current_token), None)
            self._requests[(peer, token)] = outgoing
            outgoing._current_token = token
        mid = self._allocate_mid()
        outgoing.mid = mid
        data = encode_message(message.mtype, message.code, mid, token, message.options, message.payload)
        if outgoing._transmission is not None:
            self._stop_transmission(outgoing._transmission)
            outgoing._transmission = None
        if message.mtype == CON:
            outgoing._transmission = self._start_transmission(peer, mid, data, outgoing, now)
            self._arm_deadline(outgoing, outgoing._expires)
        else:
            self._arm_response_timeout(outgoing, now, self.params.non_lifetime)
        self._send(data, peer)

    def _arm_response_timeout(self, outgoing: OutgoingRequest, now: float, default: float) -> None:
        timeout = outgoing._response_timeout if outgoing._response_timeout is not None else default
        deadline = now + timeout
        if outgoing._expires is not None and outgoing._expires < deadline:
            deadline = outgoing._expires
        self._arm_deadline(outgoing, deadline)

    def _arm_deadline(self, outgoing: OutgoingRequest, deadline: float | None) -> None:
        """The one deadline at which the request fails with ``timeout`` (None: none)."""
        outgoing._response_deadline = deadline
        if deadline is not None:
            self._schedule(deadline, outgoing)

    def _receive_separate_response(
        self, message: Message, peer: Peer, dedup_bucket: dict[Hashable, bytes | None] | None, now: float
    ) -> None:
        """A CON or NON response: acknowledge a CON, then match it by token."""
        outgoing = self._requests.get((peer, message.token))
        if outgoing is None:
            # RFC 7252 section 5.3.2 and RFC 7641 section 3.6: reject what we do not expect.
            self.stats.unmatched += 1
            data = encode_empty(RST, message.mid)
        elif message.mtype == CON:
            data = encode_empty(ACK, message.mid)
        else:
            data = None
        if data is not None:
            if dedup_bucket is not None:
                dedup_bucket[(peer, message.mid)] = data
            self._send(data, peer)
        if outgoing is not None:
            self._receive_response(outgoing, message, now)

    def _receive_ack_or_reset(self, message: Message, peer: Peer, now: float) -> None:
        transmission = self._transmissions.get((peer, message.mid))
        if transmission is None:
            if message.mtype == RST:
                self.stats.resets_received += 1
                relation = self._non_notifications.pop((peer, message.mid), None)
                if relation is not None:
                    # RFC 7641 section 3.6: a Reset to a notification cancels it.
                    relation._non_mid = None
                    self.cancel_relation(relation, "reset")
                    return
            self.stats.unmatched += 1
            return
        self._stop_transmission(transmission)
        owner = transmission.owner
        if message.mtype == RST:
            self.stats.resets_received += 1
            if isinstance(owner, ObserveRelation):
                self.cancel_relation(owner, "reset")
            elif isinstance(owner, OutgoingRequest):
                if owner.request.code == 0:
                    self._finish_with(owner, ResponseReceived(owner, message, now - (owner.sent_at or now)), now)
                else:
                    self._fail_request(owner, "reset", now)
            return
        if isinstance(owner, ObserveRelation):
            owner._transmission = None
            return
        if not isinstance(owner, OutgoingRequest):
            return  # A separate response of ours was acknowledged.
        if message.code == 0:
            # RFC 7252 section 5.2.2: the response will come separately.
            self._arm_response_timeout(owner, now, self.params.exchange_lifetime)
            return
        if message.token != owner._current_token:
            self.stats.unmatched += 1
            return
        self._receive_response(owner, message, now)

    def _receive_response(self, outgoing: OutgoingRequest, message: Message, now: float) -> None:
        """Continue block-wise transfers, check notification order, deliver."""
        if outgoing.done:
            return
        outgoing._response_deadline = None
        if message.code == Code.CONTINUE and outgoing._block1_szx:
            self._continue_block1(outgoing, message, now)
            return
        block2 = message.block2
        if block2 is not None and (block2.more or outgoing._assembled is not None):
            if not self._collect_block2(outgoing, message, block2, now):
                return
            message.payload = bytes(outgoing._assembled or b"")
            message.remove_option(OptionNumber.BLOCK2)
            outgoing._assembled = None
            if outgoing._block_observe is not None:
                # RFC 7959 section 3.4: only the first block carried the notification's Observe.
                message.set_uint_option(OptionNumber.OBSERVE, outgoing._block_observe)
        if outgoing.observe and message.observe is not None and message.code >> 5 == 2:
            first = outgoing._last_observe is None
            if not self._is_fresh(outgoing, message.observe, now):
                self.stats.stale_notifications += 1
                return
            self._release_slot(outgoing, now)
            rtt = now - (outgoing.sent_at or now) if first else None
            self._events.append(ResponseReceived(outgoing, message, rtt))
            return
        self._finish_with(outgoing, ResponseReceived(outgoing, message, now - (outgoing.sent_at or now)), now)

    def _continue_block1(self, outgoing: OutgoingRequest, message: Message, now: float) -> None:
        """Send the next Block1 slice after 2.31 (RFC 7959 section 2.5), at the server's size."""
        acknowledged = message.block1
        if acknowledged is not None and acknowledged.szx < outgoing._block1_szx:
            outgoing._block1_szx = acknowledged.szx
        # The server kept all we sent; smaller blocks continue right after it.
        next_offset = outgoing._block1_offset + outgoing._block1_sent
        if next_offset >= len(outgoing._body):
            self.stats.block_errors += 1
            self._fail_request(outgoing, "2.31 Continue after the last block", now)
            return
        self._send_request_message(outgoing, self._block1_message(outgoing, next_offset), outgoing._current_token, now)

    def _collect_block2(self, outgoing: OutgoingRequest, message: Message, block2: BlockValue, now: float) -> bool:
        """Append one Block2 slice; ask for the next one. True when the body is complete."""
        etag = message.option(OptionNumber.ETAG)
        if block2.num == 0 or outgoing._assembled is None:
            if block2.num != 0:
                self.stats.block_errors += 1
                self._fail_request(outgoing, "Block2 transfer did not start at block 0", now)
                return False
            outgoing._assembled = bytearray()
            outgoing._etag = etag
            outgoing._block_observe = message.observe
        elif etag != outgoing._etag:
            # RFC 7959 section 2.4: the representation changed under the transfer.
            self.stats.block_errors += 1
            self._fail_request(outgoing, "ETag changed during a Block2 transfer", now)
            return False
        assembled = outgoing._assembled
        if block2.offset != len(assembled):
            self.stats.block_errors += 1
            self._fail_request(outgoing, "Block2 out of sequence", now)
            return False
        assembled += message.payload
        if len(assembled) > self.params.max_body_size:
            self._fail_request(outgoing, "Block2 body larger than max_body_size", now)
            return False
        if not block2.more:
            return True
        # RFC 7959 sections 2.4 and 3.4: ask for the next block with the same
        # method and options, no body, no Observe, and a fresh token.
        base = outgoing.request
        options = [(n, v) for n, v in base.options if n not in _BLOCK_OPTIONS and n != OptionNumber.OBSERVE]
        options.append((OptionNumber.BLOCK2, encode_block(block2.num + 1, False, block2.szx)))
        follow_up = Message(base.mtype, base.code, 0, b"", options)
        self._send_request_message(outgoing, follow_up, self._new_token(outgoing.peer), now)
        return False

    def _is_fresh(self, outgoing: OutgoingRequest, value: int, now: float) -> bool:
        """RFC 7641 section 3.4: is notification ``value`` newer than the last one?"""
        last = outgoing._last_observe
        fresh = (
            last is None
            or (last[0] < value and value - last[0] < (1 << 23))
            or (last[0] > value and last[0] - value > (1 << 23))
            or now > last[1] + OBSERVE_FRESHNESS_SECONDS
        )
        if fresh:
            outgoing._last_observe = (value, now)
        return fresh

    def _finish_with(self, outgoing: OutgoingRequest, event: Event, now: float) -> None:
        self._finish(outgoing, now)
        self._events.append(event)

    def _fail_request(self, outgoing: OutgoingRequest, reason: str, now: float) -> None:
        if outgoing.done:
            return
        self._finish_with(outgoing, RequestFailed(outgoing, reason), now)

    def _finish(self, outgoing: OutgoingRequest, now: float) -> None:
        """Forget a request: tokens, retransmission, NSTART slot."""
        outgoing.done = True
        outgoing._response_deadline = None
        peer = outgoing.peer
        self._requests.pop((peer, outgoing.token), None)
        self._requests.pop((peer, outgoing._current_token), None)
        if outgoing._transmission is not None:
            self._stop_transmission(outgoing._transmission)
            outgoing._transmission = None
        if outgoing.sent_at is None and outgoing.request.code:
            queue = self._queued.get(peer)
            if queue is not None and outgoing in queue:
                queue.remove(outgoing)
        self._release_slot(outgoing, now)

    def _release_slot(self, outgoing: OutgoingRequest, now: float) -> None:
        """Free the request's NSTART slot (once) and start the next queued request."""
        if not outgoing._holds_slot:
            return
        outgoing._holds_slot = False
        peer = outgoing.peer
        self._active[peer] -= 1
        queue = self._queued.get(peer)
        if queue:
            following = queue.popleft()
            if not queue:
                del self._queued[peer]
            self._start_request(following, now)
        if not self._active[peer]:
            del self._active[peer]

    # ------------------------------------------------------------ message layer

    def _allocate_mid(self) -> int:
        mid = self._next_mid
        self._next_mid = (mid + 1) & 0xFFFF
        return mid

    def _new_token(self, peer: Peer) -> bytes:
        length = self.params.token_length
        while True:
            token = self._rng.getrandbits(8 * length).to_bytes(length, "big")
            if (peer, token) not in self._requests:
                return token

    def _send(self, data: bytes, peer: Peer) -> None:
        self._out.append((data, peer))
        self.stats.sent += 1

    def _reject(self, error: CoapDecodeError, peer: Peer, dedup_bucket: dict[Hashable, bytes | None] | None) -> None:
        """Answer or drop an undecodable datagram (RFC 7252 sections 4.2, 4.3, 5.4.1)."""
        stats = self.stats
        if error.failure is DecodeFailure.GARBAGE:
            stats.garbage += 1
            self._events.append(MessageRejected(peer, error.reason, None, None))
            return
        if error.failure is DecodeFailure.BAD_OPTION:
            stats.bad_options += 1
        else:
            stats.format_errors += 1
        if error.mtype != CON or error.mid is None:
            # NON, ACK, RST: silently ignored.
            self._events.append(MessageRejected(peer, error.reason, error.mid, None))
            return
        if error.failure is DecodeFailure.BAD_OPTION and error.code is not None and is_request(error.code):
            diagnostic = f"unrecognized critical option {error.option}".encode()
            data = encode_message(ACK, Code.BAD_OPTION, error.mid, error.token or b"", (), diagnostic)
            answer = "4.02"
        else:
            data = encode_empty(RST, error.mid)
            answer = "RST"
        if dedup_bucket is not None:
            dedup_bucket[(peer, error.mid)] = data
        self._send(data, peer)
        self._events.append(MessageRejected(peer, error.reason, error.mid, answer))

    def _start_transmission(self, peer: Peer, mid: int, data: bytes, owner: Owner, now: float) -> _Transmission:
        """Track a CON for retransmission (RFC 7252 section 4.2)."""
        params = self.params
        timeout = params.ack_timeout * self._rng.uniform(1.0, params.ack_random_factor)
        transmission = _Transmission(peer, mid, data, owner, timeout, now)
        self._transmissions[(peer, mid)] = transmission
        self._schedule(transmission.deadline, transmission)
        return transmission

    def _stop_transmission(self, transmission: _Transmission) -> None:
        transmission.cancelled = True
        self._transmissions.pop((transmission.peer, transmission.mid), None)

    def _retransmit(self, transmission: _Transmission, now: float) -> None:
        """Resend with the timeout doubled, or give up after MAX_RETRANSMIT (section 4.2)."""
        if transmission.retransmissions >= self.params.max_retransmit:
            self._stop_transmission(transmission)
            self.stats.transmission_failures += 1
            owner = transmission.owner
            if isinstance(owner, OutgoingRequest):
                self._fail_request(owner, "timeout", now)
            elif isinstance(owner, ObserveRelation):
                self.cancel_relation(owner, "timeout")
            return
        transmission.retransmissions += 1
        transmission.timeout *= 2
        transmission.deadline = now + transmission.timeout
        self._schedule(transmission.deadline, transmission)
        self.stats.retransmissions += 1
        self._send(transmission.data, transmission.peer)

    def _schedule(self, deadline: float, target: _Transmission | OutgoingRequest) -> None:
        self._timer_seq += 1
        self.timer_version = self._timer_seq
        heapq.heappush(self._timers, (deadline, self._timer_seq, target))

    @staticmethod
    def _timer_is_stale(entry: tuple[float, int, _Transmission | OutgoingRequest]) -> bool:
        deadline, _, target = entry
        if isinstance(target, _Transmission):
            return target.cancelled or target.deadline != deadline
        return target.done or target._response_deadline != deadline
