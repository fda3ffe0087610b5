"""``keepalive-client``: a fleet of long-lived keep-alive connections.

Each client number holds one connection at a time (a L{ClientSlot}), sends
``Establish Session``, keep-alives and dummies through a L{ClientConnection}
core, tells a FIN from a RST from a missing response, and reconnects after
``--reconnect-delay``. Every connection has a conn id unique across runs and
replicas (``<run>-<client>-<attempt>``) that the server logs too.
"""

from __future__ import annotations

import random
import secrets
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, Factory, connectionDone
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
from nettester.protocols.keepalive.transport import connect_tcp
from nettester.protocols.keepalive.wire import (
    ClientConnection,
    ClientPlan,
    ClientTiming,
    DummyReceived,
    Event,
    KeepAliveAnswered,
    ProtocolError,
    ResponseMissing,
)

log = Logger()

CLOSED_BY_CLIENT = "closed_by_client"


class KeepAliveClientProtocol(CoreProtocol):
    """One client connection."""

    def __init__(self, slot: ClientSlot, conn_id: str) -> None:
        super().__init__(slot.fleet.clock)
        self.slot = slot
        self.conn = conn_id
        self.local = "-"
        self.peer = "-"

    def connectionMade(self) -> None:
        fleet = self.slot.fleet
        self.local = address_text(self.transport.getHost())
        self.peer = address_text(self.transport.getPeer())
        log.info("Client {client}: connected {local} -> {peer}, conn={conn}", event="conn_open",
                 client=self.slot.number, local=self.local, peer=self.peer, conn=self.conn)
        self.core = ClientConnection(fleet.plan, str(self.slot.number), self.conn, self.clock.seconds())
        self.slot.connection_made(self)
        self.pump(())
        if not fleet.running:
            self.close("shutdown")

    def handle_event(self, event: Event) -> None:
        fleet = self.slot.fleet
        if type(event) is KeepAliveAnswered:
            fleet.answered.value += 1
            fleet.rtt_total += event.rtt
            if event.rtt > fleet.rtt_max:
                fleet.rtt_max = event.rtt
        elif type(event) is DummyReceived:
            fleet.dummies.value += 1
        elif isinstance(event, ResponseMissing):
            fleet.responses_missing.value += 1
            log.error("Client {client}: Keep alive response not received, conn={conn}", event="response_missing",
                      client=self.slot.number, conn=self.conn, seq=event.seq, waited=round(event.waited, 3))
            self.close("response_missing")
        elif isinstance(event, ProtocolError):
            fleet.protocol_errors.value += 1
            log.error("Client {client}: invalid message from server, conn={conn}: {reason}: {excerpt}",
                      event="protocol_error", client=self.slot.number, conn=self.conn, reason=event.reason,
                      excerpt=event.excerpt)
            self.close("protocol_error")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cause, detail = self.connection_lost_cause(reason, CLOSED_BY_CLIENT)
        fields = {"event": "conn_closed", "client": self.slot.number, "conn": self.conn, "cause": cause,
                  "detail": detail, "local": self.local, "peer": self.peer}
        if cause == PEER_CLOSED:
            log.error("Client {client}: Server terminated TCP connection, conn={conn}", **fields)
        elif cause == PEER_RESET:
            log.error("Client {client}: TCP connection reset, conn={conn}", **fields)
        elif cause == TLS_ERROR:
            log.error("Client {client}: TLS failed, conn={conn}: {detail} (check --ca and --server-name, "
                      "or use --insecure for a self-signed server)", **fields)
        else:
            log.info("Client {client}: closed TCP connection, conn={conn} :{detail}", **fields)
        self.slot.connection_lost(self, cause)


class ClientSlot(ClientFactory):
    """Client number C{number}: one connection at a time, reconnecting after a drop."""

    noisy = False

    def __init__(self, fleet: KeepAliveClientService, number: int) -> None:
        self.fleet = fleet
        self.number = number
        self.attempt = 0
        self.conn_id = ""
        self.connector: IConnector | None = None
        self.protocol_instance: KeepAliveClientProtocol | None = None
        self.pending: IDelayedCall | None = None

    def schedule(self, delay: float) -> None:
        """Connect after C{delay} seconds."""
        self.pending = self.fleet.clock.callLater(delay, self.connect)

    def connect(self) -> None:
        self.pending = None
        self.attempt += 1
        self.conn_id = f"{self.fleet.run_id}-{self.number}-{self.attempt}"
        self.fleet.connect_attempts.value += 1
        self.connector = self.fleet.connect(self)

    def buildProtocol(self, addr: IAddress) -> KeepAliveClientProtocol:
        return KeepAliveClientProtocol(self, self.conn_id)

    def connection_made(self, protocol: KeepAliveClientProtocol) -> None:
        self.protocol_instance = protocol
        self.fleet.connected(protocol)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connector = None
        if not self.fleet.running:
            return
        self.fleet.connect_failures.value += 1
        log.error("Client {client}: Server unavailable {reason} (is keepalive-server running at {server}? "
                  "retrying in {delay:g} s), conn={conn}", event="server_unavailable", client=self.number,
                  conn=self.conn_id, server=self.fleet.address, reason=reason.getErrorMessage().rstrip("."),
                  delay=self.fleet.reconnect_delay)
        self.schedule(self.fleet.reconnect_delay)

    def connection_lost(self, protocol: KeepAliveClientProtocol, cause: str) -> None:
        self.connector = None
        self.protocol_instance = None
        self.fleet.disconnected(protocol, cause)
        if self.fleet.running:
            self.schedule(self.fleet.reconnect_delay)

    def stop(self) -> None:
        """Cancel a pending (re)connect or connection attempt; close an open connection with a FIN."""
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        if self.protocol_instance is not None:
            self.protocol_instance.close("shutdown")
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except NotConnectingError:
                pass  # already connected: connectionMade sees the stopped fleet and closes it


@implementer(IReportingService)
class KeepAliveClientService(Service):
    """C{clients} clients spread over C{ramp_up} seconds against one server."""

    def __init__(self, reactor: Any, host: str, port: int, clients: int, timing: ClientTiming,
                 ramp_up: float = 10.0, reconnect_delay: float = 1.0,
                 tls: IOpenSSLClientConnectionCreator | None = None, rng: random.Random | None = None,
                 run_id: str | None = None, connect_timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.plan = ClientPlan(timing)
        self.ramp_up = ramp_up
        self.reconnect_delay = reconnect_delay
        self.tls = tls
        self.rng = rng if rng is not None else random.Random()
        self.run_id = run_id if run_id is not None else secrets.token_hex(3)
        self.connect_timeout = connect_timeout
        self.slots = [ClientSlot(self, number) for number in range(1, clients + 1)]
        self.open = OpenConnections(reactor)
        self.rtt_total = 0.0
        self.rtt_max = 0.0
        self.metrics = MetricSet("keepalive_client")
        self.connect_attempts = self.metrics.counter("connect_attempts_total", "Connection attempts.")
        self.connections = self.metrics.counter("connections_total", "Connections established.")
        self.connect_failures = self.metrics.counter("server_unavailable_total", "Failed connection attempts.")
        self.answered = self.metrics.counter("keepalives_total", "Keep-alive round trips completed.")
        self.dummies = self.metrics.counter("dummies_total", "Dummy echoes received.")
        self.responses_missing = self.metrics.counter("responses_missing_total", "Keep-alive responses not received.")
        self.protocol_errors = self.metrics.counter("protocol_errors_total", "Invalid messages from the server.")
        self.closes = self.metrics.labeled_counter("closes_total", "Closed connections by cause.", "cause")
        self.metrics.gauge("open", "Connections open now.", lambda: len(self.open))
        self.metrics.gauge("clients", "Configured clients.", lambda: len(self.slots))

    def startService(self) -> None:
        super().startService()
        log.info("keepalive-client run {run}: {clients} clients to {server} ({transport}) over {ramp:g} s",
                 event="fleet_start", run=self.run_id, clients=len(self.slots), server=self.address,
                 transport="TLS" if self.tls is not None else "TCP", ramp=self.ramp_up)
        for slot in self.slots:
            slot.schedule(self.rng.uniform(0.0, self.ramp_up))

    def connect(self, slot: ClientSlot) -> IConnector:
        factory: Factory = slot
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, True, slot)
            factory.noisy = False
        return connect_tcp(self.reactor, self.host, self.port, factory, self.connect_timeout)

    def connected(self, protocol: KeepAliveClientProtocol) -> None:
        self.connections.value += 1
        self.open.add(protocol)

    def disconnected(self, protocol: KeepAliveClientProtocol, cause: str) -> None:
        self.closes.inc(cause)
        self.open.discard(protocol)

    @property
    def errors(self) -> int:
        """Failures a healthy path never shows: unreachable server, resets, FINs, timeouts, garbage."""
        return (self.connect_failures.value + self.responses_missing.value + self.protocol_errors.value
                + self.closes.get(PEER_CLOSED) + self.closes.get(PEER_RESET) + self.closes.get(TLS_ERROR))

    def summary(self) -> dict[str, int | float]:
        answered = self.answered.value
        return {
            "clients": len(self.slots),
            "open": len(self.open),
            "connections": self.connections.value,
            "keepalives": answered,
            "rtt_avg_ms": round(1000 * self.rtt_total / answered, 2) if answered else 0.0,
            "rtt_max_ms": round(1000 * self.rtt_max, 2),
            "dummies": self.dummies.value,
            "server_unavailable": self.connect_failures.value,
            "server_closed": self.closes.get(PEER_CLOSED),
            "resets": self.closes.get(PEER_RESET),
            "responses_missing": self.responses_missing.value,
            TLS_ERROR: self.closes.get(TLS_ERROR),
            "protocol_errors": self.protocol_errors.value,
            "errors": self.errors,
        }

    def stopService(self) -> Deferred[None]:
        """Stop reconnecting, close every connection with a FIN, fire when they are gone."""
        super().stopService()
        for slot in self.slots:
            slot.stop()
        return self.open.when_empty()
