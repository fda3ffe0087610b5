"""The one pump that drives a sans-IO datagram core from Twisted.

Every datagram adapter does the same three things after feeding its core:
write what the core wants written, hand the core's events to the layer
above, and re-arm a single ``IDelayedCall`` for the core's timer. This is
that loop, written once.

A core may also expose ``timer_version`` (see
``nettester.interfaces.VersionedTimer``): an integer that changes whenever
``get_timer()`` may have come earlier. The pump then asks for the timer only
when that number moved or no call is armed, so a datagram in costs one
attribute read, not a deadline computation (the CoAP layer's timer is a heap
plus three store sweeps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from nettester.interfaces import DatagramCore, VersionedTimer


class CorePump:
    """Runs ``core`` on ``reactor``: ``write(datagram, address)`` sends, ``dispatch(event)`` delivers.

    The timer is moved only when the core's deadline comes earlier than the
    call already scheduled; a call that fires before a deadline that moved
    later just re-arms. So a datagram in costs no timer rescheduling in the
    common case, where the deadline only ever moves later.

    ``events_first`` dispatches the events before writing the datagrams, for
    a core whose events make the place a datagram goes (the STUN fleet's
    ``OpenSocket`` opens the socket its next request is written to).
    ``after_timer(now)``, when given, runs after each timer call, early ones
    included (the STUN tester samples its report's time series there).

    A ``pump()`` called while one runs (a handler answering from inside
    ``dispatch``) folds into the running one: events are dispatched one at a
    time, in order, and what they queue is written by the outer loop.
    """

    __slots__ = ("_reactor", "core", "_write", "_dispatch", "_call", "_stopped", "_pumping", "_versioned",
                 "_version", "_events_first", "_after_timer")

    def __init__(self, reactor: IReactorTime, core: DatagramCore, write: Callable[[bytes, Any], object],
                 dispatch: Callable[[Any], object], events_first: bool = False,
                 after_timer: Callable[[float], object] | None = None) -> None:
        self._reactor = reactor
        self.core = core
        self._write = write
        self._dispatch = dispatch
        self._call: IDelayedCall | None = None
        self._stopped = False
        self._pumping = False
        self._events_first = events_first
        self._after_timer = after_timer
        #: the core, when it keeps a ``timer_version``; and the version the armed call is for
        self._versioned = cast(VersionedTimer, core) if isinstance(getattr(core, "timer_version", None), int) else None
        self._version = -1

    def receive(self, data: bytes, addr: Any) -> None:
        """Feed one datagram to the core, then pump."""
        self.core.receive_datagram(data, addr, self._reactor.seconds())
        self.pump()

    def pump(self) -> None:
        """Write, dispatch, re-arm; again while dispatching made the core want to write more."""
        if self._pumping:
            return
        self._pumping = True
        core = self.core
        write = self._write
        dispatch = self._dispatch
        try:
            if self._events_first:
                while (first := core.next_event()) is not None:
                    dispatch(first)
            while True:
                for datagram, address in core.datagrams_to_send():
                    write(datagram, address)
                event = core.next_event()
                if event is None:
                    break
                while event is not None:
                    dispatch(event)
                    event = core.next_event()
        finally:
            self._pumping = False
        versioned = self._versioned
        if versioned is not None and self._call is not None and versioned.timer_version == self._version:
            return  # the deadline can only have moved later: the armed call stands
        self._arm()

    def stop(self) -> None:
        """Cancel the timer; the core is not driven any more."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _arm(self) -> None:
        if self._stopped:
            return
        if self._versioned is not None:
            self._version = self._versioned.timer_version
        due = self.core.get_timer()
        call = self._call
        if due is None:
            if call is not None and call.active():
                call.cancel()
            self._call = None
            return
        if call is not None and call.active():
            if call.getTime() <= due:
                return  # fires early at worst, then re-arms
            call.cancel()
        self._call = self._reactor.callLater(max(0.0, due - self._reactor.seconds()), self.run_timer)

    def run_timer(self) -> None:
        """Run the core's timer if it is due, then pump: the reactor calls this when the
        timer fires; an adapter may too, to run a core's first tick at start."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        due = self.core.get_timer()
        now = self._reactor.seconds()
        if due is not None and due <= now:
            self.core.handle_timer(now)
        self.pump()
        if self._after_timer is not None:
            self._after_timer(now)
