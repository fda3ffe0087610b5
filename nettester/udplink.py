"""Plain UDP as an IDatagramLink: what CoAP (``coap://``) runs over.

Peers are ``(host, port)`` tuples. Sending goes straight to the socket's
``sendto``: Twisted's ``Port.write`` re-validates the address text on every
datagram, which a 40,000 datagram/s server cannot afford; the few errors a
non-blocking UDP send can raise are counted and dropped here instead.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorCore
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nettester.interfaces import IDatagramLink, IDatagramReceiver
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.reactor import Send, datagram_sender

log = Logger()

UdpPeer = tuple[str, int]

# Errors a datagram send may hit without the socket being broken.
_TRANSIENT_SEND_ERRORS = frozenset(
    (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
     errno.EMSGSIZE, errno.EPERM, errno.EINTR)
)


@implementer(IDatagramLink)
class UdpLink(DatagramProtocol):
    """A UDP socket handing datagrams to its ``receiver``.

    ``receive_buffer`` raises SO_RCVBUF: the default (about 208 KB) holds only
    a couple of hundred queued datagrams, too few under load.
    """

    noisy = False  # a bench opens thousands: no "Starting protocol" line for each

    def __init__(
        self,
        receiver: IDatagramReceiver | None = None,
        scheme: str = "coap",
        receive_buffer: int | None = None,
        resolver: IReactorCore | None = None,
    ) -> None:
        self.receiver = receiver
        self.scheme = scheme
        self.receive_buffer = receive_buffer
        self._resolver = resolver
        self._sendto: Send | None = None
        #: Datagrams that could not be sent (counted, never raised).
        self.send_errors = 0

    def startProtocol(self) -> None:
        sock: socket.socket = self.transport.getHandle()  # type: ignore[union-attr]
        if self.receive_buffer:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        self._sendto = datagram_sender(self.transport, self._send_failed)

    def stopProtocol(self) -> None:
        self._sendto = None

    def datagramReceived(self, data: bytes, addr: UdpPeer) -> None:
        receiver = self.receiver
        if receiver is not None:
            receiver.datagramReceived(data, addr)

    def send_datagram(self, data: bytes, peer: UdpPeer) -> None:
        """Send one datagram; transient failures are counted and logged at debug."""
        sendto = self._sendto
        if sendto is None:
            self.send_errors += 1
            return
        try:
            sendto(data, peer)
        except OSError as error:
            if error.errno not in _TRANSIENT_SEND_ERRORS:
                raise
            self._send_failed(error, peer)

    def _send_failed(self, error: OSError, peer: UdpPeer) -> None:
        """Count a send the kernel refused; one refused after the call (a batched send) is logged whatever it was."""
        self.send_errors += 1
        log.debug("udp send to {peer} failed: {error}", event="udp_send_failed", peer=peer, error=error)

    def connect(self, address: tuple[str, int]) -> defer.Deferred[UdpPeer]:
        """The peer handle for ``address``: the address itself, resolved if a name."""
        host, port = address
        if isIPAddress(host) or isIPv6Address(host) or self._resolver is None:
            return defer.succeed((host, port))
        resolving: defer.Deferred[str] = self._resolver.resolve(host)
        return resolving.addCallback(lambda resolved: (resolved, port))

    def peer_context(self, peer: UdpPeer) -> PeerContext:
        """Plain UDP knows only the address (an IPv4 peer of a dual-stack socket unmapped)."""
        host, port = peer[0], peer[1]
        if host.startswith("::ffff:") and isIPAddress(host[7:]):
            host = host[7:]
        return PeerContext(address=(host, port), scheme=self.scheme)
