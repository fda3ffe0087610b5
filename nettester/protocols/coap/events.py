"""Events the sans-IO CoAP layer hands to the application (``CoapLayer.next_event()``).

Frozen dataclasses with one base class, as aioquic's ``events.py``: the
adapter dispatches on the class, tests compare them as plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nettester.protocols.coap.message import Message, Peer

if TYPE_CHECKING:
    from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation, OutgoingRequest


@dataclass(frozen=True, slots=True)
class CoapEvent:
    """Base class of every event of the CoAP layer."""


@dataclass(frozen=True, slots=True)
class RequestReceived(CoapEvent):
    """A complete request for the application; answer it with ``respond``."""

    request: IncomingRequest


@dataclass(frozen=True, slots=True)
class ResponseReceived(CoapEvent):
    """A (reassembled) response or notification for one of our requests."""

    request: OutgoingRequest
    response: Message
    rtt: float | None


@dataclass(frozen=True, slots=True)
class RequestFailed(CoapEvent):
    """One of our requests ended without a response: timeout, reset, ..."""

    request: OutgoingRequest
    reason: str


@dataclass(frozen=True, slots=True)
class ObserveCancelled(CoapEvent):
    """A server-side observe relation ended: deregistered, reset, timeout, replaced."""

    relation: ObserveRelation
    reason: str


@dataclass(frozen=True, slots=True)
class MessageRejected(CoapEvent):
    """A datagram that was not acceptable CoAP: counted, answered or dropped.

    ``mid`` is None when even the header was unreadable; ``answer`` names what
    was sent back (``RST``, ``4.02``) or is None for a silent drop.
    """

    peer: Peer
    reason: str
    mid: int | None
    answer: str | None


Event = RequestReceived | ResponseReceived | RequestFailed | ObserveCancelled | MessageRejected
