"""TCP transports that remember the errno that lost a connection.

Twisted turns a failed ``recv`` (ECONNRESET for a RST, ETIMEDOUT after
retransmissions, EHOSTUNREACH...) into a bare ConnectionLost and drops the
errno. These transports keep it in ``lost_errno``, so ``peer_reset`` lines
can say what the OS said. Only real POSIX reactors build TCP transports this
way; any other reactor (a test's MemoryReactor) gets the plain calls.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.interfaces import IConnector, IListeningPort, ITransport
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ClientFactory, Factory


class _RecordsErrno:
    """Mixin for tcp.Server / tcp.Client: keep the errno of the read that failed."""

    lost_errno: int | None = None
    socket: Any
    bufferSize: int

    def doRead(self) -> Any:
        try:
            data = self.socket.recv(self.bufferSize)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            self.lost_errno = error.errno
            return main.CONNECTION_LOST
        return self._dataReceived(data)  # type: ignore[attr-defined]


class ErrnoServer(_RecordsErrno, tcp.Server):
    """An accepted connection that remembers its lost errno."""


class ErrnoClient(_RecordsErrno, tcp.Client):
    """An outgoing connection that remembers its lost errno."""


class ErrnoPort(tcp.Port):
    """A listening port whose connections are L{ErrnoServer}s."""

    transport = ErrnoServer


class ErrnoConnector(tcp.Connector):
    """A connector whose connections are L{ErrnoClient}s."""

    def _makeTransport(self) -> ErrnoClient:
        return ErrnoClient(self.host, self.port, self.bindAddress, self, self.reactor)


def listen_tcp(reactor: Any, port: int, factory: Factory, backlog: int, interface: str) -> IListeningPort:
    """C{reactor.listenTCP}, with errno-recording connections on a real POSIX reactor."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.listenTCP(port, factory, backlog=backlog, interface=interface)
    listening = ErrnoPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


def connect_tcp(reactor: Any, host: str, port: int, factory: ClientFactory, timeout: float,
                bind_address: tuple[str, int] | None) -> IConnector:
    """C{reactor.connectTCP}, with an errno-recording connection on a real POSIX reactor."""
    if not isinstance(reactor, PosixReactorBase):
        return reactor.connectTCP(host, port, factory, timeout=timeout, bindAddress=bind_address)
    connector = ErrnoConnector(host, port, factory, timeout, bind_address, reactor)
    connector.connect()
    return connector


def lost_errno_text(transport: ITransport | None) -> str | None:
    """``ECONNRESET (104)`` for the transport (or the TCP transport under TLS) that lost its connection."""
    while transport is not None:
        code = getattr(transport, "lost_errno", None)
        if code is not None:
            return f"{errno.errorcode.get(code, 'errno')} ({code}: {os.strerror(code)})"
        transport = getattr(transport, "transport", None)
    return None
