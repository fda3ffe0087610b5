"""The ``stun-server`` role: Twisted UDP/TCP adapters around ``BindingResponder``.

UDP: one socket, or four with ``--other-address`` (RFC 5780: two IPs x two
ports), each feeding the same responder and writing the answer from the
socket the responder names. TCP (``--tcp``): RFC 8489 section 6.2.2 framing,
one message after the other, on the same port. ``--journal`` records every
received request (``nettester.protocols.stun.journal``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.udp import Port as UdpPort
from zope.interface import implementer

from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.stun.attribution import SessionTable
from nettester.protocols.stun.counters import ServerCounters
from nettester.protocols.stun.journal import Journal, JournalError
from nettester.protocols.stun.message import (
    HEADER_LENGTH,
    Address,
    StunDecodeError,
    check_header,
)
from nettester.protocols.stun.responder import (
    ALTERNATE_IP,
    ALTERNATE_PORT,
    PRIMARY,
    BindingResponder,
    Reply,
)
from nettester.reactor import datagram_sender, listen_udp
from nettester.service import failed_address, log_listen_failure, set_exit_status

log = Logger()

RECEIVE_BUFFER = 4 * 1024 * 1024
JOURNAL_FLUSH_INTERVAL = 1.0  # seconds: the journal on disk is at most this far behind
_IPV4_MAPPED_PREFIX = "::ffff:"


def unmap_ipv4(peer: tuple[str, int]) -> tuple[str, int]:
    """A dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d``; answer them as IPv4."""
    host = peer[0]
    if host.startswith(_IPV4_MAPPED_PREFIX) and "." in host:
        return (host[len(_IPV4_MAPPED_PREFIX) :], peer[1])
    return peer


def _no_clock() -> float:
    return 0.0


def _no_send(data: bytes, addr: tuple[str, int]) -> None:
    """Before ``serve``: nothing is answered."""


class StunDatagramProtocol(DatagramProtocol):
    """One server socket: hands every datagram to the responder, writes the answer."""

    noisy = False

    def __init__(self, via: int, sockets: list[UdpPort]) -> None:
        self._via = via
        self._sockets = sockets  # the listening ports, indexed like the responder's addresses
        self._sendto: list[Callable[[bytes, tuple[str, int]], object]] = []
        self._respond: Callable[..., Reply | None] | None = None
        self._bare: Callable[[bytes, tuple[str, int]], bytes | None] | None = None
        self._send_here: Callable[[bytes, tuple[str, int]], object] = _no_send
        self._counters: ServerCounters | None = None
        self._clock: Callable[[], float] = _no_clock
        self._journal: Journal | None = None
        self._listening = ""

    def serve(
        self,
        responder: BindingResponder,
        counters: ServerCounters,
        clock: Callable[[], float],
        journal: Journal | None = None,
        listening: str = "",
    ) -> None:
        """Start answering; called once every socket is bound (the responder needs their addresses).

        ``listening`` is this socket's address as the journal writes it.
        """
        self._respond = responder.respond
        self._sendto = [datagram_sender(port, self._send_failed) for port in self._sockets]
        self._send_here = self._sendto[self._via]
        # Every journalled request is recorded, and an RFC 5780 server names the socket: both take ``respond``.
        self._bare = responder.bare_answer if journal is None and not responder.rfc5780 else None
        self._counters = counters
        self._clock = clock
        self._journal = journal
        self._listening = listening

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        bare = self._bare
        answer = None if bare is None else bare(datagram, addr)  # a load generator's request, a known peer
        if answer is not None:
            send, to = self._send_here, addr
        else:
            peer = unmap_ipv4(addr) if addr[0][0] == ":" else addr
            now = self._clock()
            if self._journal is not None and len(datagram) >= 20 and datagram[:2] == b"\x00\x01":
                self._journal.record(now, datagram[8:20], peer, self._listening)
            assert self._respond is not None
            reply = self._respond(datagram, peer, self._via, now)
            if reply is None:
                return
            answer, send, to = reply[0], self._sendto[reply[1]], (addr[0], reply[2]) if reply[2] else addr
        try:
            send(answer, to)
        except OSError as error:
            self._send_failed(error, to)

    def _send_failed(self, _error: OSError, _to: tuple[str, int]) -> None:
        """A full send buffer (EAGAIN, ENOBUFS): count it, never a traceback per datagram."""
        assert self._counters is not None
        self._counters.dropped.inc("send_failed")


class StunStreamProtocol(Protocol):
    """STUN over TCP: messages back to back, each framed by its header length (RFC 8489 section 6.2.2)."""

    def __init__(self, responder: BindingResponder, clock: Callable[[], float]) -> None:
        self._responder = responder
        self._clock = clock
        self._buffer = b""

    def _peer(self) -> tuple[str, int]:
        assert self.transport is not None
        peer = self.transport.getPeer()
        return unmap_ipv4((getattr(peer, "host", ""), getattr(peer, "port", 0)))

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self._buffer += data
        while len(self._buffer) >= HEADER_LENGTH:
            try:
                size = HEADER_LENGTH + check_header(self._buffer)
            except StunDecodeError as error:
                # Framing is lost for good: nothing after this can be delimited.
                log.warn(
                    "Closing STUN/TCP connection from {peer}: not STUN ({reason})",
                    event="tcp_not_stun",
                    peer=str(Address(*self._peer())),
                    reason=str(error),
                )
                self._buffer = b""
                self.transport.loseConnection()
                return
            if len(self._buffer) < size:
                return
            frame, self._buffer = self._buffer[:size], self._buffer[size:]
            reply = self._responder.respond(frame, self._peer(), PRIMARY, self._clock())
            if reply is not None:
                self.transport.write(reply[0])


class _StreamFactory(Factory):
    noisy = False

    def __init__(self, responder: BindingResponder, clock: Callable[[], float]) -> None:
        self._responder = responder
        self._clock = clock

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return StunStreamProtocol(self._responder, self._clock)


def raise_receive_buffer(sock: socket.socket, wanted: int) -> int:
    """Ask for a ``wanted``-byte receive buffer; return what the kernel granted.

    SO_RCVBUFFORCE passes net.core.rmem_max when running as root (CAP_NET_ADMIN).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", socket.SO_RCVBUF), wanted)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


@implementer(IReportingService)
class StunServerService(Service):
    """Listens on UDP (one or four sockets) and optionally TCP; answers Binding requests."""

    def __init__(
        self,
        reactor: Any,
        port: int = 3478,
        interface: str = "",
        other_address: Address | None = None,
        tcp: bool = False,
        software: str = "nettester",
        receive_buffer: int = RECEIVE_BUFFER,
        stop_on_failure: bool = True,
        max_sessions: int = 100_000,
        journal: str | None = None,
        journal_max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._reactor = reactor
        self.sessions = SessionTable(max_sessions)
        self._journal_path = journal
        self._journal_max_bytes = journal_max_bytes
        self.journal: Journal | None = None
        self._flusher: LoopingCall | None = None
        self._stop_on_failure = stop_on_failure  # the role exits with status 1; an embedding service decides itself
        self._port = port
        self._interface = interface
        self._other = other_address
        self._tcp = tcp
        self._software = software
        self._receive_buffer = receive_buffer
        self.metrics = MetricSet("stun_server")
        self.counters = ServerCounters(self.metrics)
        self.metrics.gauge("sessions", "Tester sessions whose reception state is kept (--max-sessions)",
                           lambda: len(self.sessions))
        self.metrics.gauge("sessions_evicted_total", "Tester sessions evicted from the bounded table (LRU)",
                           lambda: self.sessions.evicted)
        self._udp: list[UdpPort] = []
        self._tcp_port: IListeningPort | None = None
        self.addresses: list[Address] = []
        self.failed: str | None = None

    def startService(self) -> None:
        super().startService()
        if self._journal_path is not None:
            try:
                self.journal = Journal(self._journal_path, self._journal_max_bytes)
            except JournalError as error:
                self.failed = str(error)
                log.critical("{reason}", event="journal_failed", reason=str(error))
                if self._stop_on_failure:
                    set_exit_status(self, 1)
                    self._reactor.callWhenRunning(self._reactor.stop)
                return
            self._flusher = LoopingCall(self.journal.flush)
            self._flusher.clock = self._reactor
            self._flusher.start(JOURNAL_FLUSH_INTERVAL, now=False)
        try:
            self._listen()
        except (CannotListenError, OSError) as error:
            self.failed = str(error)
            host, port = failed_address(error, self._interface or "0.0.0.0", self._port)
            log_listen_failure(host, port, "--port", error)
            self._close_all()
            if self._stop_on_failure:
                set_exit_status(self, 1)
                self._reactor.callWhenRunning(self._reactor.stop)

    def _listen(self) -> None:
        # With --port 0 the UDP port is the OS's pick; TCP may find that number taken: pick again.
        attempts = 5 if self._tcp and self._port == 0 else 1
        for attempt in range(attempts):
            try:
                self._listen_once()
                return
            except CannotListenError:
                if attempt == attempts - 1:
                    raise
                self._close_all()

    def _listen_once(self) -> None:
        self._udp.append(self._listen_udp(self._interface, self._port, PRIMARY))
        if self._other is not None:
            # RFC 5780 section 4.1: (IP1, P1), (IP1, P2), (IP2, P1), (IP2, P2).
            self._udp.append(self._listen_udp(self._interface, self._other.port, ALTERNATE_PORT))
            port1, port2 = (port.getHost().port for port in self._udp)
            self._udp.append(self._listen_udp(self._other.host, port1, ALTERNATE_IP))
            self._udp.append(self._listen_udp(self._other.host, port2, ALTERNATE_IP | ALTERNATE_PORT))
        self.addresses = [self._address_of(port) for port in self._udp]
        responder = BindingResponder(
            self.counters, self._software, self.addresses if self._other else None, self.sessions
        )
        for port, address in zip(self._udp, self.addresses, strict=True):
            port.protocol.serve(responder, self.counters, self._reactor.seconds, self.journal, str(address))
        granted = min(raise_receive_buffer(port.socket, self._receive_buffer) for port in self._udp)
        if self._tcp:
            self._tcp_port = self._reactor.listenTCP(
                self.addresses[0].port,
                _StreamFactory(BindingResponder(self.counters, self._software, sessions=self.sessions),
                               self._reactor.seconds),
                interface=self._interface,
            )
        log.info(
            "STUN server listening on {addresses} (udp{tcp}), receive buffer {granted} bytes as the kernel "
            "reports it (asked {asked})",
            event="listening",
            addresses=", ".join(str(address) for address in self.addresses),
            tcp="+tcp" if self._tcp else "",
            granted=granted,
            asked=self._receive_buffer,
        )

    def _listen_udp(self, interface: str, port: int, via: int) -> UdpPort:
        return listen_udp(self._reactor, port, StunDatagramProtocol(via, self._udp), interface, 65535)

    @staticmethod
    def _address_of(port: UdpPort) -> Address:
        host = port.getHost()
        return Address(host.host, host.port)

    @property
    def port(self) -> int:
        """The primary UDP port actually bound (useful with --port 0)."""
        return self.addresses[0].port

    def summary(self) -> dict[str, int]:
        counters = self.counters
        return {
            "requests": counters.requests.value,
            "responses": counters.responses.value,
            "errors": counters.errors.total,
            "dropped": counters.dropped.total,
            "changed": counters.changed.value,
            "attributed": counters.attributed.value,
            "sessions": len(self.sessions),
            "sessions_evicted": self.sessions.evicted,
            "attribution_invalid": counters.attribution_invalid.value,
        }

    def _close_all(self) -> Deferred[Any]:
        ports: Sequence[IListeningPort] = [*self._udp, *([self._tcp_port] if self._tcp_port is not None else [])]
        del self._udp[:]
        self._tcp_port = None
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._flusher is not None and self._flusher.running:
            self._flusher.stop()
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        return self._close_all()
