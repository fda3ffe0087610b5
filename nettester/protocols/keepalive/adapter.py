"""What the server and client Twisted adapters share: the pump and close causes.

An adapter feeds its sans-IO core with ``clock.seconds()``, writes what the
core wants written, dispatches the returned events and keeps exactly one
IDelayedCall armed at the core's next deadline (moved with ``reset``, which
Twisted does lazily when the deadline only moves later: cheap per keep-alive).
"""

from __future__ import annotations

from collections.abc import Iterator

from OpenSSL.SSL import Error as TLSError
from service_identity import VerificationError
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from nettester import addresses
from nettester.interfaces import StreamCore
from nettester.logs import Logger
from nettester.protocols.keepalive.tls import tls_failure_text
from nettester.protocols.keepalive.transport import FIN, tcp_ending
from nettester.protocols.keepalive.wire import Event

log = Logger()

# Seconds a stopping service waits for its connections to finish closing.
SHUTDOWN_GRACE = 5.0

# Close causes, the vocabulary shared by both ends' logs and the report.
PEER_CLOSED = "peer_closed"  # the peer (or something in between) sent a FIN
PEER_RESET = "peer_reset"  # RST or another transport error
TLS_ERROR = "tls_error"  # handshake, certificate or record failure


def address_text(address: IAddress) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6, an IPv4-mapped one unmapped), as both ends log their
    4-tuple: the shared :func:`nettester.addresses.address_text` of a Twisted address."""
    return addresses.address_text((getattr(address, "host", str(address)), getattr(address, "port", 0)))


def close_cause(reason: Failure, closed_by_us: str | None, us: str, tcp_end: str | None = None) -> tuple[str, str]:
    """Classify a close: (cause, detail).

    ``closed_by_us`` is the reason we asked for the close (None when we did
    not); ``us`` is ``closed_by_server`` or ``closed_by_client``; ``tcp_end``
    is what the TCP transport saw (:func:`tcp_ending`). A clean end of stream we
    did not ask for is the peer's FIN, also under TLS without a close_notify;
    any other loss is a reset, detailed by the errno of the failed read when
    known, else by the exception text.
    """
    if closed_by_us is not None:
        return us, closed_by_us
    if reason.check(TLSError, VerificationError) is not None:
        assert reason.value is not None  # check() matched its type
        return TLS_ERROR, tls_failure_text(reason.value)
    if reason.check(ConnectionDone) is not None:
        return PEER_CLOSED, FIN
    if tcp_end == FIN:
        return PEER_CLOSED, "FIN without TLS close_notify"
    return PEER_RESET, tcp_end or str(reason.value)


class CoreProtocol(Protocol):
    """A Twisted Protocol driving one sans-IO keep-alive core.

    Subclasses create ``self.core`` in connectionMade, then call :meth:`pump`;
    they implement :meth:`handle_event`.
    """

    core: StreamCore

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._timer: IDelayedCall | None = None
        self._deadline: float | None = None
        self.closing: str | None = None

    def dataReceived(self, data: bytes) -> None:
        self.core.receive_data(data, self.clock.seconds())
        self.pump()

    def _timer_fired(self) -> None:
        self._timer = None
        self._deadline = None
        self.core.handle_timer(self.clock.seconds())
        self.pump()

    def pump(self) -> None:
        """Write what the core produced, dispatch its events, re-arm the timer."""
        core = self.core
        data = core.data_to_send()
        if data and self.closing is None:
            assert self.transport is not None  # the core runs while connected
            self.transport.write(data)
        while (event := core.next_event()) is not None:
            self.handle_event(event)
        deadline = core.get_timer()
        if deadline == self._deadline:
            return
        self._deadline = deadline
        if deadline is None:
            self.stop_timer()
            return
        delay = max(0.0, deadline - self.clock.seconds())
        if self._timer is not None:
            self._timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._timer_fired)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = None

    def handle_event(self, event: Event) -> None:
        raise NotImplementedError

    def close(self, why: str) -> None:
        """Close gracefully with a FIN (never a RST: the tool must not create what it looks for)."""
        if self.closing is None:
            self.closing = why
            self.stop_timer()
            assert self.transport is not None  # the core runs while connected
            self.transport.loseConnection()

    def connection_lost_cause(self, reason: Failure, us: str) -> tuple[str, str]:
        self.stop_timer()
        return close_cause(reason, self.closing, us, tcp_ending(self.transport))



class OpenConnections:
    """The open connections of a service, and Deferreds for "all of them are closed"."""

    def __init__(self, clock: IReactorTime, grace: float = SHUTDOWN_GRACE) -> None:
        self._clock = clock
        self._grace = grace
        self._open: set[CoreProtocol] = set()
        self._waiting: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[CoreProtocol]:
        return iter(list(self._open))

    def add(self, protocol: CoreProtocol) -> None:
        self._open.add(protocol)

    def discard(self, protocol: CoreProtocol) -> None:
        self._open.discard(protocol)
        if not self._open:
            waiting, self._waiting = self._waiting, []
            for deferred in waiting:
                deferred.callback(None)

    def when_empty(self) -> Deferred[None]:
        """Fires when none is open, or after the grace period (with a warning)."""
        if not self._open:
            return succeed(None)
        deferred: Deferred[None] = Deferred()
        self._waiting.append(deferred)
        timeout = self._clock.callLater(self._grace, self._give_up, deferred)

        def cancel_timeout(result: None) -> None:
            if timeout.active():
                timeout.cancel()
            return result

        return deferred.addCallback(cancel_timeout)

    def _give_up(self, deferred: Deferred[None]) -> None:
        if deferred in self._waiting:
            self._waiting.remove(deferred)
            log.warn("{count} connections still closing after {grace:g} s; stopping anyway",
                     event="shutdown_timeout", count=len(self._open), grace=self._grace)
            deferred.callback(None)
