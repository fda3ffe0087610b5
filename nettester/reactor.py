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
"""

from __future__ import annotations

import select
from typing import Any

from twisted.internet import udp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.python import log as legacy_log
from zope.interface import implementedBy

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


def install() -> DatagramEPollReactor:
    """Install this reactor as the global one (before anything imports ``twisted.internet.reactor``)."""
    reactor = DatagramEPollReactor()
    installReactor(reactor)
    return reactor
