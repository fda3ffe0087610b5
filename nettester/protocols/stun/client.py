"""The ``stun-client`` role: the Twisted adapter driving a :class:`ClientFleet`.

Each client owns one connected UDP socket (its own NAT mapping). One
``LoopingCall`` ticks the fleet's timer wheel every ``resolution`` seconds,
so 10,000 clients cost 100 wake-ups a second, not 10,000 drifting timers.
Events from the fleet become socket actions and the original tool's log lines.
"""

from __future__ import annotations

import ipaddress
import random
import resource
import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.interfaces import IDatagramReadDescriptor, IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import FleetCounters
from nettester.protocols.stun.fleet import (
    ClientFleet,
    ConsecutiveFailures,
    ErrorResponse,
    FleetConfig,
    MappingChanged,
    OpenSocket,
    ResponseMissing,
    Send,
    UnexpectedResponse,
)
from nettester.protocols.stun.message import Address, format_transaction_id
from nettester.service import set_exit_status

log = Logger()

# Descriptors beyond one per client: stdio, the epoll fd, the waker pipe, metrics, logs.
SPARE_FILES = 64


def raise_open_file_limit(clients: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward the hard limit for C{clients} sockets.

    @return: the soft limit now in force.
    @raise ValueError: saying what to do, when even the hard limit is too low.
    """
    needed = clients + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ValueError(
            f"{clients} clients need {needed} open files (one UDP socket each) but the hard limit "
            f"(ulimit -Hn) is {hard}; raise it (docker run --ulimit nofile={needed}, systemd LimitNOFILE=, "
            f"or the pod's runtime limits) or lower --clients"
        )
    return int(soft)


def format_mapped(mapped: Address | None) -> str:
    """``ip:port`` of the last known mapping, ``:`` when none is known yet (the original's form)."""
    return ":" if mapped is None else str(mapped)


@implementer(IReadDescriptor, IDatagramReadDescriptor)
class ClientSocket:
    """One client's connected UDP socket, read by the reactor directly.

    Lighter than a ``udp.Port`` (10,000 of them stay within the memory
    budget) and silent: no log line per socket opened or closed.
    """

    __slots__ = ("_socket", "_service", "_index")

    def __init__(self, service: StunClientService, index: int, local: str, server: tuple[str, int]) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local, 0))
            sock.connect(server)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._service = service
        self._index = index

    @property
    def local_port(self) -> int:
        return int(self._socket.getsockname()[1])

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "stun-client"

    def doRead(self) -> None:
        # A bounded batch per wake-up keeps one chatty socket from starving the others.
        for _ in range(16):
            try:
                datagram = self._socket.recv(65535)
            except BlockingIOError:
                return
            except ConnectionRefusedError:  # ICMP port unreachable, reported on this socket
                self._service.refused(self._index)
                return
            except OSError as error:
                self._service.socket_error(self._index, error, "receive on")
                return
            self._service.received(self._index, datagram)

    def write(self, data: bytes) -> None:
        try:
            self._socket.send(data)
        except ConnectionRefusedError:
            self._service.refused(self._index)
        except OSError as error:
            self._service.socket_error(self._index, error, "send on")

    def close(self) -> None:
        self._socket.close()

    def connectionLost(self, reason: Failure) -> None:
        self._socket.close()


@implementer(IReportingService)
class StunClientService(Service):
    """Runs C{config.clients} testers against C{server}:C{port}.

    C{server_port} may be changed until the service starts (``nettester local``
    learns its server's port only then).
    """

    def __init__(
        self,
        reactor: Any,
        server: str,
        port: int,
        config: FleetConfig,
        local_address: str = "",
        rng: random.Random | None = None,
    ) -> None:
        self._reactor = reactor
        self._server = server
        self.server_port = port
        self._config = config
        self._local = local_address
        self._rng = rng or random.SystemRandom()
        self.metrics = MetricSet("stun_client")
        self.counters = FleetCounters(self.metrics)
        self.refused_count = self.metrics.counter("refused", "ICMP port unreachable reports (server not listening)")
        self.socket_errors = self.metrics.counter(
            "socket_errors", "Failed socket opens, sends and receives (a send without a socket included)"
        )
        self.metrics.gauge("clients", "Clients started", lambda: self.fleet.started if self.fleet else 0)
        self.metrics.histogram("rtt_seconds", "Binding round-trip times", lambda: self.fleet.rtt if self.fleet else None)
        self.fleet: ClientFleet | None = None
        self._server_ip: str | None = None
        self._ports: list[ClientSocket | None] = []
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        try:
            ipaddress.ip_address(self._server)
        except ValueError:
            self._reactor.resolve(self._server).addCallbacks(self._start, self._unresolved)
        else:
            self._start(self._server)

    def _unresolved(self, failure: Failure) -> None:
        log.critical(
            "Cannot resolve STUN server {server}: {reason}; check --server / STUN_SERVER_IP",
            event="resolve_failed",
            server=self._server,
            reason=failure.getErrorMessage(),
        )
        set_exit_status(self, 1)
        self._reactor.stop()

    def _start(self, server_ip: str) -> None:
        if not self.running:
            return
        self._server_ip = server_ip
        if not self._local and ":" in server_ip:
            self._local = "::"
        now = self._reactor.seconds()
        self._ports = [None] * self._config.clients
        self.fleet = ClientFleet(self._config, self.counters, now, self._rng)
        log.info(
            "Starting {clients} STUN clients against {server}, interval {interval:g} s, "
            "start delay {low:g}-{high:g} s{rfc}",
            event="clients_start",
            clients=self._config.clients,
            server=str(Address(server_ip, self.server_port)),
            interval=self._config.interval,
            low=self._config.start_delay[0],
            high=self._config.start_delay[1],
            rfc=", RFC 8489 retransmissions" if self._config.rfc_retransmit else "",
        )
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._config.resolution, now=True)

    def _tick(self) -> None:
        assert self.fleet is not None
        self.fleet.handle_timer(self._reactor.seconds())
        self._pump()

    def received(self, index: int, datagram: bytes) -> None:
        """A datagram on client C{index}'s socket."""
        if self.fleet is not None:
            self.fleet.receive(index, datagram, self._reactor.seconds())
            self._pump()

    def refused(self, index: int) -> None:
        """ICMP port unreachable on client C{index}'s socket: nobody listens at the server address."""
        self.refused_count.value += 1
        if self.refused_count.value == 1:
            log.error(
                "Client {client}: STUN server {server} refused (ICMP port unreachable): is stun-server running there?",
                event="server_refused",
                client=index,
                server=str(Address(self._server_ip or self._server, self.server_port)),
            )

    def _pump(self) -> None:
        """Carry out every event the fleet produced."""
        fleet = self.fleet
        assert fleet is not None
        while (event := fleet.next_event()) is not None:
            if type(event) is Send:
                port = self._ports[event.client]
                if port is None:
                    self.socket_errors.value += 1
                else:
                    port.write(event.data)
            elif type(event) is OpenSocket:
                self._open(event)
            else:
                self._report(event)

    def local_port(self, index: int) -> int | None:
        """The local UDP port client C{index} currently sends from (None before it starts)."""
        port = self._ports[index] if index < len(self._ports) else None
        return port.local_port if port is not None else None

    def socket_error(self, index: int, error: OSError, action: str) -> None:
        """Opening, sending on or receiving on client C{index}'s socket failed (no route, ENOBUFS...).

        The first failure is logged as an error (usually a wrong address or a
        missing route, the same for every client); the others are counted.
        """
        self.socket_errors.value += 1
        if self.socket_errors.value == 1:
            log.error(
                "Client {client}: cannot {action} a UDP socket to {server}: {reason}; "
                "further socket errors are only counted (socket_errors in the summary)",
                event="socket_error",
                client=index,
                action=action,
                server=str(Address(self._server_ip or self._server, self.server_port)),
                reason=str(error),
            )

    def _open(self, event: OpenSocket) -> None:
        self._close(event.client)
        assert self._server_ip is not None
        try:
            port = ClientSocket(self, event.client, self._local, (self._server_ip, self.server_port))
        except OSError as error:
            self.socket_error(event.client, error, "open")
            return
        self._ports[event.client] = port
        self._reactor.addReader(port)
        if event.reason != "start":
            log.info(
                "Client {client}: new UDP socket, local port {local_port} ({reason})",
                event="socket_reopened",
                client=event.client,
                local_port=port.local_port,
                reason=event.reason,
            )

    def _close(self, index: int) -> None:
        port = self._ports[index]
        if port is not None:
            self._reactor.removeReader(port)
            port.close()
            self._ports[index] = None

    def _report(self, event: Any) -> None:
        """Log one finding with the original tool's wording."""
        if type(event) is ResponseMissing:
            log.warn(
                'Client {client}: Failed to receive STUN response for TrID "{trid}", mapped addr: {mapped}',
                event="response_missing",
                client=event.client,
                trid=format_transaction_id(event.transaction_id),
                mapped=format_mapped(event.mapped),
                consecutive=event.consecutive,
            )
        elif type(event) is ConsecutiveFailures:
            log.error(
                'Client {client}: Failed to receive {count} consecutive STUN response for TrID "{trid}", '
                "mapped addr: {mapped}",
                event="consecutive_failures",
                client=event.client,
                count=event.count,
                trid=format_transaction_id(event.transaction_id),
                mapped=format_mapped(event.mapped),
            )
        elif type(event) is UnexpectedResponse:
            log.warn(
                'Client {client}: Received STUN response with unexpected TrID "{trid}"',
                event="unexpected_response",
                client=event.client,
                trid=format_transaction_id(event.transaction_id),
            )
        elif type(event) is MappingChanged:
            log.warn(
                "Client {client}: mapped address changed from {old} to {new}",
                event="mapping_changed",
                client=event.client,
                old=str(event.old),
                new=str(event.new),
            )
        elif type(event) is ErrorResponse:
            log.warn(
                'Client {client}: STUN error response {code} {reason} for TrID "{trid}"',
                event="error_response",
                client=event.client,
                code=event.code,
                reason=event.reason,
                trid=format_transaction_id(event.transaction_id),
            )

    def summary(self) -> dict[str, Any]:
        counters = self.counters
        fleet = self.fleet
        return {
            "clients": fleet.started if fleet else 0,
            "requests": counters.requests.value,
            "responses": counters.responses.value,
            "loss_pct": round(fleet.loss_percent(), 3) if fleet else 0.0,
            "rtt_p50_ms": round(fleet.rtt.percentile(0.5) * 1000, 3) if fleet else 0.0,
            "rtt_p99_ms": round(fleet.rtt.percentile(0.99) * 1000, 3) if fleet else 0.0,
            "timer_lag_p99_ms": round(fleet.timer_lag.percentile(0.99) * 1000, 3) if fleet else 0.0,
            "timeouts": counters.timeouts.value,
            "consecutive_failure_errors": counters.failures.value,
            "mapping_changes": counters.mapping_changes.value,
            "unexpected": counters.unexpected.value,
            "refused": self.refused_count.value,
            "socket_errors": self.socket_errors.value,
        }

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for index in range(len(self._ports)):
            self._close(index)
        return succeed(None)
