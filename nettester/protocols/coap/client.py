"""The ``coap-client`` role: one request (or an observation), printed in readable blocks.

``nettester coap-client --method GET coaps://127.0.0.1:5784/mycontext``
prints the request, then each response with its code, options, RTT and
payload. Block-wise transfers are transparent (the layer reassembles them).
"""

from __future__ import annotations

import errno
import json
import socket
import string
from collections.abc import Callable
from typing import IO, Any

import cbor2
from twisted.application.service import IService, Service
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.error import DNSLookupError, ReactorNotRunning
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.addresses import address_text
from nettester.interfaces import IDatagramLink
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.protocols.coap.endpoint import (
    CoapEndpoint,
    CoapRequestError,
    Observation,
)
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.message import (
    OPTION_SPECS,
    ContentFormat,
    Message,
    MessageType,
    OptionFormat,
    OptionNumber,
    code_name,
    decode,
    decode_block,
    media_type,
    option_name,
)
from nettester.protocols.coap.parameters import MAX_TRANSMIT_WAIT
from nettester.protocols.coap.tcplink import TcpLink, endpoint_class
from nettester.protocols.coap.tls import client_tls

# parse_uri is re-exported: the bench and receive-test roles and their tests import it from here.
from nettester.protocols.coap.uri import CoapUri, build_request, parse_uri  # noqa: F401
from nettester.protocols.dtls.endpoint import DtlsEndpoint, DtlsPeer
from nettester.service import set_exit_status
from nettester.udplink import UdpLink, UdpPeer

log = Logger()

MAX_DATAGRAM = 65535  # read whole datagrams: a DTLS flight may come as one large one

# Exit statuses of the client roles (2 is nettester's own: a bad command line).
EXIT_SUCCESS = 0  # a 2.xx response (coap-bench: every request answered)
EXIT_ERROR_RESPONSE = 1  # the server answered with another code (coap-bench: some requests failed)
EXIT_NO_RESPONSE = 3  # no answer at all: nobody listening, timeout, Reset, DTLS handshake failed
_PRINTABLE = set(string.printable)


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


def format_message(title: str, message: Message, rtt: float | None = None, reliable: bool = False) -> str:
    """A readable block: title, type/code/MID/token, options, RTT, payload. ``reliable``: a
    coap+tcp / coaps+tcp message, which has no type and no MID on the wire (RFC 8323 section 3.2)."""
    header = f"{code_name(message.code)}  " if reliable else (
        f"{MessageType(message.mtype).name} {code_name(message.code)}  MID={message.mid}  ")
    lines = [f"==[ {title} ]" + "=" * max(0, 60 - len(title)), f"{header}Token={message.token.hex() or '-'}"]
    lines += ["  " + format_option(number, value) for number, value in sorted(message.options, key=lambda o: o[0])]
    if rtt is not None:
        lines.append(f"RTT: {rtt * 1000:.1f} ms")
    lines.append("Payload (%d bytes):" % len(message.payload))
    lines.append(format_payload(message.payload, message.content_format))
    return "\n".join(lines)


def server_text(address: tuple[str, int]) -> str:
    """``host:port``, ``[v6]:port``: how an address reads in a message."""
    return address_text(address)


def refused_text(address: tuple[str, int]) -> str:
    """What an ICMP port unreachable means for a CoAP client, and what to check."""
    where = server_text(address)
    return (f"{where} refused the request (ICMP port unreachable): is a CoAP server listening on {where}? "
            "Check the host and port of the URI")


def end_process(service: IService, reactor: Any, status: int) -> None:
    """Make the process running ``service`` exit with ``status``; the reactor may already be stopping (SIGTERM)."""
    set_exit_status(service, status)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class ServerConnection:
    """A one-shot client's socket connected to its one server (as libcoap's client sessions).

    Linux reports ICMP port unreachable to a UDP socket only once it is
    connected (udp(7)), as a pending ECONNREFUSED; ``on_refused`` hears of it.
    A connected socket receives only from the server's address, which loses
    nothing: the CoAP layer and the DTLS endpoint match peers by address.
    The reactor may close the socket on that error (see ``stopProtocol``).
    Mixed into the UDP link (coap://) and the DTLS endpoint (coaps://), so
    a refused handshake is reported as fast as a refused request.
    """

    transport: Any
    #: Called with the server's address when it refused a datagram.
    on_refused: Callable[[UdpPeer], None] | None = None
    server: UdpPeer | None = None
    _socket: socket.socket | None = None

    def connect_socket(self, peer: UdpPeer) -> UdpPeer:
        """Connect the socket to the server's (resolved) address, the first time."""
        if self.server is None:
            self.transport.connect(peer[0], peer[1])
            self.server = (peer[0], peer[1])
        return peer

    def connectionRefused(self) -> None:
        """Twisted's select and poll reactors read the ECONNREFUSED and call this."""
        self._refused()

    def startProtocol(self) -> None:
        super().startProtocol()  # type: ignore[misc]
        self._socket = self.transport.getHandle()

    def stopProtocol(self) -> None:
        """The epoll reactor may take the socket error (EPOLLERR) for a lost connection and close
        the port; the error is still pending on the socket, which closes right after this."""
        sock, self._socket = self._socket, None
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
            self._refused()
        super().stopProtocol()  # type: ignore[misc]

    def _refused(self) -> None:
        if self.on_refused is not None and self.server is not None:
            self.on_refused(self.server)


class ServerUdpLink(ServerConnection, UdpLink):
    """A one-shot coap:// client's link, connected to its server (see ``ServerConnection``)."""

    def __init__(self, resolver: Any = None, receive_buffer: int | None = None) -> None:
        super().__init__(receive_buffer=receive_buffer, resolver=resolver)

    def connect(self, address: tuple[str, int]) -> defer.Deferred[UdpPeer]:
        """The server's (resolved) address; the socket is connected to it the first time."""
        return super().connect(address).addCallback(self.connect_socket)


class ServerDtlsLink(ServerConnection, DtlsEndpoint):
    """A one-shot coaps:// client's DTLS endpoint, its socket connected to the server before the
    handshake starts (see ``ServerConnection``)."""

    def connect(self, address: tuple[str, int]) -> defer.Deferred[DtlsPeer]:
        host = address[0]
        if isIPAddress(host) or isIPv6Address(host):
            self.connect_socket(address)
        # A host name is resolved by the endpoint, which then connects the resolved address here.
        return super().connect(address)


@implementer(IDatagramLink)
class SendTap:
    """An IDatagramLink in front of another one that shows ``on_send`` every datagram first.

    The client prints its request as it went out: its MID and token are the
    CoAP layer's (random, RFC 7252 sections 4.4 and 5.3.1), known once sent.
    """

    def __init__(self, link: IDatagramLink, on_send: Callable[[bytes], None]) -> None:
        self.link = link
        self.scheme = link.scheme
        self._on_send = on_send

    @property
    def receiver(self) -> Any:
        return self.link.receiver

    @receiver.setter
    def receiver(self, receiver: Any) -> None:
        self.link.receiver = receiver

    def send_datagram(self, data: bytes, peer: Any) -> None:
        self._on_send(data)
        self.link.send_datagram(data, peer)

    def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
        return self.link.connect(address)

    def peer_context(self, peer: Any) -> PeerContext:
        return self.link.peer_context(peer)


class OneServerService(Service):
    """One exchange with one server: connect, send, wait at most ``timeout``, explain a failure, end.

    Subclasses say what to send (``exchange``) and what an answer means
    (``answered``, returning the exit status). Whatever goes wrong ends
    with one readable line naming the server and what to check, and
    ``done`` firing with ``EXIT_NO_RESPONSE``.
    """

    def __init__(self, reactor: Any, uri: CoapUri, link: IDatagramLink, stdout: IO[str], timeout: float) -> None:
        self._reactor = reactor
        self.uri = uri
        self.link = link
        self.stdout = stdout
        self.timeout = timeout
        self.exit_status = EXIT_NO_RESPONSE
        self.done: defer.Deferred[int] = defer.Deferred()
        self.endpoint: CoapEndpoint | None = None
        self._port: Any = None
        self._watchdog: IDelayedCall | None = None
        self._started = 0.0
        self._connected = False
        self._ended = False
        self._progress: IDelayedCall | None = None

    @property
    def server(self) -> str:
        """The server as the user wrote it, ``host:port``."""
        return server_text(self.uri.address)

    def endpoint_link(self) -> IDatagramLink:
        """The link the CoAP endpoint sends through."""
        return self.link

    def exchange(self, peer: Any) -> defer.Deferred[ResponseReceived]:
        """Send the request(s) to the connected ``peer``; fires with the final answer."""
        raise NotImplementedError

    def answered(self, event: ResponseReceived) -> int:
        """Show the final answer; the exit status it means."""
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        if isinstance(self.link, ServerConnection):
            self.link.on_refused = self.refused
        if not isinstance(self.link, TcpLink):
            self._port = self._reactor.listenUDP(0, self.link, interface="::" if ":" in self.uri.host else "",
                                                 maxPacketSize=MAX_DATAGRAM)
        self.endpoint = endpoint_class(self.link)(self.endpoint_link(), self._reactor)
        self._started = self._reactor.seconds()
        self.rearm_watchdog()
        configuration = getattr(self.link, "client_configuration", None)
        if configuration is not None:
            self._progress_after(0.0, configuration.initial_retransmit_timeout)
        connecting = self.link.connect(self.uri.address)
        connecting.addCallback(self._connected_to)
        connecting.addCallbacks(self._answered, self._failed)

    def _progress_after(self, waited: float, interval: float) -> None:
        """A line each time the DTLS handshake retransmits (RFC 6347 section 4.2.4.1: the
        timer starts at the initial timeout and doubles, up to 60 s) while nothing came back."""
        self._progress = self._reactor.callLater(interval, self._handshake_progress, waited + interval,
                                                 min(2 * interval, 60.0))

    def _handshake_progress(self, waited: float, interval: float) -> None:
        self._progress = None
        if self._connected or self._ended:
            return
        self.print(f"==[ DTLS handshake ]== no answer from {self.server} after {waited:.1f} s, retransmitting "
                   f"(gives up after {self.timeout:g} s)")
        self._progress_after(waited, interval)

    def rearm_watchdog(self) -> None:
        """Wait ``timeout`` more seconds for the next answer (a notification restarts the wait)."""
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = self._reactor.callLater(self.timeout, self._timed_out)

    def _connected_to(self, peer: Any) -> defer.Deferred[ResponseReceived]:
        self._connected = True
        return self.exchange(peer)

    def _answered(self, event: ResponseReceived) -> None:
        if not self._ended:
            self._end(self.answered(event))

    def _failed(self, failure: Failure) -> None:
        if self._ended:
            return
        if isinstance(failure.value, CoapRequestError):
            reason = failure.value.reason
            if reason == "timeout":
                self._fail(self._no_answer_text())
            elif reason == "reset":
                self._fail(f"{self.server} answered with a Reset: it does not accept this request "
                           "(RFC 7252 section 4.2)")
            else:
                self._fail(f"the request to {self.server} failed: {reason}")
        elif failure.check(DNSLookupError):
            self._fail(f"cannot resolve {self.uri.host!r}: check the host of the URI")
        elif failure.check("nettester.protocols.dtls.endpoint.DtlsConnectError"):
            self._fail(f"DTLS handshake with {self.server} failed: {failure.getErrorMessage()}; check "
                       "--identity/--secret or --cert/--key/--trust, and that a coaps server listens there")
        else:
            self._fail(f"the request to {self.server} failed: {failure.getErrorMessage()}")

    def refused(self, address: tuple[str, int]) -> None:
        """ICMP port unreachable from the server: nobody listens there; no use waiting."""
        if not self._ended:
            self._fail(refused_text(address))

    def _timed_out(self) -> None:
        self._watchdog = None
        if self._connected or self.uri.scheme in ("coap", "coap+tcp"):
            self._fail(self._no_answer_text())
        else:
            security = "TLS" if self.uri.scheme == "coaps+tcp" else "DTLS"
            self._fail(f"no {security} handshake with {self.server} within {self.timeout:g} s: is a "
                       f"{self.uri.scheme} server listening on {self.server}? (--timeout waits longer)")

    def _no_answer_text(self) -> str:
        assert self.endpoint is not None
        elapsed = self._reactor.seconds() - self._started
        transmissions = 1 + self.endpoint.stats.retransmissions
        return (f"no answer from {self.server} within {elapsed:.1f} s ({transmissions} transmissions): "
                f"is a CoAP server listening on {self.server}, and does the path let UDP through? "
                "(--timeout waits longer)")

    def _fail(self, text: str) -> None:
        self.print(f"==[ no response ]== {text}")
        self._end(EXIT_NO_RESPONSE)

    def print(self, text: str) -> None:
        """A line of the role's output."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def _end(self, status: int) -> None:
        self._ended = True
        self.exit_status = status
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        if self._progress is not None and self._progress.active():
            self._progress.cancel()
        self._progress = None
        if self.endpoint is not None:
            self.endpoint.stop()
        if self._port is not None:
            self._port.stopListening()
        if isinstance(self.link, TcpLink):
            self.link.release_all("the client is done")  # RFC 8323 section 5.5
        self.done.callback(status)


class CoapClientService(OneServerService):
    """Sends one request (or observes N notifications) and prints each message in a block."""

    def __init__(self, reactor: Any, uri: CoapUri, request: Message, link: IDatagramLink, stdout: IO[str],
                 observe: int = 0, timeout: float = MAX_TRANSMIT_WAIT) -> None:
        super().__init__(reactor, uri, link, stdout, timeout)
        self.request = request
        self.observe = observe
        self._observation: Observation | None = None
        self._notifications = 0
        self._request_shown = False
        self._reliable = uri.scheme.endswith("+tcp")

    def endpoint_link(self) -> IDatagramLink:
        return SendTap(self.link, self._sent)

    def _sent(self, data: bytes) -> None:
        """Print the request once, as it went out (MID and token included)."""
        if not self._request_shown:
            self._request_shown = True
            self.print(format_message(f"request to {self.uri.scheme}://{self.server}", decode(data),
                                      reliable=self._reliable))

    def exchange(self, peer: Any) -> defer.Deferred[ResponseReceived]:
        assert self.endpoint is not None
        if self.observe:
            self._observation = self.endpoint.observe(peer, self.request, self._notified)
            return self._observation.finished
        return self.endpoint.request(peer, self.request)

    def _notified(self, event: ResponseReceived) -> None:
        self._notifications += 1
        self.rearm_watchdog()
        title = "response" if self._notifications == 1 else f"notification {self._notifications - 1}"
        self.print(format_message(title, event.response, event.rtt, self._reliable))
        if self._notifications > self.observe and self._observation is not None:
            self._observation.cancel()  # proactive deregistration (RFC 7641 section 3.6)

    def answered(self, event: ResponseReceived) -> int:
        self.print(format_message("final response" if self.observe else "response", event.response, event.rtt,
                                  self._reliable))
        return EXIT_SUCCESS if event.response.code >> 5 == 2 else EXIT_ERROR_RESPONSE


def make_link(reactor: Any, uri: CoapUri, dtls_configuration: Any = None, one_shot: bool = True,
              tls: Any = None) -> IDatagramLink:
    """UDP for ``coap://`` (connected for a ``one_shot`` client, so it hears a refusal); a client
    DtlsEndpoint for ``coaps://`` (needs a configuration); TCP connections for ``coap+tcp://``, TLS
    ones for ``coaps+tcp://`` (``tls``: the client's TLS from ``tls.client_tls``).

    A one-shot coaps client's socket is connected too (``ServerDtlsLink``).
    A long-running client (coap-bench) stays unconnected: one ICMP error
    would cost it its socket, and it must outlive a server restart.
    """
    if uri.scheme == "coap":
        return ServerUdpLink(resolver=reactor) if one_shot else UdpLink(resolver=reactor)
    if uri.scheme == "coap+tcp":
        return TcpLink(reactor)  # one connection per connect (RFC 8323)
    if uri.scheme == "coaps+tcp":
        return TcpLink(reactor, tls_client=tls if tls is not None else client_tls(uri.host, {}))
    if dtls_configuration is None:
        raise ValueError("coaps:// needs --identity/--secret or --cert/--key")
    link = ServerDtlsLink if one_shot else DtlsEndpoint
    return link(reactor, client_configuration=dtls_configuration)


def link_for_options(reactor: Any, options: Any, one_shot: bool = True) -> IDatagramLink:
    """``make_link`` for a client role's parsed options (DTLS for coaps, TLS for coaps+tcp)."""
    uri = options["uri"]
    tls = client_tls(uri.host, options) if uri.scheme == "coaps+tcp" else None
    return make_link(reactor, uri, options["dtls"], one_shot, tls)


def make_client_service(reactor: Any, options: Any, stdout: IO[str]) -> CoapClientService:
    """The role's service from parsed ``CoapClientOptions``; ends the process when done."""
    uri = options["uri"]
    request = build_request(uri, options["method"], options["payload"].encode(), not options["non"],
                            options["content-format"], options["accept"])
    service = CoapClientService(reactor, uri, request, link_for_options(reactor, options), stdout,
                                options["observe"], options["timeout"])
    service.done.addCallback(lambda status: end_process(service, reactor, status))
    return service
