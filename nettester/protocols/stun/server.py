"""The ``stun-server`` role: Twisted UDP/TCP adapters around :class:`BindingResponder`.

UDP: one socket, or four with ``--other-address`` (RFC 5780: two IPs x two
ports), each feeding the same responder and writing the answer from the
socket the responder names. TCP (``--tcp``): RFC 8489 section 6.2.2 framing,
one message after the other, on the same port.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from zope.interface import implementer

from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import ServerCounters
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
)
from nettester.service import set_exit_status

log = Logger()

RECEIVE_BUFFER = 4 * 1024 * 1024
_IPV4_MAPPED_PREFIX = "::ffff:"


def unmap_ipv4(peer: tuple[str, int]) -> tuple[str, int]:
    """A dual-stack socket reports IPv4 peers as ``::ffff:a.b.c.d``; answer them as IPv4."""
    host = peer[0]
    if host.startswith(_IPV4_MAPPED_PREFIX) and "." in host:
        return (host[len(_IPV4_MAPPED_PREFIX) :], peer[1])
    return peer


class StunDatagramProtocol(DatagramProtocol):
    """One server socket: hands every datagram to the responder, writes the answer."""

    noisy = False

    def __init__(self, via: int, sockets: list[Any]) -> None:
        self._via = via
        self._sockets = sockets  # the listening ports, indexed like the responder's addresses
        self._respond: Any = None
        self._counters: ServerCounters | None = None

    def serve(self, responder: BindingResponder, counters: ServerCounters) -> None:
        """Start answering; called once every socket is bound (the responder needs their addresses)."""
        self._respond = responder.respond
        self._counters = counters

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        peer = unmap_ipv4(addr) if addr[0][0] == ":" else addr
        reply = self._respond(datagram, peer, self._via)
        if reply is not None:
            try:
                self._sockets[reply[1]].write(reply[0], (addr[0], reply[2]) if reply[2] else addr)
            except OSError:  # a full send buffer (EAGAIN, ENOBUFS): count it, never a traceback per datagram
                assert self._counters is not None
                self._counters.dropped.inc("send_failed")


class StunStreamProtocol(Protocol):
    """STUN over TCP: messages back to back, each framed by its header length (RFC 8489 section 6.2.2)."""

    def __init__(self, responder: BindingResponder) -> None:
        self._responder = responder
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= HEADER_LENGTH:
            try:
                size = HEADER_LENGTH + check_header(self._buffer)
            except StunDecodeError as error:
                # Framing is lost for good: nothing after this can be delimited.
                peer = self.transport.getPeer()
                log.warn(
                    "Closing STUN/TCP connection from {peer}: not STUN ({reason})",
                    event="tcp_not_stun",
                    peer=f"{peer.host}:{peer.port}",
                    reason=str(error),
                )
                self._buffer = b""
                self.transport.loseConnection()
                return
            if len(self._buffer) < size:
                return
            frame, self._buffer = self._buffer[:size], self._buffer[size:]
            peer = self.transport.getPeer()
            reply = self._responder.respond(frame, unmap_ipv4((peer.host, peer.port)))
            if reply is not None:
                self.transport.write(reply[0])


class _StreamFactory(Factory):
    noisy = False

    def __init__(self, responder: BindingResponder) -> None:
        self._responder = responder

    def buildProtocol(self, addr: IAddress) -> Protocol:
        return StunStreamProtocol(self._responder)


def raise_receive_buffer(sock: socket.socket, wanted: int) -> int:
    """Ask for a C{wanted}-byte receive buffer; return what the kernel granted.

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
    ) -> None:
        self._reactor = reactor
        self._stop_on_failure = stop_on_failure  # the role exits with status 1; an embedding service decides itself
        self._port = port
        self._interface = interface
        self._other = other_address
        self._tcp = tcp
        self._software = software
        self._receive_buffer = receive_buffer
        self.metrics = MetricSet("stun_server")
        self.counters = ServerCounters(self.metrics)
        self._udp: list[Any] = []
        self._tcp_port: IListeningPort | None = None
        self.addresses: list[Address] = []
        self.failed: str | None = None

    def startService(self) -> None:
        super().startService()
        try:
            self._listen()
        except (CannotListenError, OSError) as error:
            self.failed = str(error)
            log.critical(
                "Cannot listen on {what}: {reason}; choose another --port/--interface or stop what is using it",
                event="listen_failed",
                what=self._where(),
                reason=str(error),
            )
            self._close_all()
            if self._stop_on_failure:
                set_exit_status(self, 1)
                self._reactor.callWhenRunning(self._reactor.stop)

    def _where(self) -> str:
        return str(Address(self._interface or "0.0.0.0", self._port))

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
        responder = BindingResponder(self.counters, self._software, self.addresses if self._other else None)
        for port in self._udp:
            port.protocol.serve(responder, self.counters)
        granted = min(raise_receive_buffer(port.socket, self._receive_buffer) for port in self._udp)
        if self._tcp:
            self._tcp_port = self._reactor.listenTCP(
                self.addresses[0].port,
                _StreamFactory(BindingResponder(self.counters, self._software)),
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

    def _listen_udp(self, interface: str, port: int, via: int) -> Any:
        return self._reactor.listenUDP(
            port, StunDatagramProtocol(via, self._udp), interface=interface, maxPacketSize=65535
        )

    @staticmethod
    def _address_of(port: Any) -> Address:
        host = port.getHost()
        return Address(host.host, host.port)

    @property
    def port(self) -> int:
        """The primary UDP port actually bound (useful with --port 0)."""
        return self.addresses[0].port

    def summary(self) -> dict[str, Any]:
        counters = self.counters
        return {
            "requests": counters.requests.value,
            "responses": counters.responses.value,
            "errors": counters.errors.total,
            "dropped": counters.dropped.total,
            "changed": counters.changed.value,
        }

    def _close_all(self) -> Deferred[Any]:
        ports: Sequence[Any] = [*self._udp, *([self._tcp_port] if self._tcp_port is not None else [])]
        del self._udp[:]
        self._tcp_port = None
        return DeferredList([maybeDeferred(port.stopListening) for port in ports])

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self._close_all()
