"""The epoll reactor with a lean read path for datagram sockets.

Twisted's epoll reactor wraps every readiness event in
``log.callWithLogger`` (a log-prefix lookup and a context push for legacy
log lines) and ``_doReadOrWrite`` (a ``fileno()`` check and the disconnect
bookkeeping stream connections need). For a UDP socket that wakes the
reactor once per datagram, as a cluster node relaying records or a server at
moderate load does, that costs about 4.5 us per wake-up: more than reading
and routing the datagram itself. This reactor calls ``doRead`` directly for
datagram readers on a read or error event; every other event, and every other
descriptor, takes Twisted's path unchanged.

An error event on a datagram socket is not a disconnection: it is an ICMP
error (port unreachable, host unreachable) queued on the socket, which the
next ``recv`` raises (``ConnectionRefusedError`` for a connected socket,
cf. ``ip(7)`` / ``udp(7)``). epoll reports it as ``EPOLLERR`` without
``EPOLLIN`` when no datagram is queued; Twisted's path would take that for a
lost connection and close the socket under its owner (whose next send then
fails with ``EBADF``). The select reactor reports it as readable, so the
reader sees the refusal; so does this reactor.

A datagram reader is a ``twisted.internet.udp.Port`` (its ``doRead`` never
returns a disconnect reason) or a descriptor that declares
``IDatagramReadDescriptor``. An exception escaping such a ``doRead`` is logged
and closes the descriptor, as Twisted does.

``nettester`` installs it on Linux; ``twistd --reactor nettester-epoll``
selects it under twistd (its plugin is in ``twisted/plugins``).

``DrainingPort`` is the one UDP read loop of the servers (CoAP, STUN, the
cluster node's sockets), and ``listen_udp`` opens one: on Linux a
``BatchingPort``, which reads a wake-up's datagrams with one ``recvmmsg``
and sends the answers they made with one ``sendmmsg`` (``nettester.mmsg``).
A protocol sends fast through ``datagram_sender``. ``DatagramSocket`` is
the one read loop of the plain client and outgoing sockets (the stun-client's
``ClientSocket``, the NAT's ``OutgoingSocket``), thousands of which stay
lighter than as many ``udp.Port``.
"""

from __future__ import annotations

import fcntl
import select
import socket
import termios
from collections.abc import Callable
from typing import Any

from twisted.internet import udp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.main import installReactor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import DatagramProtocol
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface import implementedBy, implementer

from nettester import mmsg
from nettester.interfaces import IDatagramReadDescriptor
from nettester.logs import Logger

log = Logger()

SHORT_NAME = "nettester-epoll"

# The events a datagram reader handles itself with ``doRead``: data, a queued ICMP error, or both.
_DATAGRAM_READ_EVENTS = frozenset((select.EPOLLIN, select.EPOLLERR, select.EPOLLIN | select.EPOLLERR))


def is_datagram_reader(cls: type) -> bool:
    """Whether instances of ``cls`` may be read without Twisted's per-event wrapping."""
    return issubclass(cls, udp.Port) or IDatagramReadDescriptor in implementedBy(cls)


class DatagramEPollReactor(EPollReactor):
    """``EPollReactor`` that reads datagram sockets without the per-event logging context."""

    def __init__(self) -> None:
        self._datagram_reader_classes: dict[type, bool] = {}
        super().__init__()

    def doPoll(self, timeout: float | None) -> None:
        """Poll once and dispatch, as ``EPollReactor.doPoll`` does, datagram readers directly."""
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except InterruptedError:  # EINTR (a signal): the main loop polls again
            return
        selectables = self._selectables
        readers = self._datagram_reader_classes
        datagram_events = _DATAGRAM_READ_EVENTS
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event in datagram_events:
                cls = type(selectable)
                lean = readers.get(cls)
                if lean is None:
                    lean = readers[cls] = is_datagram_reader(cls)
                if lean:
                    self._read_datagrams(selectable)
                    continue
            legacy_log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)

    def _read_datagrams(self, selectable: Any) -> None:
        try:
            selectable.doRead()
        except Exception as error:  # noqa: BLE001 - as Twisted: log, then close the descriptor
            log.failure("Reading {descriptor} failed; closing it", event="reader_failed",
                        descriptor=type(selectable).__name__)
            self._disconnectSelectable(selectable, error, True)

    doIteration = doPoll


MAX_DATAGRAMS_PER_READ = 64  # then the reactor serves the other sockets and timers
PROBED_READS = 2  # reads followed by a FIONREAD probe; after them the loop reads until EAGAIN
_NOTHING_PENDING = b"\0\0\0\0"

Address = tuple[str, int]
SendFailed = Callable[[OSError, Address], None]
Send = Callable[[bytes, Address], object]


class DrainingPort(udp.Port):
    """A UDP port that reads what is queued on its socket in one wake-up, at the least cost per datagram.

    Twisted's ``Port.doRead`` reads until ``recvfrom`` raises EAGAIN;
    creating, raising and catching that error costs about as much as
    reading a datagram, which a wake-up that finds one datagram (a relaying
    cluster node, a server at moderate load) pays in full. Here the first
    ``PROBED_READS`` reads are each followed by FIONREAD (Linux udp(7): the
    size of the next pending datagram, 0 when none), a third of that cost,
    which ends the loop without an error. A wake-up that found more than
    that is a loaded socket: the loop goes on reading, up to
    ``MAX_DATAGRAMS_PER_READ``, with no probe per datagram, and the one
    EAGAIN at the end, if it comes, is shared by the whole batch. A pending
    empty datagram also reads as 0; the level-triggered reactor then reports
    the socket again at once.
    """

    def doRead(self) -> None:
        sock = self.socket
        recvfrom = sock.recvfrom
        received = self.protocol.datagramReceived
        size = self.maxPacketSize
        fileno = sock.fileno()
        pending = bytearray(4)
        ipv6 = self.addressFamily == socket.AF_INET6
        for count in range(MAX_DATAGRAMS_PER_READ):
            try:
                datagram, address = recvfrom(size)
            except (BlockingIOError, InterruptedError):
                return  # drained, or a spurious wake-up
            except ConnectionRefusedError:  # an ICMP error queued on a connected socket (udp(7))
                if self._connectedAddr:
                    self.protocol.connectionRefused()
                return
            try:
                received(datagram, address[:2] if ipv6 else address)  # no flow info or scope id, as Port does
            except Exception:  # noqa: BLE001 - one bad datagram must not close the port (as Port does)
                log.failure("Datagram from {peer} not handled", event="datagram_handler_failed", peer=address)
            if count < PROBED_READS:
                fcntl.ioctl(fileno, termios.FIONREAD, pending)
                if pending == _NOTHING_PENDING:
                    return


    def sender(self, failed: SendFailed) -> Send:
        """The fastest send from this port: the socket's own ``sendto``, whose errors raise at the call.

        ``Port.write`` re-validates the address text on every datagram; the
        address here is the one ``recvfrom`` gave (or its port replaced),
        valid by construction. ``failed`` is for :class:`BatchingPort`, whose
        batched sends fail after the call.
        """
        send: Send = self.socket.sendto
        return send


class BatchingPort(DrainingPort):
    """A server port that reads with one ``recvmmsg`` per wake-up and sends what those datagrams
    answered with one ``sendmmsg`` (``nettester.mmsg``), at the end of the wake-up.

    The protocol sees nothing new: ``datagramReceived(datagram, (host, port))`` per
    datagram, in order. What it sends through :meth:`sender` while the batch
    is being handled is queued and sent when the batch ends, in order; a send
    outside a batch (a timer's retransmission) goes out at once, as does one
    too long to queue, after what was queued. A queued send the kernel
    refuses goes to the ``failed`` handler given to :meth:`sender`, as the
    same error ``sendto`` would have raised.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch = mmsg.DatagramBatch(self.addressFamily, self.maxPacketSize)
        self._handling = False

    def doRead(self) -> None:
        batch = self._batch
        fileno = self.socket.fileno()
        try:
            count = batch.receive(fileno)
        except ConnectionRefusedError:  # an ICMP error queued on a connected socket (udp(7))
            if self._connectedAddr:
                self.protocol.connectionRefused()
            return
        received = self.protocol.datagramReceived
        data, size, lengths = batch.data, batch.size, batch.lengths
        header_words, length_word = batch.header_words, batch.length_word
        names, name_end, sources, source = batch.names, batch.name_length, batch.sources, batch.source
        name_slot = mmsg.NAME_SLOT
        self._handling = True
        try:
            for index in range(count):
                start = index * size
                datagram = data[start:start + lengths[index * header_words + length_word]]
                name = index * name_slot
                address = sources.get(names[name + 2:name + name_end]) or source(index)  # source: a new peer
                try:
                    received(datagram, address)
                except Exception:  # noqa: BLE001 - one bad datagram must not close the port (as Port does)
                    log.failure("Datagram from {peer} not handled", event="datagram_handler_failed", peer=address)
        finally:
            self._handling = False
            batch.flush(fileno)

    def sender(self, failed: SendFailed) -> Send:
        """A send that joins the current batch (see the class docstring); outside one, ``sendto``."""
        batch, sendto = self._batch, self.socket.sendto
        queue, flush, fileno = batch.queue, batch.flush, self.socket.fileno()

        def send(data: bytes, address: Address) -> None:
            if self._handling and queue(data, address, failed):
                return
            flush(fileno)  # what was queued goes first
            sendto(data, address)

        return send

    def write(self, datagram: bytes, addr: Any = None) -> None:
        """``Port.write``, after what the batch has queued."""
        self._batch.flush(self.socket.fileno())
        super().write(datagram, addr)


def datagram_sender(transport: Any, failed: SendFailed) -> Send:
    """How a protocol sends fast through ``transport``: its port's :meth:`DrainingPort.sender`, or the
    socket's ``sendto`` for any other ``udp.Port``."""
    sender = getattr(transport, "sender", None)
    if sender is not None:
        chosen: Send = sender(failed)
        return chosen
    plain: Send = transport.getHandle().sendto
    return plain


@implementer(IReadDescriptor, IDatagramReadDescriptor)
class DatagramSocket:
    """A plain non-blocking UDP socket, bound to any port of ``local``'s family and read by the reactor directly.

    No ``udp.Port``: no log line per socket opened or closed, a few slots of
    memory. Each wake-up reads at most ``MAX_READS`` datagrams, so one busy
    socket cannot starve the others. A subclass handles a datagram in
    ``datagram_received`` and a receive error in ``read_failed``: an ICMP
    error queued on the socket raises ``ConnectionRefusedError`` on the next
    receive (udp(7)); this reactor reads it on ``EPOLLERR`` (see above).

    :raises OSError: when no socket can be opened or bound (e.g. too many open files).
    """

    __slots__ = ("socket",)

    MAX_READS = 64  # per readiness event
    MAX_SIZE = 65536

    def __init__(self, family: int, local: str) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((local, 0))
        except OSError:
            sock.close()
            raise
        self.socket = sock

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "udp"

    def doRead(self) -> None:
        recvfrom = self.socket.recvfrom
        size = self.MAX_SIZE
        for _ in range(self.MAX_READS):
            try:
                datagram, source = recvfrom(size)
            except BlockingIOError:
                return
            except OSError as error:
                if self.read_failed(error):
                    continue
                return
            self.datagram_received(datagram, source)

    def datagram_received(self, datagram: bytes, source: Any) -> None:
        """One datagram from ``source`` (the socket's address tuple)."""
        raise NotImplementedError

    def read_failed(self, error: OSError) -> bool:
        """A receive failed (``ConnectionRefusedError``: an ICMP port unreachable); True reads on."""
        raise NotImplementedError

    def close(self) -> None:
        self.socket.close()

    def connectionLost(self, reason: Failure) -> None:
        self.socket.close()


def server_port_class() -> type[DrainingPort]:
    """:class:`BatchingPort` where ``recvmmsg``/``sendmmsg`` can be used (``nettester.mmsg.available``),
    else :class:`DrainingPort`."""
    return BatchingPort if mmsg.available() else DrainingPort


def listen_udp(reactor: Any, port: int, protocol: DatagramProtocol, interface: str = "",
               max_packet_size: int = 8192) -> Any:
    """``reactor.listenUDP`` with a :func:`server_port_class` port on a real POSIX reactor (a test's
    fake reactor keeps its own)."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenUDP(port, protocol, interface=interface, maxPacketSize=max_packet_size)
    listening = server_port_class()(port, protocol, interface=interface, maxPacketSize=max_packet_size,
                                    reactor=reactor)
    listening.startListening()
    return listening


def install() -> DatagramEPollReactor:
    """Install this reactor as the global one (before anything imports ``twisted.internet.reactor``)."""
    reactor = DatagramEPollReactor()
    installReactor(reactor)
    return reactor
