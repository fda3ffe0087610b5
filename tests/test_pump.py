"""The shared pump, on task.Clock with a small scripted core."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from nettester.interfaces import DatagramCore
from nettester.pump import CorePump


class EchoCore:
    """Echoes each datagram back, reports it as an event, and retransmits it once after ``delay`` seconds."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self.outgoing: list[tuple[bytes, Any]] = []
        self.events: list[bytes] = []
        self.pending: list[tuple[float, bytes, Any]] = []
        self.timer_calls: list[float] = []

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        self.outgoing.append((data, addr))
        self.events.append(data)
        self.pending.append((now + self.delay, data, addr))

    def datagrams_to_send(self) -> list[tuple[bytes, Any]]:
        out, self.outgoing = self.outgoing, []
        return out

    def get_timer(self) -> float | None:
        return min((due for due, _, _ in self.pending), default=None)

    def handle_timer(self, now: float) -> None:
        self.timer_calls.append(now)
        due_now = [entry for entry in self.pending if entry[0] <= now]
        self.pending = [entry for entry in self.pending if entry[0] > now]
        self.outgoing += [(b"again " + data, addr) for _, data, addr in due_now]

    def next_event(self) -> bytes | None:
        return self.events.pop(0) if self.events else None


def make(delay: float = 1.0) -> tuple[Clock, EchoCore, CorePump, list[tuple[bytes, Any]], list[Any]]:
    clock, core = Clock(), EchoCore(delay)
    written: list[tuple[bytes, Any]] = []
    dispatched: list[Any] = []
    pump = CorePump(clock, core, lambda data, addr: written.append((data, addr)), dispatched.append)
    return clock, core, pump, written, dispatched


def test_the_echo_core_follows_the_contract() -> None:
    core: DatagramCore = EchoCore()  # mypy checks the structural match
    assert core.get_timer() is None


def test_a_datagram_is_written_dispatched_and_its_timer_armed() -> None:
    clock, core, pump, written, dispatched = make()
    pump.receive(b"one", ("127.0.0.1", 5683))
    assert written == [(b"one", ("127.0.0.1", 5683))] and dispatched == [b"one"]
    assert [call.getTime() for call in clock.getDelayedCalls()] == [1.0]
    clock.advance(1.0)
    assert written[-1] == (b"again one", ("127.0.0.1", 5683)) and core.timer_calls == [1.0]
    assert clock.getDelayedCalls() == []


def test_a_later_deadline_keeps_the_scheduled_call_and_an_early_firing_only_rearms() -> None:
    clock, core, pump, written, _ = make()
    pump.receive(b"a", "peer")
    clock.advance(0.5)
    core.pending = [(5.0, b"a", "peer")]  # the core's deadline moved later
    pump.receive(b"b", "peer")  # b is due at 1.5: later than the call at 1.0, which stays
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == 1.0
    clock.advance(0.5)  # fires at 1.0, before any deadline: no handle_timer, re-armed for 1.5
    assert core.timer_calls == [] and [c.getTime() for c in clock.getDelayedCalls()] == [1.5]
    clock.advance(0.5)
    assert core.timer_calls == [1.5] and written[-1] == (b"again b", "peer")


def test_an_earlier_deadline_moves_the_call_and_stop_cancels_it() -> None:
    clock, core, pump, _, _ = make(delay=10.0)
    pump.receive(b"slow", "peer")
    core.delay = 1.0
    pump.receive(b"fast", "peer")
    assert [call.getTime() for call in clock.getDelayedCalls()] == [1.0]
    pump.stop()
    assert clock.getDelayedCalls() == []
    pump.receive(b"after", "peer")  # still fed, never re-armed
    assert clock.getDelayedCalls() == []


def test_run_timer_runs_a_due_timer_at_once_and_leaves_an_early_call_alone() -> None:
    clock, core, pump, written, _ = make(delay=1.0)
    pump.receive(b"x", "peer")
    clock.advance(0.5)
    pump.run_timer()  # not due yet: nothing runs, the timer stays armed
    assert core.timer_calls == [] and [call.getTime() for call in clock.getDelayedCalls()] == [1.0]
    clock.advance(0.25)
    core.pending = [(0.75, b"y", "peer")]  # the deadline came earlier than the armed call
    pump.run_timer()
    assert core.timer_calls == [0.75] and written[-1] == (b"again y", "peer")
    assert clock.getDelayedCalls() == []


class VersionedCore(EchoCore):
    """An ``EchoCore`` with a ``timer_version`` (``VersionedTimer``) that counts its ``get_timer`` calls."""

    def __init__(self, delay: float = 1.0) -> None:
        super().__init__(delay)
        self.timer_version = 0
        self.asked = 0

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        before = self.get_timer()
        super().receive_datagram(data, addr, now)
        self.asked -= 1
        if before is None or now + self.delay < before:
            self.timer_version += 1  # the deadline came earlier

    def get_timer(self) -> float | None:
        self.asked += 1
        return super().get_timer()


def test_a_versioned_core_is_asked_for_its_timer_only_when_the_version_moved() -> None:
    clock, core = Clock(), VersionedCore()
    written: list[tuple[bytes, Any]] = []
    pump = CorePump(clock, core, lambda data, addr: written.append((data, addr)), lambda event: None)
    pump.receive(b"a", "peer")
    assert core.asked == 1 and [call.getTime() for call in clock.getDelayedCalls()] == [1.0]
    clock.advance(0.25)
    for _ in range(3):
        pump.receive(b"b", "peer")  # later deadlines, same version: the armed call stands, no asking
    assert core.asked == 1 and [call.getTime() for call in clock.getDelayedCalls()] == [1.0]
    core.delay = 0.25
    pump.receive(b"c", "peer")  # due at 0.5: the version moved, the call moves earlier
    assert core.asked == 2 and [call.getTime() for call in clock.getDelayedCalls()] == [0.5]
    clock.advance(0.25)  # fires: handle_timer runs, then the pump asks again (no call is armed)
    assert written[-1] == (b"again c", "peer") and [call.getTime() for call in clock.getDelayedCalls()] == [1.0]


def test_a_pump_from_inside_dispatch_folds_into_the_running_one() -> None:
    clock, core = Clock(), EchoCore()
    order: list[str] = []

    def dispatch(event: bytes) -> None:
        order.append(f"dispatch {event.decode()}")
        if event == b"first":
            core.outgoing.append((b"answer", "peer"))
            pump.pump()  # re-entrant: writes nothing yet, dispatches nothing out of order

    pump = CorePump(clock, core, lambda data, addr: order.append(f"write {data.decode()}"), dispatch)
    core.events.append(b"first")
    core.events.append(b"second")
    pump.pump()
    assert order == ["dispatch first", "dispatch second", "write answer"]
    assert core.next_event() is None and core.datagrams_to_send() == []


def test_events_first_acts_on_events_before_writing_and_after_timer_sees_every_firing() -> None:
    clock, core = Clock(), EchoCore(delay=1.0)
    order: list[str] = []
    ticks: list[float] = []
    pump = CorePump(clock, core, lambda data, addr: order.append(f"write {data.decode()}"),
                    lambda event: order.append(f"dispatch {event.decode()}"), events_first=True,
                    after_timer=ticks.append)
    pump.receive(b"open", "peer")  # the event (say, a socket opened) comes before its datagram
    assert order == ["dispatch open", "write open"]
    pump.run_timer()  # not due: handle_timer does not run, after_timer does
    assert core.timer_calls == [] and ticks == [0.0]
    clock.advance(1.0)
    assert core.timer_calls == [1.0] and ticks == [0.0, 1.0] and order[-1] == "write again open"
