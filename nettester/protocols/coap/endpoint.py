"""Twisted adapter: a ``CoapLayer`` over any IDatagramLink.

The endpoint feeds the sans-IO layer with datagrams and ``reactor.seconds()``
through the shared ``nettester.pump.CorePump``: it writes what the layer wants
written, dispatches its events (requests to the handler, responses to the
Deferreds of ``request``), and re-arms a single IDelayedCall for the layer's
next deadline, asking for it only when the layer's ``timer_version`` moved.

It runs unchanged over plain UDP (``nettester.udplink.UdpLink``) and
over the DTLS endpoint, because it only sees ``IDatagramLink``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.addresses import address_text
from nettester.interfaces import IDatagramLink, IDatagramReceiver
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.protocols.coap.events import (
    Event,
    MessageRejected,
    ObserveCancelled,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation, OutgoingRequest
from nettester.protocols.coap.layer import CoapLayer
from nettester.protocols.coap.message import Code, Message, OptionNumber, Peer, response
from nettester.protocols.coap.parameters import LayerStats, TransmissionParameters
from nettester.pump import CorePump

log = Logger()

Answer = Message | defer.Deferred[Message] | None


class RequestHandler(Protocol):
    """What serves requests: the resource tree of a server role."""

    def handle_request(self, incoming: IncomingRequest) -> Answer:
        """Answer now (a Message), later (a Deferred), or by calling the
        endpoint's ``respond`` itself (None)."""

    def observe_cancelled(self, relation: ObserveRelation, reason: str) -> None:
        """An observer went away (RFC 7641: reset, timeout, deregistration)."""


class CoapRequestError(Exception):
    """A request of ours ended without a response (``timeout``, ``reset``...)."""

    def __init__(self, request: OutgoingRequest, reason: str) -> None:
        super().__init__(f"{request.request.describe()} to {address_text(request.peer)}: {reason}")
        self.request = request
        self.reason = reason


class Observation:
    """A client-side observation: notifications go to a callback until it ends.

    ``finished`` fires with the final ``ResponseReceived`` (the server
    answered without Observe, or the deregistration was answered) or fails
    with ``CoapRequestError``.
    """

    def __init__(self, endpoint: CoapEndpoint, request: OutgoingRequest) -> None:
        self._endpoint = endpoint
        self.request = request
        self.finished: defer.Deferred[ResponseReceived] = defer.Deferred()

    def cancel(self, deregister: bool = True) -> None:
        """End it: proactively (GET with Observe: 1) or by forgetting it (RFC 7641 3.6)."""
        self._endpoint._cancel(self.request, deregister)


@implementer(IDatagramReceiver)
class CoapEndpoint:
    """A CoAP endpoint (server and client) on one datagram link."""

    #: The sans-IO layer it drives (the reliable-transport one for TCP and TLS).
    layer_class: type[CoapLayer] = CoapLayer

    def __init__(
        self,
        link: IDatagramLink,
        reactor: IReactorTime,
        handler: RequestHandler | None = None,
        params: TransmissionParameters | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.link = link
        self.handler = handler
        self._clock = reactor
        self.core = self.layer_class(reactor.seconds(), params, rng)
        #: writes what the layer queued, dispatches its events, keeps its one timer
        self._core_pump = CorePump(reactor, self.core, link.send_datagram, self._dispatch)
        self._waiting: dict[OutgoingRequest, tuple[defer.Deferred[ResponseReceived], Observation | None,
                                                   Callable[[ResponseReceived], None] | None]] = {}
        link.receiver = self

    @property
    def stats(self) -> LayerStats:
        """The layer's counters."""
        return self.core.stats

    def peer_context(self, peer: Peer) -> PeerContext:
        """The link's view of a peer (address, security context)."""
        return self.link.peer_context(peer)

    # ------------------------------------------------------------ IDatagramReceiver

    def datagramReceived(self, data: bytes, peer: Peer) -> None:
        self._core_pump.receive(data, peer)

    # ------------------------------------------------------------ server side

    def respond(self, incoming: IncomingRequest, answer: Message) -> ObserveRelation | None:
        """Answer a request; returns the observe relation when one was registered."""
        relation = self.core.respond(incoming, answer, self._clock.seconds())
        self._pump()
        return relation

    def accept(self, incoming: IncomingRequest) -> None:
        """Send the empty ACK of a separate response now (RFC 7252 section 5.2.2)."""
        self.core.accept(incoming)
        self._pump()

    def notify(self, relation: ObserveRelation, notification: Message, confirmable: bool) -> None:
        """Send an observe notification (RFC 7641 section 4.2)."""
        self.core.notify(relation, notification, self._clock.seconds(), confirmable)
        self._pump()

    def cancel_relation(self, relation: ObserveRelation, reason: str) -> None:
        """Drop an observer from the server side."""
        self.core.cancel_relation(relation, reason)
        self._pump()

    # ------------------------------------------------------------ client side

    def request(
        self, peer: Peer, message: Message, response_timeout: float | None = None, timeout: float | None = None
    ) -> defer.Deferred[ResponseReceived]:
        """Send a request to a peer handle; fires with the (reassembled) response.

        ``timeout`` bounds the whole request, retransmissions included
        (see ``CoapLayer.request``); it fails with reason ``timeout``.
        """
        outgoing = self.core.request(peer, message, self._clock.seconds(), response_timeout, timeout)
        result: defer.Deferred[ResponseReceived] = defer.Deferred()
        self._waiting[outgoing] = (result, None, None)
        self._pump()
        return result

    def request_address(
        self, address: tuple[str, int], message: Message, response_timeout: float | None = None
    ) -> defer.Deferred[ResponseReceived]:
        """Like ``request``, after the link connected (resolution, DTLS handshake)."""
        connecting: defer.Deferred[Peer] = self.link.connect(address)
        return connecting.addCallback(lambda peer: self.request(peer, message, response_timeout))

    def observe(
        self, peer: Peer, message: Message, on_notification: Callable[[ResponseReceived], None]
    ) -> Observation:
        """Register for notifications (``Observe: 0`` is set here); each one goes to the callback."""
        message.set_option(OptionNumber.OBSERVE, b"")  # register (RFC 7641 section 2)
        outgoing = self.core.request(peer, message, self._clock.seconds())
        observation = Observation(self, outgoing)
        self._waiting[outgoing] = (observation.finished, observation, on_notification)
        self._pump()
        return observation

    def ping(self, peer: Peer) -> defer.Deferred[ResponseReceived]:
        """CoAP ping: fires when the peer's Reset arrives (RFC 7252 section 4.3)."""
        outgoing = self.core.ping(peer, self._clock.seconds())
        result: defer.Deferred[ResponseReceived] = defer.Deferred()
        self._waiting[outgoing] = (result, None, None)
        self._pump()
        return result

    def _cancel(self, outgoing: OutgoingRequest, deregister: bool) -> None:
        self.core.cancel(outgoing, self._clock.seconds(), deregister)
        if outgoing.done:
            waiting = self._waiting.pop(outgoing, None)
            if waiting is not None:
                waiting[0].errback(CoapRequestError(outgoing, "cancelled"))
        self._pump()

    def stop(self) -> None:
        """Stop the timer for good (the link is closed by its owner)."""
        self._core_pump.stop()

    # ------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """Write datagrams, dispatch events, re-arm the timer (``CorePump``; re-entrant calls fold in)."""
        self._core_pump.pump()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, RequestReceived):
            self._serve(event.request)
        elif isinstance(event, ResponseReceived):
            self._deliver(event)
        elif isinstance(event, RequestFailed):
            log.debug("{request} failed: {reason}", event="coap_request_failed", request=event.request,
                      reason=event.reason)
            waiting = self._waiting.pop(event.request, None)
            if waiting is not None:
                waiting[0].errback(CoapRequestError(event.request, event.reason))
        elif isinstance(event, MessageRejected):
            log.debug("rejected a datagram from {peer} (MID {mid}): {reason}; answered {answer}",
                      event="coap_rejected", peer=address_text(event.peer), mid=event.mid, reason=event.reason,
                      answer=event.answer or "nothing")
        elif isinstance(event, ObserveCancelled):
            log.debug("observer {relation} cancelled: {reason}", event="coap_observe_cancelled",
                      relation=event.relation, reason=event.reason)
            if self.handler is not None:
                self.handler.observe_cancelled(event.relation, event.reason)

    def _serve(self, incoming: IncomingRequest) -> None:
        handler = self.handler
        if handler is None:
            self.core.respond(incoming, response(Code.NOT_FOUND), self._clock.seconds())
            return
        try:
            answer = handler.handle_request(incoming)
        except Exception:
            log.failure("handler failed on {request}", event="coap_handler_error", request=incoming)
            answer = response(Code.INTERNAL_SERVER_ERROR)
        if isinstance(answer, Message):
            self.core.respond(incoming, answer, self._clock.seconds())
        elif isinstance(answer, defer.Deferred):
            answer.addCallbacks(
                lambda later: self._respond_later(incoming, later),
                lambda failure: self._fail_later(incoming, failure),
            )

    def _respond_later(self, incoming: IncomingRequest, answer: Message) -> None:
        if not incoming.answered:
            self.respond(incoming, answer)

    def _fail_later(self, incoming: IncomingRequest, failure: Failure) -> None:
        log.failure("handler failed on {request}", failure, event="coap_handler_error", request=incoming)
        self._respond_later(incoming, response(Code.INTERNAL_SERVER_ERROR))

    def _deliver(self, event: ResponseReceived) -> None:
        outgoing = event.request
        if outgoing.done:
            waiting = self._waiting.pop(outgoing, None)
            if waiting is not None:
                waiting[0].callback(event)
            return
        waiting = self._waiting.get(outgoing)
        if waiting is None:
            return
        if waiting[2] is not None:
            waiting[2](event)
            return
        # An Observe: 0 sent through request(): the first answer is the result,
        # and the observation is forgotten (later notifications get a Reset).
        del self._waiting[outgoing]
        self.core.cancel(outgoing, self._clock.seconds(), deregister=False)
        waiting[0].callback(event)
