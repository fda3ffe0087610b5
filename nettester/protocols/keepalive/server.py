"""``keepalive-server``: accepts connections, answers keep-alives, closes silent ones.

Each connection runs a :class:`ServerConnection` core. The server closes a
connection with a FIN when its keep-alive is missing or it sends garbage, and
logs every close with its cause (``closed_by_server``, ``peer_closed``,
``peer_reset``, ``tls_error``), so its JSON log can be joined with the
clients' by ``nettester keepalive-report``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.keepalive.adapter import (
    PEER_CLOSED,
    PEER_RESET,
    TLS_ERROR,
    CoreProtocol,
    OpenConnections,
    address_text,
)
from nettester.protocols.keepalive.transport import listen_tcp
from nettester.protocols.keepalive.wire import (
    DummyReceived,
    Event,
    KeepAliveMissing,
    KeepAliveReceived,
    ProtocolError,
    ServerConnection,
    SessionEstablished,
)
from nettester.service import listen_failed

log = Logger()

CLOSED_BY_SERVER = "closed_by_server"


class KeepAliveServerProtocol(CoreProtocol):
    """One accepted connection."""

    core: ServerConnection

    def __init__(self, service: KeepAliveServerService) -> None:
        super().__init__(service.clock)
        self.service = service
        self.peer = "-"
        self.local = "-"

    @property
    def conn(self) -> str:
        return self.core.conn_id or "-"

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = address_text(self.transport.getPeer())
        self.local = address_text(self.transport.getHost())
        log.info("New TCP connection attempt {peer}", event="conn_attempt", peer=self.peer, local=self.local)
        self.core = ServerConnection(self.service.keepalive_timeout, self.clock.seconds())
        self.service.connection_made(self)
        self.pump()

    def handle_event(self, event: Event) -> None:
        service = self.service
        kind = type(event)
        if kind is KeepAliveReceived:
            service.keepalives.value += 1
        elif kind is DummyReceived:
            service.dummies.value += 1
        elif isinstance(event, SessionEstablished):
            log.info("Session established {peer} -> {local}, client={client}, conn={conn}",
                     event="session_established", peer=self.peer, local=self.local,
                     client=event.client_id, conn=event.conn_id)
        elif isinstance(event, KeepAliveMissing):
            log.error("Keep alive request not received {peer}, conn={conn}", event="keepalive_missing",
                      peer=self.peer, conn=self.conn, idle=round(event.idle, 3))
            self.terminate("keep_alive_missing")
        elif isinstance(event, ProtocolError):
            service.protocol_errors.value += 1
            log.error("Invalid message from {peer}, conn={conn}: {reason}: {excerpt}", event="protocol_error",
                      peer=self.peer, conn=self.conn, reason=event.reason, excerpt=event.excerpt)
            self.terminate("protocol_error")

    def terminate(self, why: str) -> None:
        """Log the original 'Terminating' line, then close with a FIN."""
        if self.closing is None:
            log.info("Terminating TCP connection from {peer} :{why}", event="conn_terminating",
                     peer=self.peer, conn=self.conn, why=why)
            self.close(why)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cause, detail = self.connection_lost_cause(reason, CLOSED_BY_SERVER)
        emit = log.error if cause in (PEER_RESET, TLS_ERROR) else log.info
        emit("TCP connection from {peer} closed, conn={conn}: {cause} ({detail})", event="conn_closed",
             peer=self.peer, local=self.local, conn=self.conn, client=self.core.client_id, cause=cause, detail=detail)
        self.service.connection_lost(self, cause)


class KeepAliveServerFactory(Factory):
    """Builds one protocol per accepted connection."""

    noisy = False

    def __init__(self, service: KeepAliveServerService) -> None:
        self.service = service

    def buildProtocol(self, addr: IAddress | None) -> KeepAliveServerProtocol:
        return KeepAliveServerProtocol(self.service)


@implementer(IReportingService)
class KeepAliveServerService(Service):
    """The listening server, its open connections and its counters."""

    def __init__(self, reactor: Any, port: int, interface: str = "", keepalive_timeout: float = 20.0,
                 tls: CertificateOptions | None = None, tls_note: str = "", backlog: int = 1024) -> None:
        self.reactor: IReactorTCP = reactor
        self.clock: IReactorTime = reactor
        self.port = port
        self.interface = interface
        self.keepalive_timeout = keepalive_timeout
        self.tls = tls
        self.transport_name = "TCP" if tls is None else f"TLS, {tls_note}" if tls_note else "TLS"
        self.backlog = backlog
        self.listening: IListeningPort | None = None
        self.open = OpenConnections(reactor)
        self.metrics = MetricSet("keepalive_server")
        self.accepted = self.metrics.counter("accepted_total", "Connections accepted.")
        self.keepalives = self.metrics.counter("keepalives_total", "Keep-alive requests answered.")
        self.dummies = self.metrics.counter("dummies_total", "Dummy messages echoed.")
        self.protocol_errors = self.metrics.counter("protocol_errors_total", "Connections closed for invalid input.")
        self.closes = self.metrics.labeled_counter("closes_total", "Closed connections by cause.", "cause")
        self.missing = self.metrics.counter("keepalive_missing_total", "Connections closed for a missing keep-alive.")
        self.metrics.gauge("open", "Connections open now.", lambda: len(self.open))

    def startService(self) -> None:
        """Listen; when the port cannot be opened, say why and stop with exit status 1."""
        factory: Factory[Any] = KeepAliveServerFactory(self)
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, False, factory)
            factory.noisy = False
        super().startService()
        try:
            self.listening = listen_tcp(self.reactor, self.port, factory, self.backlog, self.interface)
        except CannotListenError as error:
            listen_failed(self, self.reactor, self.interface, self.port, "--port", error)
            return
        log.info("keepalive-server listening on {address} ({transport}), keep-alive timeout {timeout:g} s",
                 event="listening", address=address_text(self.listening.getHost()),
                 transport=self.transport_name, timeout=self.keepalive_timeout)

    @property
    def port_number(self) -> int:
        """The real listening port (useful with port 0)."""
        assert self.listening is not None, "not listening yet"
        address = self.listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))  # a TCP port
        return address.port

    def connection_made(self, protocol: KeepAliveServerProtocol) -> None:
        self.accepted.value += 1
        self.open.add(protocol)

    def connection_lost(self, protocol: KeepAliveServerProtocol, cause: str) -> None:
        self.closes.inc(cause)
        if protocol.closing == "keep_alive_missing":
            self.missing.value += 1
        self.open.discard(protocol)

    def summary(self) -> dict[str, int]:
        return {
            "open": len(self.open),
            "accepted": self.accepted.value,
            "keepalives": self.keepalives.value,
            "dummies": self.dummies.value,
            "keepalive_missing": self.missing.value,
            CLOSED_BY_SERVER: self.closes.get(CLOSED_BY_SERVER),
            PEER_CLOSED: self.closes.get(PEER_CLOSED),
            PEER_RESET: self.closes.get(PEER_RESET),
            TLS_ERROR: self.closes.get(TLS_ERROR),
            "protocol_errors": self.protocol_errors.value,
        }

    def stopService(self) -> Deferred[None]:
        """Stop listening, close every connection with a FIN, fire when they are gone."""
        super().stopService()
        stopped = self.listening.stopListening() if self.listening is not None else None
        self.listening = None
        for protocol in self.open:
            protocol.terminate("shutdown")  # type: ignore[attr-defined]
        closed = self.open.when_empty()
        return closed if stopped is None else closed.addCallback(lambda _: stopped)
