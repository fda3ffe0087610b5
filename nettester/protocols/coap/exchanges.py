"""Handles of the CoAP layer's exchanges: requests served, requests sent, observers, CON messages in flight.

The application holds ``IncomingRequest`` until it answers and
``OutgoingRequest`` until the final response; the layer keeps its
per-exchange state in their private slots.
"""

from __future__ import annotations

from collections.abc import Hashable

from nettester.addresses import address_text
from nettester.protocols.coap.blockwise import Block2Assembly, block1_request
from nettester.protocols.coap.message import BlockValue, Message, OptionNumber, Peer, decode_block

# RFC 7641 section 3.4: notifications more than 128 s apart are always fresh.
OBSERVE_FRESHNESS_SECONDS = 128.0


class IncomingRequest:
    """A request received from a peer, waiting for the application's answer.

    ``request`` is the whole request: after a block-wise upload its payload
    is the reassembled body and its Block1 option is gone.
    """

    __slots__ = (
        "peer", "request", "observe", "accept", "block2", "has_block1", "answered", "accepted", "static",
        "_dedup_bucket", "_dedup_key", "_block1", "_datagram",
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
        #: Set by the resource tree: the answer is a function of the request's bytes alone, so the layer may
        #: answer the next identical plain GET from memory (``static.StaticAnswers``).
        self.static = False
        self._dedup_bucket: dict[Hashable, bytes | None] | None = None
        self._dedup_key: Hashable = None
        self._block1: BlockValue | None = None
        self._datagram: bytes | None = None  # a CON GET's datagram, for the static answers

    def __repr__(self) -> str:
        return f"<IncomingRequest {self.request.describe()} from {address_text(self.peer)}>"

    def cache_answer(self, data: bytes) -> None:
        """Remember what answered this CON so a duplicate gets it again (RFC 7252 section 4.5)."""
        bucket = self._dedup_bucket
        if bucket is not None:
            bucket[self._dedup_key] = data


class OutgoingRequest:
    """A request this endpoint sent (client side), until its final response.

    An observe registration stays open after the first response: every
    notification is another ``ResponseReceived`` until it is cancelled.
    """

    __slots__ = (
        "peer", "request", "token", "observe", "done", "sent_at", "mid",
        "_current_token", "_body", "_block1_offset", "_block1_sent", "_block1_szx", "_assembly",
        "_last_observe", "_response_deadline", "_response_timeout", "_expires", "_transmission",
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
        self._assembly: Block2Assembly | None = None
        self._last_observe: tuple[int, float] | None = None
        self._response_deadline: float | None = None
        self._response_timeout = response_timeout
        self._expires: float | None = None
        self._transmission: Transmission | None = None
        self._holds_slot = False

    def __repr__(self) -> str:
        return (f"<OutgoingRequest {self.request.describe()} to {address_text(self.peer)}: latest MID={self.mid} "
                f"token={self.token.hex() or '-'}>")

    def block1_message(self, offset: int) -> Message:
        """The request carrying the Block1 slice at ``offset`` (RFC 7959 section 2.5)."""
        message = block1_request(self.request, self._body, offset, self._block1_szx)
        self._block1_offset = offset
        self._block1_sent = len(message.payload)
        return message

    def response_deadline(self, now: float, default: float) -> float:
        """When the wait for a response ends: its response timeout (else ``default``) from now, within ``timeout``."""
        timeout = self._response_timeout if self._response_timeout is not None else default
        deadline = now + timeout
        if self._expires is not None and self._expires < deadline:
            deadline = self._expires
        return deadline

    def observe_is_fresh(self, value: int, now: float) -> bool:
        """RFC 7641 section 3.4, the client's reordering check: is notification ``value`` newer than
        the last one (24-bit serial arithmetic, or more than 128 s later)? Remembers it if so."""
        last = self._last_observe
        fresh = (
            last is None
            or (last[0] < value and value - last[0] < (1 << 23))
            or (last[0] > value and last[0] - value > (1 << 23))
            or now > last[1] + OBSERVE_FRESHNESS_SECONDS
        )
        if fresh:
            self._last_observe = (value, now)
        return fresh


class ObserveRelation:
    """A server-side observer (RFC 7641 section 4.1): a peer, a token and the request.

    ``content_format`` is the format of the registration's response: every
    notification must keep it (section 4.2).
    """

    __slots__ = ("peer", "token", "request", "active", "sequence", "content_format", "_transmission", "_non_mid",
                 "_non_in_a_row", "_last_con")

    def __init__(self, peer: Hashable, token: bytes, request: Message, sequence: int, now: float) -> None:
        self.peer = peer
        self.token = token
        self.request = request
        self.active = True
        self.sequence = sequence
        self.content_format: int | None = None
        self._transmission: Transmission | None = None
        self._non_mid: int | None = None
        self._non_in_a_row = 0
        self._last_con = now

    def __repr__(self) -> str:
        return f"<ObserveRelation {self.request.path_string} of {address_text(self.peer)}>"


Owner = OutgoingRequest | ObserveRelation | IncomingRequest


class Transmission:
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


def timer_is_stale(entry: tuple[float, int, Transmission | OutgoingRequest]) -> bool:
    """Whether a (deadline, sequence, target) entry of the layer's timer heap was cancelled or moved."""
    deadline, _, target = entry
    if isinstance(target, Transmission):
        return target.cancelled or target.deadline != deadline
    return target.done or target._response_deadline != deadline
