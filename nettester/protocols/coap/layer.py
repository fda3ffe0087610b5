"""Sans-IO CoAP: the message layer and the request/response layer.

``CoapLayer`` is one CoAP endpoint (server and client at once) talking to
many peers. It never reads a clock, never touches a socket and never imports
``twisted.internet``. It follows the datagram-core contract of every
nettester core (``nettester.interfaces.DatagramCore``): datagrams and the
current time go in (``receive_datagram(data, addr, now)``,
``handle_timer(now)``), datagrams, one timer and events come out
(``datagrams_to_send()``, ``get_timer()``, ``next_event()``). The
application answers requests and issues its own through method calls that
take ``now``.

Message layer (RFC 7252 section 4): CON/NON/ACK/RST, retransmission with
exponential back-off, deduplication of CON and NON by (peer, message id) with
the cached answer re-sent, Empty-CON ping answered by Reset, NSTART.

Request/response layer: token matching (RFC 7252 section 5.3.2),
piggybacked and separate responses, critical options the server does not
implement refused with 4.02 (section 5.4.1), block-wise transfers in both
directions on both sides (RFC 7959, helpers in ``blockwise.py``), observe on
both sides (RFC 7641, rules in ``observe.py``). The events are in
``events.py``.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Hashable

from nettester.protocols.coap.blockwise import (
    Block1Uploads,
    Block2Assembly,
    BlockRefusal,
    block2_follow_up,
    block_of,
    cache_key,
)
from nettester.protocols.coap.events import (
    Event,
    MessageRejected,
    ObserveCancelled,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from nettester.protocols.coap.exchanges import (
    IncomingRequest,
    ObserveRelation,
    OutgoingRequest,
    Owner,
    Transmission,
    timer_is_stale,
)
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
    Peer,
    code_string,
    decode_after_header,
    encode_block,
    encode_empty,
    encode_message,
    is_request,
    option_name,
    peek_header,
    response,
)
from nettester.protocols.coap.observe import (
    OBSERVE_MODULO,
    confirm_now,
    notification_for,
)
from nettester.protocols.coap.parameters import LayerStats, TransmissionParameters
from nettester.protocols.coap.static import StaticAnswers
from nettester.protocols.coap.store import ExpiringStore

GET = Code.GET

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
        # (peer, cache key) -> body being uploaded block-wise, bounded per peer and in total.
        params = self.params
        self._block1_uploads = Block1Uploads(lifetime, params.max_body_size, transfers, params.max_uploads_per_peer,
                                             params.max_upload_bytes)
        self._transmissions: dict[tuple[Peer, int], Transmission] = {}
        self._timers: list[tuple[float, int, Transmission | OutgoingRequest]] = []
        self._timer_seq = 0
        #: Changes whenever ``get_timer`` may have become earlier: an
        #: adapter whose timer is armed can skip asking when it is unchanged.
        self.timer_version = 0
        self._requests: dict[tuple[Peer, bytes], OutgoingRequest] = {}
        self._active: dict[Peer, int] = {}
        self._queued: dict[Peer, deque[OutgoingRequest]] = {}
        self._relations: dict[tuple[Peer, bytes], ObserveRelation] = {}
        self._non_notifications: dict[tuple[Peer, int], ObserveRelation] = {}
        #: the static resources' answers (``static.py``); cleared when the resources change
        self.static_answers = StaticAnswers()

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
        """When ``handle_timer`` must be called next (absolute time)."""
        timers = self._timers
        while timers and timer_is_stale(timers[0]):
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
            if timer_is_stale(entry):
                continue
            target = entry[2]
            if isinstance(target, Transmission):
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
            if code == GET and mtype == CON and self.static_answers.answers:
                # The common GET of a static resource: its answer without decoding (static.py).
                answer = self.static_answers.answer(data, header[1])
                if answer is not None:
                    dedup_bucket[(peer, mid)] = answer
                    self._out.append((answer, peer))
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
            if code == GET and mtype == CON:
                incoming._datagram = data
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
        incoming.cache_answer(data)
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
                relation.content_format = answer.content_format
                answer.set_uint_option(OptionNumber.OBSERVE, relation.sequence)
            else:
                answer.remove_option(OptionNumber.OBSERVE)  # RFC 7641 section 4.1: not registered
        if incoming._block1 is not None:
            block1 = incoming._block1  # a BERT block (SZX 7) only came in over a reliable transport
            answer.set_option(OptionNumber.BLOCK1, encode_block(block1.num, False, block1.szx, bert=True))
        block2 = incoming.block2
        if block2 is not None or len(answer.payload) > (16 << self.params.block_szx):
            incoming.static = False  # the body is stored for the next blocks
            answer = self._first_block_of(incoming.peer, request, answer, block2, now)
        self._send_response(incoming, answer, now)
        return relation

    def notify(
        self, relation: ObserveRelation, notification: Message, now: float, confirmable: bool, final: bool = False
    ) -> None:
        """Send a notification to an observer (RFC 7641 section 4.2).

        A CON notification replaces one still being retransmitted and keeps
        its retransmission state (RFC 7641 section 4.5.2). A notification
        that is not 2.xx, or ``final``, carries no Observe option and ends the
        relation (RFC 7641 sections 3.2 and 4.2); so does a 2.xx in another
        Content-Format than the registration's, sent as 4.06 (section 4.2).
        """
        if not relation.active:
            raise ValueError(f"{relation!r} is no longer active")
        notification.token = relation.token
        final = notification_for(relation, notification, final)
        if len(notification.payload) > (16 << self.params.block_szx):
            notification = self._first_block_of(relation.peer, relation.request, notification, None, now)
        mid = self._allocate_mid()
        notification.mid = mid
        if relation._non_mid is not None:
            self._non_notifications.pop((relation.peer, relation._non_mid), None)
            relation._non_mid = None
        params = self.params
        if not confirmable and confirm_now(relation, now, params.notification_check_count,
                                           params.notification_check_interval):
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
        supported = self.params.supported_critical_options
        for number, _ in request.options:
            if number & 1 and number not in supported:
                # RFC 7252 section 5.4.1: a critical option this server does not implement.
                self.stats.bad_options += 1
                self._respond_error(incoming, Code.BAD_OPTION,
                                    f"unsupported critical option {option_name(number)}".encode(), now)
                self._events.append(MessageRejected(peer, f"unsupported critical option {option_name(number)}",
                                                    request.mid, "4.02"))
                return
        observe = incoming.observe
        if observe is not None:
            existing = self._relations.get((peer, request.token))
            if existing is not None:
                # RFC 7641 section 3.6 deregistration, section 4.1 re-registration.
                self.cancel_relation(existing, "deregistered" if observe == 1 else "replaced")
        if incoming.has_block1:
            if not self._receive_block1(incoming, now):
                return
        else:
            refusal = self._block1_uploads.too_large(request.size1, len(request.payload))
            if refusal is not None:
                self._refuse(incoming, refusal, now)
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
                    self._send_response(incoming, block_of(stored[1], block2, self.params.block_szx), now)
                    return
        self._events.append(RequestReceived(incoming))

    def _receive_block1(self, incoming: IncomingRequest, now: float) -> bool:
        """Collect one uploaded block (RFC 7959 section 2.5); True when the body is complete."""
        request = incoming.request
        block1 = request.block1
        assert block1 is not None
        result = self._block1_uploads.receive(
            incoming.peer, cache_key(request), block1, request.payload, request.size1, now
        )
        if isinstance(result, BlockRefusal):
            self._refuse(incoming, result, now)
            return False
        if result is None:
            # RFC 7959 section 2.5: 2.31 Continue, possibly asking for smaller blocks.
            # A BERT block is acknowledged as BERT: a smaller SZX would tell the client fewer bytes arrived.
            szx = 7 if block1.szx == 7 else min(block1.szx, self.params.block_szx)
            incoming.answered = True
            self._send_response(
                incoming,
                response(Code.CONTINUE, options=[(OptionNumber.BLOCK1, encode_block(block1.num, True, szx, True))]),
                now,
            )
            return False
        incoming._block1 = block1
        request.options = [(n, v) for n, v in request.options if n != OptionNumber.BLOCK1 and n != OptionNumber.SIZE1]
        request.payload = result
        return True

    def _refuse(self, incoming: IncomingRequest, refusal: BlockRefusal, now: float) -> None:
        """A block or a body not taken: 4.00, 4.08, or 4.13 with Size1 telling the limit (RFC 7959 2.9.3)."""
        self.stats.block_errors += 1
        self.respond(incoming, response(refusal.code, refusal.diagnostic, options=refusal.response_options()), now)

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
        return block_of(whole, wanted, self.params.block_szx)

    def _send_response(self, incoming: IncomingRequest, answer: Message, now: float) -> None:
        """Piggyback on the ACK, or send separately (CON or NON) with a new MID."""
        request = incoming.request
        peer = incoming.peer
        answer.token = request.token
        if request.mtype == CON and not incoming.accepted:
            # The hot path: a piggybacked answer, remembered for duplicates (section 4.5).
            data = encode_message(ACK, answer.code, request.mid, request.token, answer.options, answer.payload)
            incoming.cache_answer(data)
            if incoming.static:
                self.static_answers.remember(incoming, data)
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
            if incoming.static:  # a GET over TCP (reliable.py); a NON datagram is never remembered
                self.static_answers.remember(incoming, data)
        self._send(data, peer)

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
            message = outgoing.block1_message(0)
        outgoing.sent_at = now
        self._send_request_message(outgoing, message, outgoing.token, now)

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
        self._arm_deadline(outgoing, outgoing.response_deadline(now, default))

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
        if block2 is not None and (block2.more or outgoing._assembly is not None):
            if not self._collect_block2(outgoing, message, block2, now):
                return
            assert outgoing._assembly is not None
            outgoing._assembly.complete(message)
            outgoing._assembly = None
        if outgoing.observe and message.observe is not None and message.code >> 5 == 2:
            first = outgoing._last_observe is None
            if not outgoing.observe_is_fresh(message.observe, now):
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
        self._send_request_message(outgoing, outgoing.block1_message(next_offset), outgoing._current_token, now)

    def _collect_block2(self, outgoing: OutgoingRequest, message: Message, block2: BlockValue, now: float) -> bool:
        """Append one Block2 slice; ask for the next one. True when the body is complete."""
        assembly = outgoing._assembly
        if block2.num == 0 or assembly is None:
            assembly = outgoing._assembly = Block2Assembly(message, self.params.max_response_body_size)
        failure = assembly.add(message, block2)
        if failure is not None:
            self.stats.block_errors += 1
            self._fail_request(outgoing, failure, now)
            return False
        if not block2.more:
            return True
        follow_up = block2_follow_up(outgoing.request, block2)
        self._send_request_message(outgoing, follow_up, self._new_token(outgoing.peer), now)
        return False

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

    def _start_transmission(self, peer: Peer, mid: int, data: bytes, owner: Owner, now: float) -> Transmission:
        """Track a CON for retransmission (RFC 7252 section 4.2)."""
        params = self.params
        timeout = params.ack_timeout * self._rng.uniform(1.0, params.ack_random_factor)
        transmission = Transmission(peer, mid, data, owner, timeout, now)
        self._transmissions[(peer, mid)] = transmission
        self._schedule(transmission.deadline, transmission)
        return transmission

    def _stop_transmission(self, transmission: Transmission) -> None:
        transmission.cancelled = True
        self._transmissions.pop((transmission.peer, transmission.mid), None)

    def _retransmit(self, transmission: Transmission, now: float) -> None:
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

    def _schedule(self, deadline: float, target: Transmission | OutgoingRequest) -> None:
        self._timer_seq += 1
        self.timer_version = self._timer_seq
        heapq.heappush(self._timers, (deadline, self._timer_seq, target))
