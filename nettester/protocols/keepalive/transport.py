"""TCP transports of the keep-alive roles: they keep the errno or FIN, and send at once.

Twisted turns a failed ``recv`` (ECONNRESET for a RST, ETIMEDOUT after
retransmissions, EHOSTUNREACH...) into a bare ConnectionLost and drops the
errno. These transports keep it in ``lost_errno``, so ``peer_reset`` lines
can say what the OS said. They also note a FIN (``saw_fin``): under TLS,
Twisted reports a FIN without a TLS close_notify as a lost connection too,
and only the TCP layer can tell it from a RST.

They also send a write at once when nothing is queued, instead of queueing it
and asking epoll for writability (two ``epoll_ctl`` calls and a reactor turn
per keep-alive): the hot path of a server answering tens of thousands of
connections. Anything not sent at once is queued as usual.

Only real POSIX reactors build TCP transports this way; any other reactor
(a test's MemoryReactor) gets the plain calls.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IConnector, IListeningPort, ITransport
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory

FIN = "FIN"


class _LeanTransport:
    """Mixin for tcp.Server / tcp.Client: keep the errno of the read that failed (or that it read
    the peer's FIN), send at once."""

    lost_errno: int | None = None
    saw_fin = False
    socket: socket.socket
    bufferSize: int
    connected: int  # FileDescriptor keeps 0 or 1
    disconnecting: int
    # Twisted's FileDescriptor buffers: nothing is queued when both are empty.
    dataBuffer: bytes
    offset: int
    _tempDataBuffer: list[bytes]
    _writeDisconnected: bool

    def write(self, data: bytes) -> None:
        if (data and self.connected and not self.disconnecting and not self._writeDisconnected
                and not self._tempDataBuffer and self.offset >= len(self.dataBuffer)):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error the queued write reports through doWrite
            data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def doRead(self) -> Any:
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            self.lost_errno = error.errno
            return main.CONNECTION_LOST
        if not data:
            self.saw_fin = True
        return self._dataReceived(data)  # type: ignore[attr-defined]


class LeanServer(_LeanTransport, tcp.Server):
    """An accepted connection."""


class LeanClient(_LeanTransport, tcp.Client):
    """An outgoing connection."""


class LeanPort(tcp.Port):
    """A listening port whose connections are :class:`LeanServer`s."""

    transport = LeanServer


class LeanConnector(tcp.Connector):
    """A connector whose connections are :class:`LeanClient`s."""

    def _makeTransport(self) -> LeanClient:
        return LeanClient(self.host, self.port, self.bindAddress, self, self.reactor)


def listen_tcp(reactor: Any, port: int, factory: Factory, backlog: int, interface: str) -> IListeningPort:
    """``reactor.listenTCP``, with lean connections on a real POSIX reactor."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = LeanPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def connect_tcp(reactor: Any, host: str, port: int, factory: ClientFactory, timeout: float) -> IConnector:
    """``reactor.connectTCP``, with a lean connection on a real POSIX reactor."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    connector = LeanConnector(host, port, factory, timeout, None, reactor)
    connector.connect()
    return connector


def tcp_ending(transport: ITransport | None) -> str | None:
    """How the TCP connection under ``transport`` (TLS included) ended, when a lean transport saw it:
    ``ECONNRESET (104: Connection reset by peer)`` for a failed read, :data:`FIN` for the peer's FIN."""
    while transport is not None:
        code = getattr(transport, "lost_errno", None)
        if code is not None:
            return f"{errno.errorcode.get(code, 'errno')} ({code}: {os.strerror(code)})"
        if getattr(transport, "saw_fin", False):
            return FIN
        transport = getattr(transport, "transport", None)
    return None
