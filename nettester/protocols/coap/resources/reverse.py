"""``reverse-request`` and ``reverse-observe``: the server turns client (Californium's extended server).

A client POSTs to one of these and the server sends requests back to that
client's address, through the endpoint the POST came in on (so NATs and
load balancers are tested in the other direction too):

- ``POST /reverse-request?req=N&res=PATH[&more]``: 2.04 at once, then N GETs
  of ``/PATH?more`` to the client, one after the other (the next once the
  previous one is answered; an error response or a timeout ends the run).
  Without ``req`` and ``res``: 2.05 ``X reverse-requests, Y sent, Z pending.``
- ``POST /reverse-observe?obs=N&res=PATH[&timeout=S][&more]``: the server
  observes ``/PATH?more`` on the client. The POST is accepted at once and
  answered 2.04 with the observation's token (hex text, or its bytes for
  Accept: application/octet-stream) when the first notification arrives.
  After N notifications the server registers again; ``obs=0`` cancels the
  observation; ``timeout`` (default 30 s) ends an observation whose
  notifications stop. Without ``obs`` and ``res``: 2.04
  ``N active observes, M notifies.`` (or 4 + 8 bytes for octet-stream).

Bad numbers get 4.02 naming the query; a second POST for an observation
still being set up gets 5.03. Both are bounded: at most
``MAX_REVERSE_PEERS`` runs or observations at once.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from nettester.addresses import address_text
from nettester.logs import Logger
from nettester.protocols.coap.endpoint import Answer, CoapEndpoint, Observation
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.message import (
    CON,
    Code,
    ContentFormat,
    Message,
    OptionNumber,
    Peer,
    code_string,
    response,
)
from nettester.protocols.coap.resources.base import Exchange, Resource

log = Logger()

MAX_REVERSE_REQUESTS = 10_000_000  # Californium's limit for req= and obs=
MAX_REVERSE_PEERS = 4096
REVERSE_RESPONSE_TIMEOUT = 120.0  # seconds a reverse request may take (Californium: 120 s)
DEFAULT_NOTIFY_TIMEOUT = 30.0


def _number(argument: str, name: str) -> int | str:
    """The non-negative number of ``name=N``, or what is wrong with it (Californium's wording)."""
    try:
        value = int(argument[len(name) + 1:])
    except ValueError:
        return f"URI-query-option {argument} is no number!"
    if value < 0:
        return f"URI-query-option {argument} is negative number!"
    if value > MAX_REVERSE_REQUESTS:
        return f"URI-query-option {argument} is too large (max. {MAX_REVERSE_REQUESTS})!"
    return value


def _get(path: str, query: list[str]) -> Message:
    """The GET the server sends to the client."""
    options = [(OptionNumber.URI_PATH, segment.encode()) for segment in path.split("/") if segment]
    options += [(OptionNumber.URI_QUERY, argument.encode()) for argument in query]
    return Message(CON, Code.GET, 0, b"", options)


def _bad_option(text: str) -> Message:
    return response(Code.BAD_OPTION, text.encode(), ContentFormat.TEXT_PLAIN)


class ReverseRequest(Resource):
    """``reverse-request``: see the module docstring."""

    def __init__(self) -> None:
        super().__init__("reverse-request", (("ct", "0 42"), ("title", "Reverse Request")))
        self.overall = 0
        self.sent = 0
        self.pending = 0
        self._runs = 0

    def post(self, exchange: Exchange) -> Answer:
        accept = exchange.request.accept
        if accept is not None and accept != ContentFormat.OCTET_STREAM:
            return response(Code.NOT_ACCEPTABLE)
        count: int | None = None
        path: str | None = None
        forwarded: list[str] = []
        for argument in exchange.request.uri_query:
            if argument.startswith("req="):
                number = _number(argument, "req")
                if isinstance(number, str):
                    return _bad_option(number)
                count = number
            elif argument.startswith("res="):
                path = argument[4:]
            else:
                forwarded.append(argument)
        if path is None or count is None:
            return response(Code.CONTENT, f"{self.overall} reverse-requests, {self.sent} sent, "
                                          f"{self.pending} pending.".encode(), ContentFormat.TEXT_PLAIN)
        if self._runs >= MAX_REVERSE_PEERS:
            return response(Code.SERVICE_UNAVAILABLE, b"too many reverse-request runs")
        self.overall += count
        self.pending += count
        log.info("{peer}/{resource}: {count} reverse requests, {overall} overall", event="coap_reverse_requests",
                 peer=address_text(exchange.peer_context().address), resource=path, count=count, overall=self.overall)
        if count:
            self._runs += 1
            request = _get(path, forwarded)
            exchange.site.reactor.callLater(0, self._send, exchange.endpoint, exchange.peer, request, count)
        return response(Code.CHANGED)

    def _send(self, endpoint: CoapEndpoint, peer: Peer, template: Message, remaining: int) -> None:
        self.sent += 1
        request = Message(CON, template.code, 0, b"", list(template.options))
        answered = endpoint.request(peer, request, timeout=REVERSE_RESPONSE_TIMEOUT)
        answered.addCallbacks(self._answered, self._failed, (endpoint, peer, template, remaining),
                              errbackArgs=(peer, remaining))

    def _answered(self, event: ResponseReceived, endpoint: CoapEndpoint, peer: Peer, template: Message,
                  remaining: int) -> None:
        if event.response.code >> 5 != 2:
            log.info("reverse request to {peer}: error {code}, {pending} pending", event="coap_reverse_error",
                     peer=address_text(peer), code=code_string(event.response.code), pending=remaining)
            self._done(remaining)
            return
        self.pending -= 1
        if remaining > 1:
            self._send(endpoint, peer, template, remaining - 1)
        else:
            self._done(0)

    def _failed(self, failure: Failure, peer: Peer, remaining: int) -> None:
        log.debug("reverse request to {peer} failed: {reason}, {pending} pending", event="coap_reverse_failed",
                  peer=address_text(peer), reason=failure.getErrorMessage(), pending=remaining)
        self._done(remaining)

    def _done(self, remaining: int) -> None:
        self.pending -= remaining
        self._runs -= 1


class _ReverseObservation:
    """One observation the server holds on a client, re-registered every ``count`` notifications."""

    def __init__(self, owner: ReverseObserve, key: tuple[str, Peer, str], endpoint: CoapEndpoint, peer: Peer,
                 request: Message, count: int, timeout: float, answer: Callable[[Message], None]) -> None:
        self.owner = owner
        self.key = key
        self.endpoint = endpoint
        self.peer = peer
        self.request = request
        self.count = count
        self.timeout = timeout
        self.token: bytes | None = None
        self._answer: Callable[[Message], None] | None = answer
        self._observation: Observation | None = None
        self._notifications = 0
        self._watchdog: IDelayedCall | None = None

    @property
    def established(self) -> bool:
        return self.token is not None

    def start(self) -> None:
        """Register (again): a GET with Observe: 0 to the client."""
        message = Message(CON, Code.GET, 0, b"", list(self.request.options))
        self._notifications = 0
        observation = self._observation = self.endpoint.observe(self.peer, message, self._notified)
        observation.finished.addCallbacks(self._ended, self._failed, callbackArgs=(observation,),
                                          errbackArgs=(observation,))
        self._arm()

    def cancel(self) -> None:
        """End it for good (obs=0, or the notifications stopped)."""
        self._disarm()
        self.owner.forget(self)
        observation, self._observation = self._observation, None
        if observation is not None:
            observation.cancel()

    def _notified(self, event: ResponseReceived) -> None:
        self.owner.notifies += 1
        self._notifications += 1
        self._arm()
        if self._answer is not None:
            self.token = event.request.token
            answer, self._answer = self._answer, None
            answer(response(Code.CHANGED, self.token.hex().encode(), ContentFormat.TEXT_PLAIN))
        if self.count and self._notifications >= self.count and self._observation is not None:
            # Californium re-registers after obs=N notifications.
            previous, self._observation = self._observation, None
            previous.cancel(deregister=False)
            self.start()

    def _ended(self, event: ResponseReceived, observation: Observation) -> None:
        """The client answered without Observe (not established) or ended the observation."""
        if observation is not self._observation:
            return
        code = event.response.code if event.response.code >> 5 != 2 else Code.NOT_ACCEPTABLE
        log.info("reverse observation of {peer} not established: {code}", event="coap_reverse_observe_ended",
                 peer=address_text(self.peer), code=code_string(event.response.code))
        self._end(code)

    def _failed(self, failure: Failure, observation: Observation) -> None:
        if observation is not self._observation:
            return
        log.debug("reverse observation of {peer} failed: {reason}", event="coap_reverse_observe_failed",
                  peer=address_text(self.peer), reason=failure.getErrorMessage())
        self._end(Code.SERVICE_UNAVAILABLE)

    def _end(self, code: int) -> None:
        self._observation = None
        self._disarm()
        self.owner.forget(self)
        if self._answer is not None:
            answer, self._answer = self._answer, None
            answer(response(code))

    def _arm(self) -> None:
        self._disarm()
        if self.timeout:
            self._watchdog = self.owner.site.reactor.callLater(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _timed_out(self) -> None:
        self._watchdog = None
        log.info("reverse observation of {peer}: no notification for {timeout:g} s, cancelled",
                 event="coap_reverse_observe_timeout", peer=address_text(self.peer), timeout=self.timeout)
        if self._answer is not None:
            answer, self._answer = self._answer, None
            answer(response(Code.SERVICE_UNAVAILABLE, b"no notification"))
        self.cancel()


class ReverseObserve(Resource):
    """``reverse-observe``: see the module docstring."""

    def __init__(self) -> None:
        super().__init__("reverse-observe", (("ct", "0 42"), ("title", "Reverse Observe")))
        self.notifies = 0
        self.observations: dict[tuple[str, Peer, str], _ReverseObservation] = {}

    def forget(self, observation: _ReverseObservation) -> None:
        if self.observations.get(observation.key) is observation:
            del self.observations[observation.key]

    def post(self, exchange: Exchange) -> Answer:
        request = exchange.request
        accept = request.accept
        if accept not in (None, ContentFormat.TEXT_PLAIN, ContentFormat.OCTET_STREAM):
            return response(Code.NOT_ACCEPTABLE)
        count: int | None = None
        timeout = DEFAULT_NOTIFY_TIMEOUT
        path: str | None = None
        forwarded: list[str] = []
        for argument in request.uri_query:
            if argument.startswith("obs="):
                number = _number(argument, "obs")
                if isinstance(number, str):
                    return _bad_option(number)
                count = number
            elif argument.startswith("timeout="):
                number = _number(argument, "timeout")
                if isinstance(number, str):
                    return _bad_option(number)
                timeout = float(number)
            elif argument.startswith("res="):
                path = argument[4:]
            else:
                forwarded.append(argument)
        if count is None or path is None:
            if accept == ContentFormat.OCTET_STREAM:
                return response(Code.CHANGED, struct.pack(">IQ", len(self.observations), self.notifies),
                                ContentFormat.OCTET_STREAM)
            return response(Code.CHANGED, f"{len(self.observations)} active observes, {self.notifies} notifies."
                            .encode(), ContentFormat.TEXT_PLAIN)
        context = exchange.peer_context()
        key = (context.scheme, exchange.peer, path)
        existing = self.observations.get(key)
        if count == 0:
            if existing is not None:
                log.info("{peer}: reverse observation of {resource} cancelled on request",
                         event="coap_reverse_observe_cancel", peer=address_text(context.address), resource=path)
                existing.cancel()
            return response(Code.CHANGED)
        if existing is not None and not existing.established:
            return response(Code.SERVICE_UNAVAILABLE, b"an observation is being set up")
        if existing is None and len(self.observations) >= MAX_REVERSE_PEERS:
            return response(Code.SERVICE_UNAVAILABLE, b"too many reverse observations")
        if existing is not None:
            existing.cancel()
        exchange.accept()
        answered: defer.Deferred[Message] = defer.Deferred()
        octets = accept == ContentFormat.OCTET_STREAM

        def answer(message: Message) -> None:
            if octets and message.code == Code.CHANGED:
                message = response(Code.CHANGED, bytes.fromhex(message.payload.decode()), ContentFormat.OCTET_STREAM)
            answered.callback(message)

        observation = _ReverseObservation(self, key, exchange.endpoint, exchange.peer,
                                          _get(path, forwarded), count, timeout, answer)
        self.observations[key] = observation
        log.info("{peer}: reverse observation of {resource}, re-registered every {count} notifications",
                 event="coap_reverse_observe", peer=address_text(context.address), resource=path, count=count)
        observation.start()
        return answered

    def close(self) -> None:
        for observation in list(self.observations.values()):
            observation.cancel()
        super().close()
