"""Twisted adapter: CoAP over TCP (RFC 8323) as an ``IDatagramLink``.

``TcpLink`` is a Twisted factory (listening and connecting) whose
connections each drive one sans-IO ``tcp.CoapStream``. Towards the CoAP
endpoint it is one more link: ``send_datagram`` frames what the message layer
encodes (type and message id dropped), and each received message goes to
``ReliableCoapEndpoint.message_received``. A peer handle is the connection.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.addresses import address_text
from nettester.interfaces import IDatagramLink
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.metrics import LabeledCounter
from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.message import Message, Peer
from nettester.protocols.coap.reliable import ReliableCoapLayer
from nettester.protocols.coap.tcp import (
    AnswerReady,
    CoapStream,
    CsmReceived,
    MessageReceived,
    PongReceived,
    ReleaseReceived,
    StreamClosed,
    StreamParameters,
    frame_from_datagram,
)
from nettester.protocols.coap.tls import tls_context

log = Logger()

#: Stream ends that a hostile or broken peer causes, and connections closed at once past
#: ``max_connections`` (counted as refused, ``tcp_refused_total{reason}``).
REFUSED_REASONS = ("bad_signal", "csm_not_first", "format", "max_connections", "no_csm", "slowloris", "too_large")
#: Seconds between two warnings about connections refused at ``max_connections``.
WARNING_INTERVAL = 10.0
_LOST = Failure(ConnectionError("connection lost"))


class ReliableCoapEndpoint(CoapEndpoint):
    """A ``CoapEndpoint`` over a reliable link: decoded messages in, peers that close."""

    layer_class = ReliableCoapLayer
    core: ReliableCoapLayer

    def message_received(self, message: Message, peer: Peer, datagram: bytes | None = None) -> None:
        """One message from ``peer``'s stream (a request with its ``tcp.as_datagram`` bytes)."""
        self.core.receive_message(message, peer, self._clock.seconds(), datagram)
        self._pump()

    def peer_closed(self, peer: Peer) -> None:
        """``peer``'s connection ended: drop its observers, fail its requests."""
        self.core.peer_closed(peer, self._clock.seconds())
        self._pump()


def endpoint_class(link: IDatagramLink) -> type[CoapEndpoint]:
    """The endpoint a link needs: the reliable one over TCP, the datagram one otherwise."""
    return ReliableCoapEndpoint if isinstance(link, TcpLink) else CoapEndpoint


@implementer(IPushProducer)
class CoapTcpConnection(Protocol):
    """One connection: bytes to the stream, messages to the link's endpoint, a single timer.

    It is its transport's producer: when the peer does not read its responses and the send
    buffer fills, Twisted pauses us and we stop reading its requests, so what waits to be sent
    stays bounded (a request is answered only once read; notifications are not held back).
    """

    _ids = itertools.count(1)

    def __init__(self, link: TcpLink) -> None:
        self.link = link
        self.id = next(self._ids)
        self.address: tuple[str, int] = ("", 0)
        self.stream: CoapStream | None = None
        #: Client side: fires with this connection once the peer's CSM arrived.
        self.ready: defer.Deferred[CoapTcpConnection] | None = None
        self._timer: IDelayedCall | None = None
        self._closing = False
        self._producing = False

    def __str__(self) -> str:
        return f"tcp#{self.id} {address_text(self.address)}"

    __repr__ = __str__

    def connectionMade(self) -> None:
        # Request/response traffic: Nagle's algorithm would hold a response back until the peer's
        # delayed ACK (tens of milliseconds), so small messages go out at once.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.address = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        if not self.link.admit(self):
            # Past the cap: no stream, no buffer, no TLS handshake; the socket goes at once, and
            # with an RST on purpose: a refused flood must not leave us a TIME_WAIT per connection.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.stream = CoapStream(self.link.clock.seconds(), self.link.stream_params)
        if self.link.receiver is not None:
            self.stream.static_answer = self.link.receiver.core.static_frame  # static.py, over TCP
        self.link.connection_made(self)
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        if not self._producing and self.transport is not None:
            # Registered once data flows, so after a TLS handshake: TLS pauses its producer while
            # it buffers writes made during the handshake, and we must not stop reading then.
            self._producing = True
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        if self.stream is not None:
            self.stream.receive_data(data, self.link.clock.seconds())
            self._pump()

    def connectionLost(self, reason: Failure = _LOST) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.stream is not None:
            self.stream.connection_lost(reason.getErrorMessage())
            self._pump()

    # ------------------------------------------------------------ IPushProducer

    def pauseProducing(self) -> None:
        """The send buffer is full: read no more requests until it drains."""
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """The connection goes (``connectionLost`` follows)."""

    def release(self, detail: str) -> None:
        """Close gracefully: Release (RFC 8323 section 5.5), then the connection ends."""
        if self.stream is not None:
            self.stream.release(detail)
            self._pump()

    def write_frame(self, frame: bytes) -> None:
        """Send one encoded frame now (the endpoint's pump calls this in order)."""
        if self.stream is not None and self.stream.closed is None:
            self.transport.write(frame)  # type: ignore[union-attr]

    def _pump(self) -> None:
        stream = self.stream
        assert stream is not None
        while (event := stream.next_event()) is not None:
            if type(event) is AnswerReady:  # the most frequent event of a loaded server first
                self.write_frame(event.frame)
            elif isinstance(event, MessageReceived):
                self.link.message_received(event.message, self, event.datagram)
            elif isinstance(event, CsmReceived):
                log.debug("{connection} CSM: Max-Message-Size {size}, block-wise {block_wise}",
                          event="coap_tcp_csm", connection=self, size=event.max_message_size,
                          block_wise=event.block_wise)
                if self.ready is not None and not self.ready.called:
                    self.ready.callback(self)
            elif isinstance(event, PongReceived):
                log.debug("{connection} Pong token={token}", event="coap_tcp_pong", connection=self,
                          token=event.token.hex() or "-")
            elif isinstance(event, ReleaseReceived):
                # RFC 8323 section 5.5; nothing reconnects on its own (README: Alternative-Address and
                # Hold-Off are reported, not followed).
                log.info("{connection} {side} released the connection: {release}", event="coap_tcp_released",
                         connection=self, side="server" if self.ready is not None else "client",
                         release=event.describe(), alternative_address=event.alternative_address,
                         hold_off=event.hold_off)
            elif isinstance(event, StreamClosed):
                self.link.stream_closed(self, event)
        data = stream.data_to_send()
        transport = self.transport
        if transport is None:
            return
        if data:
            transport.write(data)
        if stream.closed is not None:
            if not self._closing:
                self._closing = True
                transport.loseConnection()
            return
        self._arm_timer()

    def _arm_timer(self) -> None:
        assert self.stream is not None
        deadline = self.stream.get_timer()
        if deadline is None and self._timer is None:
            return
        if self._timer is not None and self._timer.active():
            if deadline is not None and self._timer.getTime() == deadline:
                return
            self._timer.cancel()
        self._timer = None
        if deadline is not None:
            clock = self.link.clock
            self._timer = clock.callLater(max(0.0, deadline - clock.seconds()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        assert self.stream is not None
        self.stream.handle_timer(self.link.clock.seconds())
        self._pump()


@implementer(IDatagramLink)
class TcpLink(Factory):
    """CoAP over TCP connections, for one listening port or one client."""

    protocol = CoapTcpConnection
    noisy = False  # one "Starting factory" line per client connection is noise

    def __init__(self, reactor: IReactorTime, stream_params: StreamParameters | None = None,
                 tls_server: Any = None, tls_client: Any = None, max_connections: int | None = None,
                 refused_counter: LabeledCounter | None = None) -> None:
        """``tls_server``: a context factory to listen with TLS; ``tls_client``: a connection creator
        (or context factory) to connect with TLS (coaps+tcp, ``tls.py``). ``max_connections``: past
        this many open connections a new one is closed at once (None: no cap). ``refused_counter``
        counts refused connections by reason (the server's ``tcp_refused_total``)."""
        self.clock = reactor
        self.max_connections = max_connections
        self.refused_counter = refused_counter
        self.stream_params = stream_params or StreamParameters()
        self.tls_server = tls_server
        self.tls_client = tls_client
        self.scheme = "coaps+tcp" if tls_server is not None or tls_client is not None else "coap+tcp"
        self.receiver: ReliableCoapEndpoint | None = None
        #: Open connections.
        self.connections: set[CoapTcpConnection] = set()
        self.accepted = 0
        #: Why connections ended, by reason key (``tcp.StreamClosed``).
        self.closed: Counter[str] = Counter()
        self._next_warning = 0.0
        self._refused_since_warning = 0

    def buildProtocol(self, addr: Any) -> CoapTcpConnection:
        return CoapTcpConnection(self)

    @property
    def refused(self) -> int:
        """Connections ended because of what the peer sent (or did not send)."""
        return sum(count for reason, count in self.closed.items() if reason in REFUSED_REASONS)

    def release_all(self, detail: str) -> None:
        """Release every open connection (the server stops)."""
        for connection in list(self.connections):
            connection.release(detail)

    # ------------------------------------------------------------ IDatagramLink

    def send_datagram(self, data: bytes, peer: CoapTcpConnection) -> None:
        frame = frame_from_datagram(data)
        if frame is not None:
            peer.write_frame(frame)

    def connect(self, address: tuple[str, int]) -> defer.Deferred[CoapTcpConnection]:
        """A new connection to ``address``, firing once the server's CSM arrived (after the TLS handshake)."""
        connector = _Connector(self)
        reactor: Any = self.clock
        if self.tls_client is not None:
            reactor.connectSSL(address[0], address[1], connector, self.tls_client)
        else:
            reactor.connectTCP(address[0], address[1], connector)
        return connector.connected

    def peer_context(self, peer: CoapTcpConnection) -> PeerContext:
        if self.scheme == "coap+tcp":
            return PeerContext(peer.address, self.scheme)
        identity, cipher = tls_context(peer.transport)
        return PeerContext(peer.address, self.scheme, identity=identity, cipher_suite=cipher)

    def listen(self, port: int, interface: str) -> Any:
        """Listen on ``interface``:``port`` (TLS with ``tls_server``); the listening port."""
        reactor: Any = self.clock
        if self.tls_server is not None:
            return reactor.listenSSL(port, self, self.tls_server, interface=interface)
        return reactor.listenTCP(port, self, interface=interface)

    # ------------------------------------------------------------ connections

    def admit(self, connection: CoapTcpConnection) -> bool:
        """Whether ``connection`` may open a stream; past ``max_connections`` it is counted and
        refused, with one warning per ``WARNING_INTERVAL`` (a flood would otherwise flood the log)."""
        if self.max_connections is None or len(self.connections) < self.max_connections:
            return True
        self._count_refused("max_connections")
        self._refused_since_warning += 1
        now = self.clock.seconds()
        if now >= self._next_warning:
            log.warn("{connection} closed at once: {bound} {scheme} connections open (--max-tcp-connections); "
                     "{count} refused since the last warning", event="coap_tcp_max_connections",
                     connection=connection, bound=self.max_connections, scheme=self.scheme,
                     count=self._refused_since_warning)
            self._next_warning = now + WARNING_INTERVAL
            self._refused_since_warning = 0
        return False

    def _count_refused(self, reason: str) -> None:
        self.closed[reason] += 1
        if self.refused_counter is not None:
            self.refused_counter.inc(reason)

    def connection_made(self, connection: CoapTcpConnection) -> None:
        self.connections.add(connection)
        self.accepted += 1
        log.debug("{connection} connected", event="coap_tcp_connected", connection=connection)

    def message_received(self, message: Message, connection: CoapTcpConnection, datagram: bytes | None = None) -> None:
        if self.receiver is not None:
            self.receiver.message_received(message, connection, datagram)

    def stream_closed(self, connection: CoapTcpConnection, event: StreamClosed) -> None:
        """Count why, tell the endpoint, fail a connect still waiting for CSM."""
        self.connections.discard(connection)
        if event.reason in REFUSED_REASONS:
            self._count_refused(event.reason)
            log.info("{connection} closed ({reason}): {detail}", event="coap_tcp_refused", connection=connection,
                     reason=event.reason, detail=event.detail)
        elif event.reason == "peer_abort":  # the peer found us at fault: worth an info line
            self.closed[event.reason] += 1
            log.info("{connection} closed ({reason}): {detail}", event="coap_tcp_aborted", connection=connection,
                     reason=event.reason, detail=event.detail)
        else:
            self.closed[event.reason] += 1
            log.debug("{connection} closed ({reason}): {detail}", event="coap_tcp_closed", connection=connection,
                      reason=event.reason, detail=event.detail)
        if connection.ready is not None and not connection.ready.called:
            connection.ready.errback(ConnectionError(f"{connection}: {event.detail}"))
        if self.receiver is not None:
            self.receiver.peer_closed(connection)


class _Connector(ClientFactory):
    """Builds the client connection of ``TcpLink.connect``; fires once the stream is ready."""

    noisy = False

    def __init__(self, link: TcpLink) -> None:
        self.link = link
        self.connected: defer.Deferred[CoapTcpConnection] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> CoapTcpConnection:
        connection = self.link.buildProtocol(addr)
        connection.ready = self.connected
        return connection

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.connected.called:
            self.connected.errback(reason)
