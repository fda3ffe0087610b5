"""The ``coap-client`` role: one request (or an observation), printed in readable blocks.

``nettester coap-client --method GET coaps://127.0.0.1:5784/mycontext``
prints the request, then each response with its code, options, RTT and
payload. Block-wise transfers are transparent (the layer reassembles them).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import cbor2
from twisted.application.service import Service
from twisted.internet import defer

from nettester.interfaces import IDatagramLink
from nettester.logs import Logger
from nettester.protocols.coap.endpoint import CoapEndpoint, CoapRequestError, Observation
from nettester.protocols.coap.layer import ResponseReceived
from nettester.protocols.coap.message import (
    CON,
    NON,
    OPTION_SPECS,
    Code,
    ContentFormat,
    Message,
    MessageType,
    OptionFormat,
    OptionNumber,
    code_name,
    decode_block,
    encode_uint,
    media_type,
    option_name,
)
from nettester.udplink import UdpLink

log = Logger()

DEFAULT_PORTS = {"coap": 5683, "coaps": 5684}  # RFC 7252 sections 6.1 and 6.2
METHODS = {"GET": Code.GET, "POST": Code.POST, "PUT": Code.PUT, "DELETE": Code.DELETE,
           "FETCH": Code.FETCH, "PATCH": Code.PATCH, "IPATCH": Code.IPATCH}
_PRINTABLE = set(string.printable)


@dataclass(frozen=True)
class CoapUri:
    """A parsed ``coap://`` / ``coaps://`` URI (RFC 7252 section 6.4)."""

    scheme: str
    host: str
    port: int
    path: tuple[str, ...]
    query: tuple[str, ...]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for IDatagramLink.connect."""
        return (self.host, self.port)


def parse_uri(text: str) -> CoapUri:
    """Split a CoAP URI into host, port, path segments and query arguments."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"expected a coap:// or coaps:// URI, got {text!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {text!r}")
    if parts.fragment:
        raise ValueError("a CoAP URI has no fragment (RFC 7252 section 6.4)")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    # Section 6.4 steps 8-9: one Uri-Path per segment, one Uri-Query per argument, percent-decoded.
    segments = tuple(unquote(segment) for segment in parts.path.split("/")[1:])
    if segments == ("",):
        segments = ()
    query = tuple(unquote(argument) for argument in parts.query.split("&") if argument) if parts.query else ()
    return CoapUri(scheme, parts.hostname, port, segments, query)


def build_request(uri: CoapUri, method: str, payload: bytes = b"", confirmable: bool = True,
                  content_format: int | None = None, accept: int | None = None) -> Message:
    """The request message for ``uri``."""
    options: list[tuple[int, bytes]] = [(OptionNumber.URI_PATH, segment.encode()) for segment in uri.path]
    options += [(OptionNumber.URI_QUERY, argument.encode()) for argument in uri.query]
    if content_format is not None:
        options.append((OptionNumber.CONTENT_FORMAT, encode_uint(content_format)))
    if accept is not None:
        options.append((OptionNumber.ACCEPT, encode_uint(accept)))
    return Message(CON if confirmable else NON, METHODS[method.upper()], 0, b"", options, payload)


def format_option(number: int, value: bytes) -> str:
    """``Name: value`` with the value shown the way its format reads best."""
    spec = OPTION_SPECS.get(number)
    if number in (OptionNumber.CONTENT_FORMAT, OptionNumber.ACCEPT):
        shown = f"{int.from_bytes(value, 'big')} ({media_type(int.from_bytes(value, 'big'))})"
    elif number in (OptionNumber.BLOCK1, OptionNumber.BLOCK2):
        block = decode_block(value)
        shown = f"{block.num}/{int(block.more)}/{block.size}"
    elif spec is not None and spec.format is OptionFormat.UINT:
        shown = str(int.from_bytes(value, "big"))
    elif spec is not None and spec.format is OptionFormat.STRING:
        shown = value.decode("utf-8", "replace")
    elif spec is not None and spec.format is OptionFormat.EMPTY:
        shown = "(empty)"
    else:
        shown = "0x" + value.hex() if value else "(empty)"
    return f"{option_name(number)}: {shown}"


def format_payload(payload: bytes, content_format: int | None) -> str:
    """Text as is, JSON and CBOR pretty-printed, anything else in hex."""
    if not payload:
        return "(no payload)"
    if content_format == ContentFormat.CBOR:
        try:
            return json.dumps(cbor2.loads(payload), indent=2, default=repr)
        except (cbor2.CBORDecodeError, ValueError, TypeError):
            pass
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.hex(" ")
    if content_format == ContentFormat.JSON:
        try:
            return json.dumps(json.loads(text), indent=2)
        except ValueError:
            pass
    if all(char in _PRINTABLE for char in text):
        return text
    return payload.hex(" ")


def format_message(title: str, message: Message, rtt: float | None = None) -> str:
    """A readable block: title, type/code/MID/token, options, RTT, payload."""
    lines = [f"==[ {title} ]" + "=" * max(0, 60 - len(title)),
             f"{MessageType(message.mtype).name} {code_name(message.code)}  MID={message.mid}  "
             f"Token={message.token.hex() or '-'}"]
    lines += ["  " + format_option(number, value) for number, value in sorted(message.options, key=lambda o: o[0])]
    if rtt is not None:
        lines.append(f"RTT: {rtt * 1000:.1f} ms")
    lines.append("Payload (%d bytes):" % len(message.payload))
    lines.append(format_payload(message.payload, message.content_format))
    return "\n".join(lines)


class CoapClientService(Service):
    """Sends one request (or observes N notifications), prints, then stops the reactor."""

    def __init__(self, reactor: Any, uri: CoapUri, request: Message, link: IDatagramLink, stdout: IO[str],
                 observe: int = 0, timeout: float = 60.0) -> None:
        self._reactor = reactor
        self.uri = uri
        self.request = request
        self.link = link
        self.stdout = stdout
        self.observe = observe
        self.timeout = timeout
        self.exit_status = 1
        self.done: defer.Deferred[int] = defer.Deferred()
        self._port: Any = None
        self._endpoint: CoapEndpoint | None = None
        self._observation: Observation | None = None
        self._notifications = 0

    def startService(self) -> None:
        super().startService()
        self._port = self._reactor.listenUDP(0, self.link, interface="::" if ":" in self.uri.host else "")
        self._endpoint = CoapEndpoint(self.link, self._reactor)
        self._print(format_message(f"request to {self.uri.scheme}://{self.uri.host}:{self.uri.port}", self.request))
        connecting = self.link.connect(self.uri.address)
        connecting.addTimeout(self.timeout, self._reactor)
        connecting.addCallback(self._send)
        connecting.addCallbacks(self._finished, self._failed)

    def _send(self, peer: Any) -> defer.Deferred[ResponseReceived]:
        assert self._endpoint is not None
        if self.observe:
            self._observation = self._endpoint.observe(peer, self.request, self._notified)
            return self._observation.finished
        return self._endpoint.request(peer, self.request, response_timeout=self.timeout)

    def _notified(self, event: ResponseReceived) -> None:
        self._notifications += 1
        title = "response" if self._notifications == 1 else f"notification {self._notifications - 1}"
        self._print(format_message(title, event.response, event.rtt))
        if self._notifications > self.observe and self._observation is not None:
            self._observation.cancel()  # proactive deregistration (RFC 7641 section 3.6)

    def _finished(self, event: ResponseReceived) -> None:
        self._print(format_message("final response" if self.observe else "response", event.response, event.rtt))
        self._stop(0 if event.response.code >> 5 == 2 else 1)

    def _failed(self, failure: Any) -> None:
        reason = failure.value.reason if failure.check(CoapRequestError) else failure.getErrorMessage()
        self._print(f"==[ no response ]== {reason}")
        self._stop(1)

    def _print(self, text: str) -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _stop(self, status: int) -> None:
        self.exit_status = status
        if self._endpoint is not None:
            self._endpoint.stop()
        if self._port is not None:
            self._port.stopListening()
        self.done.callback(status)


def make_link(reactor: Any, uri: CoapUri, dtls_configuration: Any = None) -> IDatagramLink:
    """UDP for ``coap://``; a client DtlsEndpoint for ``coaps://`` (needs a configuration)."""
    if uri.scheme == "coap":
        return UdpLink(resolver=reactor)
    if dtls_configuration is None:
        raise ValueError("coaps:// needs --identity/--secret or --cert/--key")
    from nettester.protocols.dtls.endpoint import DtlsEndpoint

    return DtlsEndpoint(reactor, client_configuration=dtls_configuration)


def make_client_service(reactor: Any, options: Any, stdout: IO[str]) -> CoapClientService:
    """The role's service from parsed :class:`CoapClientOptions`; ends the process when done."""
    uri = options["uri"]
    request = build_request(uri, options["method"], options["payload"].encode(), not options["non"],
                            options["content-format"], options["accept"])
    service = CoapClientService(reactor, uri, request, make_link(reactor, uri, options["dtls"]), stdout,
                                options["observe"], options["timeout"])

    def end(status: int) -> None:
        from nettester.tap import set_exit_status

        set_exit_status(status)
        reactor.stop()

    service.done.addCallback(end)
    return service
