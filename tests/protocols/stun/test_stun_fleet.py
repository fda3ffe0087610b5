"""The tester's sans-IO client fleet, its timer wheel and RTT histogram, driven by explicit times."""

from __future__ import annotations

import random
from typing import Any, NamedTuple

from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import FleetCounters
from nettester.protocols.stun.fleet import (
    ClientFleet,
    ConsecutiveFailures,
    ErrorResponse,
    FleetConfig,
    LossResolved,
    MappingChanged,
    OpenSocket,
    RequestUnanswered,
    UnexpectedResponse,
    binding_request,
)
from nettester.protocols.stun.message import (
    Address,
    AttributeType,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    decode,
    make_attribute,
)
from nettester.protocols.stun.timerwheel import TimerWheel

MAPPED = Address("198.51.100.7", 40001)


class Send(NamedTuple):
    """A datagram the fleet handed out, in the order of its events."""

    client: int
    data: bytes


class Harness:
    """A fleet plus a clock: advance time in small steps and collect its events and datagrams.

    The datagrams of each step follow its events, as the adapter sends them
    after carrying out the events (socket opens first).
    """

    def __init__(self, **config: Any) -> None:
        config.setdefault("clients", 1)
        config.setdefault("start_delay", (0.0, 0.0))
        config.setdefault("interval", 10.0)
        self.now = 1000.0
        self.counters = FleetCounters(MetricSet("stun_client_test"))
        self.fleet = ClientFleet(FleetConfig(**config), self.counters, self.now, random.Random(7))
        self.events: list[Any] = []

    def run_until(self, until: float, step: float = 0.005) -> list[Any]:
        """Tick every ``step`` up to ``until``; return the events produced meanwhile (with their times)."""
        produced = []
        while self.now < until - 1e-9:
            self.now = min(self.now + step, until)
            self.fleet.handle_timer(self.now)
            produced += self.drain()
        self.events += produced
        return produced

    def drain(self) -> list[tuple[float, Any]]:
        produced: list[tuple[float, Any]] = []
        while (event := self.fleet.next_event()) is not None:
            produced.append((self.now, event))
        produced += [(self.now, Send(client, data)) for data, client in self.fleet.datagrams_to_send()]
        return produced

    def sends(self, produced: list[Any]) -> list[tuple[float, Send]]:
        return [(when, event) for when, event in produced if isinstance(event, Send)]

    def answer(
        self, client: int, send: Send, mapped: Address = MAPPED, error: bool = False, at: float | None = None
    ) -> list[Any]:
        request = decode(send.data)
        if error:
            attribute = make_attribute(AttributeType.ERROR_CODE, ErrorCode(500, "Server Error"))
            response = Message(Method.BINDING, MessageClass.ERROR, request.transaction_id, (attribute,))
        else:
            attribute = make_attribute(AttributeType.XOR_MAPPED_ADDRESS, mapped, request.transaction_id)
            response = Message(Method.BINDING, MessageClass.SUCCESS, request.transaction_id, (attribute,))
        self.fleet.receive_datagram(response.encode(), client, self.now if at is None else at)
        # Loss attribution has its own tests (test_stun_attribution.py): its events are left out here.
        return [event for _, event in self.drain() if not isinstance(event, LossResolved)]


def transaction_id(send: Send) -> bytes:
    return decode(send.data).transaction_id


def test_a_client_opens_its_socket_then_sends_a_bare_binding_request() -> None:
    harness = Harness(attribution=False)
    produced = [event for _, event in harness.run_until(1000.02)]
    assert produced[0] == OpenSocket(0, "start")
    assert isinstance(produced[1], Send)
    request = decode(produced[1].data)
    assert (request.method, request.message_class, request.attributes) == (Method.BINDING, MessageClass.REQUEST, ())
    assert len(produced[1].data) == 20


def test_start_delays_are_spread_within_the_range() -> None:
    harness = Harness(clients=200, start_delay=(1.0, 3.0))
    opened = [(when, event) for when, event in harness.run_until(1004.0, step=0.01) if isinstance(event, OpenSocket)]
    assert len(opened) == 200
    times = [when - 1000.0 for when, _ in opened]
    assert 1.0 <= min(times) < 1.2 and 2.8 < max(times) <= 3.03
    assert harness.fleet.started == 200


def test_answered_client_sends_once_per_interval_with_fresh_transaction_ids() -> None:
    harness = Harness(interval=2.0)
    ids = []
    for period in range(4):
        sends = harness.sends(harness.run_until(1000.0 + 2.0 * period + 0.05))
        assert len(sends) == 1
        when, send = sends[0]
        assert 1000.0 + 2.0 * period <= when <= 1000.0 + 2.0 * period + 0.02  # no drift
        ids.append(transaction_id(send))
        assert harness.answer(0, send, at=when + 0.002) == []
    assert len(set(ids)) == 4
    assert harness.counters.responses.value == 4
    assert harness.counters.timeouts.value == 0
    assert 0.001 < (harness.fleet.rtt.percentile(50) or 0) < 0.003
    # A deadline fires once its whole 10 ms tick has passed, seen by a tick every 5 ms here.
    assert 0.0 < (harness.fleet.timer_lag.percentile(99) or 0.0) <= 0.015


def test_missing_answers_resend_the_same_id_then_reopen_after_five() -> None:
    harness = Harness(interval=1.0)
    first_send = harness.sends(harness.run_until(1000.02))[0][1]
    harness.answer(0, first_send)  # a mapping is known before the losses begin
    produced = [event for _, event in harness.run_until(1006.02)]
    sends = [event for event in produced if isinstance(event, Send)]
    lost_id = transaction_id(sends[0])
    misses = [event for event in produced if isinstance(event, RequestUnanswered)]
    assert [miss.consecutive for miss in misses] == [1, 2, 3, 4, 5]
    assert {miss.transaction_id for miss in misses} == {lost_id}
    assert [transaction_id(send) for send in sends[:5]] == [lost_id] * 5  # the first send and 4 re-sends
    assert misses[0].mapped == MAPPED
    failure_index = next(i for i, event in enumerate(produced) if isinstance(event, ConsecutiveFailures))
    assert produced[failure_index] == ConsecutiveFailures(0, lost_id, MAPPED, 5)
    assert produced[failure_index + 1] == OpenSocket(0, "failures")
    after = produced[failure_index + 2]
    assert isinstance(after, Send) and transaction_id(after) != lost_id
    assert harness.counters.failures.value == 1
    # Like the original, a miss on the new socket still names the last mapping seen.
    harness.run_until(1007.02)
    later_miss = [event for _, event in harness.events if isinstance(event, RequestUnanswered)][-1]
    assert later_miss.mapped == MAPPED and later_miss.consecutive == 1


def test_a_new_socket_with_a_new_mapping_is_not_a_rebinding() -> None:
    harness = Harness(interval=1.0, max_failures=1)
    harness.answer(0, harness.sends(harness.run_until(1000.02))[0][1])
    produced = [event for _, event in harness.run_until(1002.02)]  # a miss: new socket, new request
    assert OpenSocket(0, "failures") in produced
    resend = [event for event in produced if isinstance(event, Send)][-1]
    assert harness.answer(0, resend, mapped=Address("198.51.100.7", 50001)) == []
    assert harness.counters.mapping_changes.value == 0


def test_an_answer_resets_the_consecutive_count() -> None:
    harness = Harness(interval=1.0)
    harness.run_until(1003.02)  # three misses
    resend = harness.sends(harness.events)[-1][1]
    harness.answer(0, resend)
    produced = [event for _, event in harness.run_until(1009.02)]
    misses = [event.consecutive for event in produced if isinstance(event, RequestUnanswered)]
    assert misses == [1, 2, 3, 4, 5]  # counted afresh from the answer on


def test_unexpected_transaction_id_is_reported() -> None:
    harness = Harness()
    send = harness.sends(harness.run_until(1000.02))[0][1]
    stray = Send(0, binding_request(bytes(12)))
    assert harness.answer(0, stray) == [UnexpectedResponse(0, bytes(12))]
    harness.answer(0, send)
    assert harness.answer(0, send) == [UnexpectedResponse(0, transaction_id(send))]  # a duplicate
    assert harness.counters.unexpected.value == 2


def test_mapping_change_on_the_same_socket_is_reported() -> None:
    harness = Harness(interval=1.0)
    harness.answer(0, harness.sends(harness.run_until(1000.02))[0][1])
    moved = Address("198.51.100.7", 50000)
    produced = harness.answer(0, harness.sends(harness.run_until(1001.02))[0][1], mapped=moved)
    assert produced == [MappingChanged(0, MAPPED, moved)]
    assert harness.counters.mapping_changes.value == 1


def test_healthy_client_reopens_its_socket_after_120_s_plus_jitter() -> None:
    harness = Harness(interval=10.0, reopen_after=120.0, reopen_jitter=(1.0, 60.0))
    reopened_at = None
    while reopened_at is None and harness.now < 1200.0:
        for when, event in harness.run_until(harness.now + 10.0, step=0.05):
            if isinstance(event, Send):
                harness.answer(0, event)
            if event == OpenSocket(0, "periodic"):
                reopened_at = when
    assert reopened_at is not None and 1000.0 + 121.0 <= reopened_at <= 1000.0 + 190.0
    assert harness.counters.reopens.value == 1


def test_error_response_counts_as_answered() -> None:
    harness = Harness()
    send = harness.sends(harness.run_until(1000.02))[0][1]
    assert harness.answer(0, send, error=True) == [ErrorResponse(0, transaction_id(send), 500, "Server Error")]
    assert harness.counters.error_responses.value == 1
    assert not [e for _, e in harness.run_until(1010.05) if isinstance(e, RequestUnanswered)]


def test_garbage_is_counted_not_raised() -> None:
    harness = Harness()
    harness.run_until(1000.02)
    harness.fleet.receive_datagram(b"not stun at all, not at all", 0, harness.now)
    harness.fleet.receive_datagram(Message(Method.BINDING, MessageClass.REQUEST, bytes(12)).encode(), 0, harness.now)
    assert harness.counters.malformed.value == 2


def test_rfc_retransmissions_follow_rfc8489_timing() -> None:
    harness = Harness(interval=60.0, rfc_retransmit=True)
    produced = harness.run_until(1041.0, step=0.01)
    send_times = [round(when - 1000.0, 1) for when, event in produced if isinstance(event, Send)]
    assert send_times == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # RFC 8489 section 6.2.1
    assert len({transaction_id(e) for _, e in produced if isinstance(e, Send)}) == 1
    misses = [(round(when - 1000.0, 1), event) for when, event in produced if isinstance(event, RequestUnanswered)]
    assert [when for when, _ in misses] == [39.5]  # Rm x RTO = 8 s after the last send
    # The next transaction starts at the next interval, with a new id.
    next_sends = harness.sends(harness.run_until(1060.05))
    assert len(next_sends) == 1 and transaction_id(next_sends[0][1]) != transaction_id(produced[1][1])


def test_rfc_mode_answer_stops_retransmissions() -> None:
    harness = Harness(interval=5.0, rfc_retransmit=True)
    produced = harness.run_until(1000.6)
    harness.answer(0, harness.sends(produced)[-1][1])
    later = harness.sends(harness.run_until(1004.9))
    assert later == []
    assert len(harness.sends(harness.run_until(1005.05))) == 1


# --- timer wheel -------------------------------------------------------------------


def test_wheel_fires_never_early_and_at_most_one_tick_late() -> None:
    wheel = TimerWheel(3, now=0.0, resolution=0.01, slots=8)
    wheel.schedule(0, 0.034)
    wheel.schedule(1, 0.5)  # several laps of an 8-slot wheel away
    fired: list[tuple[float, int]] = []
    now = 0.0
    while now < 0.6:
        now = round(now + 0.001, 3)
        fired += [(now, key) for key, _ in wheel.expire(now)]
    assert [key for _, key in fired] == [0, 1]
    assert 0.04 <= fired[0][0] <= 0.05
    assert 0.51 <= fired[1][0] <= 0.52


def test_wheel_reschedule_and_cancel_leave_no_ghost_timers() -> None:
    wheel = TimerWheel(2, now=0.0, resolution=0.01, slots=16)
    wheel.schedule(0, 0.05)
    wheel.schedule(0, 0.20)  # moved later
    wheel.schedule(1, 0.10)
    wheel.cancel(1)
    assert wheel.expire(0.15) == []
    assert wheel.expire(0.25) == [(0, 0.20)]
    assert wheel.expire(5.0) == []


def test_wheel_past_deadline_fires_on_the_next_tick() -> None:
    wheel = TimerWheel(1, now=10.0, resolution=0.01)
    wheel.expire(10.5)
    wheel.schedule(0, 3.0)
    assert wheel.expire(10.52) == [(0, 3.0)]


@given(st.lists(st.tuples(st.integers(0, 9), st.floats(0.0, 30.0)), min_size=1, max_size=40))
@settings(max_examples=150, deadline=None)
def test_wheel_fires_exactly_the_last_schedule_of_each_key(schedules: list[tuple[int, float]]) -> None:
    wheel = TimerWheel(10, now=0.0, resolution=0.05, slots=32)
    for key, deadline in schedules:
        wheel.schedule(key, deadline)
    expected = dict(schedules)
    fired: dict[int, tuple[float, float]] = {}
    now = 0.0
    while now < 31.0:
        now += 0.05
        for key, deadline in wheel.expire(now):
            assert key not in fired
            fired[key] = (deadline, now)
    assert {key: deadline for key, (deadline, _) in fired.items()} == expected
    for deadline, when in fired.values():
        assert deadline <= when <= deadline + 0.1 + 1e-9


def test_fleet_memory_is_small_per_client() -> None:
    """The sans-IO state of a started client (its socket aside) stays far below the 3 KiB budget."""
    import tracemalloc

    clients = 2000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    harness = Harness(clients=clients, interval=10.0, start_delay=(0.0, 1.0))
    harness.run_until(1001.1, step=0.01)
    harness.events.clear()  # the test's own record of events is not the fleet's memory
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert harness.fleet.started == clients
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert grown / clients < 512


@given(st.binary(max_size=80))
@settings(max_examples=300, deadline=None)
def test_fuzz_any_datagram_on_a_client_socket_is_counted_never_raised(data: bytes) -> None:
    harness = Harness()
    harness.run_until(1000.02)
    before = harness.counters.malformed.value + harness.counters.unexpected.value
    harness.fleet.receive_datagram(data, 0, harness.now)
    counted = harness.counters.malformed.value + harness.counters.unexpected.value - before
    answered = harness.counters.responses.value + harness.counters.error_responses.value
    assert counted + answered == 1


def test_sans_io_cores_do_not_import_twisted_internet() -> None:
    import subprocess
    import sys

    cores = ["message", "responder", "fleet", "timerwheel", "counters", "attribution", "report"]
    code = (
        "import sys\n"
        + "".join(f"import nettester.protocols.stun.{core}\n" for core in cores)
        + "print(sorted(name for name in sys.modules if name.startswith('twisted.internet')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
