"""Loss attribution: the NETTESTER attribute codecs, the server's session table, and the fleet
against a sans-IO responder over a scripted lossy path (the path's own record is the truth)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.metrics import MetricSet
from nettester.protocols.stun.attribution import (
    NETTESTER_RECEIVED,
    NETTESTER_SEQUENCE,
    RECEIVED_LENGTH,
    WINDOW,
    AttributionError,
    Receipt,
    SequenceTag,
    SessionTable,
    received_attribute,
    sequence_attribute,
)
from nettester.protocols.stun.counters import FleetCounters, ServerCounters
from nettester.protocols.stun.fleet import (
    AT_STOP,
    FORWARD,
    NOT_COVERED,
    NOT_NETTESTER,
    RETURN,
    UNATTRIBUTED,
    AttributionInvalid,
    ClientFleet,
    FleetConfig,
    LossResolved,
    OpenSocket,
    binding_request,
    tagged_binding_request,
)
from nettester.protocols.stun.message import (
    Address,
    Attribute,
    AttributeType,
    Message,
    MessageClass,
    Method,
    decode,
    make_attribute,
)
from nettester.protocols.stun.responder import BindingResponder

SESSION = b"\x01\x02\x03\x04\x00\x00\x00\x07"
PEER = ("198.51.100.7", 40001)

# --- codecs -----------------------------------------------------------------------


def test_code_points_are_comprehension_optional_and_outside_the_iana_ranges_in_use() -> None:
    for code in (NETTESTER_SEQUENCE, NETTESTER_RECEIVED):
        assert 0x8000 <= code <= 0xFFFF  # RFC 8489 section 14: may be ignored by any peer
        assert code >= 0xC100  # the IANA registry's optional code points end at 0xC0xx


def test_sequence_attribute_layout() -> None:
    attribute = sequence_attribute(SESSION, 0x01020304)
    assert attribute == bytes.fromhex("fe54000c") + SESSION + bytes.fromhex("01020304")
    assert SequenceTag.decode(attribute[4:]) == SequenceTag(SESSION, 0x01020304)


def test_received_attribute_layout() -> None:
    receipt = Receipt(received=6, first=3, highest=9, window=0b11011, time_us=1_733_220_000_123_456)
    attribute = received_attribute(receipt)
    assert attribute[:4] == bytes.fromhex("fe55001c") and len(attribute) == 4 + RECEIVED_LENGTH
    assert attribute[4:16] == bytes.fromhex("00000006 00000003 00000009")
    assert attribute[16:24] == (0b11011).to_bytes(8, "big")
    assert Receipt.decode(attribute[4:]) == receipt
    assert [receipt.reached(s) for s in range(2, 11)] == [None, False, True, True, False, True, True, True, None]
    assert receipt.time == pytest.approx(1_733_220_000.123456)


@given(st.binary(min_size=8, max_size=8), st.integers(0, 2**32 - 1))
def test_sequence_round_trip(session: bytes, sequence: int) -> None:
    assert SequenceTag.decode(SequenceTag(session, sequence).encode()) == SequenceTag(session, sequence)


@given(st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 200), st.integers(0, 2**64 - 1))
def test_receipt_round_trip_or_a_named_error(received: int, first: int, span: int, window: int) -> None:
    value = Receipt(received, first, min(first + span, 2**32 - 1), window, 5).encode()
    try:
        receipt = Receipt.decode(value)
    except AttributionError as error:
        assert str(error)
    else:
        assert receipt.encode() == value
        assert receipt.received >= 1 + receipt.window.bit_count()


@given(st.binary(max_size=40))
@settings(max_examples=400)
def test_fuzz_attribute_decoders_raise_only_attribution_error(value: bytes) -> None:
    for decoder in (SequenceTag.decode, Receipt.decode):
        try:
            decoder(value)
        except AttributionError:
            pass


@pytest.mark.parametrize(
    ("receipt", "message"),
    [
        (Receipt(5, 9, 8, 0, 0), "above the highest"),
        (Receipt(5, 8, 9, 0b10, 0), "before the session's state began"),
        (Receipt(1, 1, 9, 0b1, 0), "cannot cover"),
    ],
)
def test_impossible_receipts_are_refused(receipt: Receipt, message: str) -> None:
    with pytest.raises(AttributionError, match=message):
        Receipt.decode(receipt.encode())


# --- the server's session table ---------------------------------------------------


def test_session_table_windows_and_counts() -> None:
    table = SessionTable()
    tag = lambda sequence: SequenceTag(SESSION, sequence)  # noqa: E731
    assert table.record(tag(10), 1.0) == Receipt(1, 10, 10, 0, 1_000_000)
    table.record(tag(12), 2.0)
    receipt = table.record(tag(11), 3.0)  # late, below the highest
    assert (receipt.received, receipt.first, receipt.highest) == (3, 10, 12)
    assert [receipt.reached(s) for s in (10, 11, 12)] == [True, True, True]
    receipt = table.record(tag(12 + WINDOW + 5), 4.0)  # a long gap empties the window
    assert receipt.window == 0 and receipt.reached(12) is None and receipt.received == 4


def test_session_table_is_a_bounded_lru() -> None:
    table = SessionTable(max_sessions=3)
    sessions = [bytes([n]) * 8 for n in range(4)]
    for session in sessions[:3]:
        table.record(SequenceTag(session, 1), 0.0)
    table.record(SequenceTag(sessions[0], 2), 0.0)  # 0 is now the most recently used
    table.record(SequenceTag(sessions[3], 1), 0.0)  # evicts 1, the least recently used
    assert len(table) == 3 and table.evicted == 1
    assert table.record(SequenceTag(sessions[0], 3), 0.0).received == 3
    assert table.record(SequenceTag(sessions[1], 2), 0.0) == Receipt(1, 2, 2, 0, 0)  # forgotten: starts afresh


def test_session_state_memory_per_session() -> None:
    """What the README states: the table's bytes per session (key, packed state, dict slot)."""
    import tracemalloc

    count = 20_000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    table = SessionTable(max_sessions=count)
    for n in range(count):
        table.record(SequenceTag(n.to_bytes(8, "big"), 1000 + n), 1.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    per_session = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / count
    assert per_session < 200


# --- the responder --------------------------------------------------------------------


def responder(sessions: bool = True) -> tuple[BindingResponder, ServerCounters]:
    counters = ServerCounters(MetricSet("stun_attr_test"))
    return BindingResponder(counters, "nettester", sessions=SessionTable() if sessions else None), counters


@pytest.mark.parametrize(
    "request_bytes",
    [
        binding_request(b"A" * 12),
        Message(Method.BINDING, MessageClass.REQUEST, b"B" * 12).encode(fingerprint=True),
        Message(
            Method.BINDING, MessageClass.REQUEST, b"C" * 12, (make_attribute(AttributeType.SOFTWARE, "x"),)
        ).encode(),
        Message(Method.BINDING, MessageClass.REQUEST, b"D" * 12, (Attribute(0x0777, b"????"),)).encode(),
    ],
)
def test_a_request_without_the_attribute_gets_exactly_todays_response(request_bytes: bytes) -> None:
    with_sessions, _ = responder(True)
    without, _ = responder(False)
    assert with_sessions.respond(request_bytes, PEER, now=5.0) == without.respond(request_bytes, PEER, now=5.0)


def test_tagged_requests_are_answered_with_what_was_received() -> None:
    server, counters = responder()
    fast = server.respond(tagged_binding_request(b"E" * 12, SESSION, 41), PEER, now=100.0)
    assert fast is not None
    message = decode(fast[0])
    assert message.get(AttributeType.XOR_MAPPED_ADDRESS) == Address(*PEER)
    assert message.get(AttributeType.SOFTWARE) == "nettester"
    assert Receipt.decode(message.find(NETTESTER_RECEIVED).value) == Receipt(1, 41, 41, 0, 100_000_000)  # type: ignore[union-attr]
    # The general path (here: with a FINGERPRINT) records into the same session.
    tag = Attribute(NETTESTER_SEQUENCE, SequenceTag(SESSION, 43).encode())
    request = Message(Method.BINDING, MessageClass.REQUEST, b"F" * 12, (tag,)).encode(fingerprint=True)
    slow = server.respond(request, PEER, now=101.0)
    assert slow is not None
    message = decode(slow[0])
    assert message.attributes[-1].type == AttributeType.FINGERPRINT
    receipt = Receipt.decode(message.find(NETTESTER_RECEIVED).value)  # type: ignore[union-attr]
    assert (receipt.received, receipt.highest, receipt.reached(42), receipt.reached(41)) == (2, 43, False, True)
    assert counters.attributed.value == 2


def test_a_malformed_request_attribute_is_counted_and_answered_as_if_absent() -> None:
    server, counters = responder()
    plain, _ = responder(False)
    request = Message(
        Method.BINDING, MessageClass.REQUEST, b"G" * 12, (Attribute(NETTESTER_SEQUENCE, b"short"),)
    ).encode()
    assert server.respond(request, PEER) == plain.respond(request, PEER)
    assert counters.attribution_invalid.value == 1 and len(server.sessions or ()) == 0


# --- the fleet over a scripted lossy path -----------------------------------------------------


class LossyPath:
    """Fleet, path and responder in one loop; the path records every transmission's fate by TrID."""

    def __init__(
        self,
        drop_request: Callable[[int, bytes], bool],
        drop_response: Callable[[int, bytes], bool],
        clients: int = 1,
        nettester_server: bool = True,
        **config: Any,
    ) -> None:
        config.setdefault("interval", 1.0)
        config.setdefault("start_delay", (0.0, 0.0))
        self.now = 1000.0
        self.counters = FleetCounters(MetricSet("stun_attr_fleet"))
        self.fleet = ClientFleet(FleetConfig(clients=clients, **config), self.counters, self.now, random.Random(11))
        self.responder, self.server_counters = responder(nettester_server)
        self.drop_request, self.drop_response = drop_request, drop_response
        self.ports = [0] * clients
        self.truth: dict[bytes, list[str]] = {}  # TrID -> "forward" / "return" / "ok" per transmission
        self.events: list[Any] = []
        self.tamper: Callable[[bytes], bytes] = lambda response: response

    def run_until(self, until: float, step: float = 0.01) -> None:
        while self.now < until - 1e-9:
            self.now = min(self.now + step, until)
            self.fleet.handle_timer(self.now)
            self.pump()

    def pump(self) -> None:
        fleet = self.fleet
        while (event := fleet.next_event()) is not None:
            if isinstance(event, OpenSocket):
                self.ports[event.client] += 1
            self.events.append(event)
        for data, client in fleet.datagrams_to_send():
            trid = data[8:20]
            fates = self.truth.setdefault(trid, [])
            if self.drop_request(client, trid):
                fates.append(FORWARD)
                continue
            reply = self.responder.respond(data, ("198.51.100.7", 40000 + self.ports[client]), now=self.now)
            assert reply is not None
            if self.drop_response(client, trid):
                fates.append(RETURN)
                continue
            fates.append("ok")
            fleet.receive_datagram(self.tamper(reply[0]), client, self.now)
        while (event := fleet.next_event()) is not None:
            self.events.append(event)

    def resolved(self) -> list[LossResolved]:
        return [event for event in self.events if isinstance(event, LossResolved)]

    def stop(self) -> None:
        self.fleet.close(self.now)
        self.pump()


def scripted(drops: dict[bytes | int, int]) -> Callable[[int, bytes], bool]:
    """Drop the first ``n`` transmissions of the n-th transaction (counted per client from 0)."""
    seen: dict[bytes, int] = {}
    order: list[bytes] = []

    def drop(client: int, trid: bytes) -> bool:
        if trid not in seen:
            order.append(trid)
            seen[trid] = 0
        seen[trid] += 1
        return seen[trid] <= drops.get(order.index(trid), 0)

    return drop


def never(client: int, trid: bytes) -> bool:
    return False


def test_lost_responses_are_attributed_to_the_way_back() -> None:
    path = LossyPath(never, scripted({1: 2}))  # the second transaction's first two responses die
    path.run_until(1006.0)
    (event,) = path.resolved()
    assert (event.sent, event.reached, event.answered, event.lost_return, event.lost_forward) == (3, 3, 1, 2, 0)
    assert event.directions == (RETURN,) and event.mapped == Address("198.51.100.7", 40001)
    assert path.counters.lost.get(RETURN) == 1 and path.counters.lost.get(FORWARD) == 0


def test_lost_requests_are_attributed_to_the_way_out() -> None:
    path = LossyPath(scripted({2: 1}), never)
    path.run_until(1006.0)
    (event,) = path.resolved()
    assert (event.sent, event.lost_forward, event.lost_return, event.directions) == (2, 1, 0, (FORWARD,))


def test_the_very_first_request_lost_on_the_way_out_is_attributed() -> None:
    """The server's state then begins with the re-send: nothing before it arrived."""
    path = LossyPath(scripted({0: 1}), never)
    path.run_until(1003.0)
    (event,) = path.resolved()
    assert (event.sent, event.lost_forward, event.directions) == (2, 1, (FORWARD,))


def test_a_server_that_lost_the_sessions_state_leaves_older_losses_unattributed() -> None:
    path = LossyPath(never, scripted({1: 1}))
    path.run_until(1001.5)  # the 1st transaction answered (the state's origin is known), the 2nd's answer lost
    path.responder.sessions = SessionTable()  # the server restarts before the re-send
    path.run_until(1003.0)
    (event,) = path.resolved()
    assert event.directions == (UNATTRIBUTED,) and event.reason == NOT_COVERED


def test_a_mixed_episode_counts_once_in_each_direction() -> None:
    # Transaction 1: the 1st request dies; the 2nd reaches the server, its response dies; the 3rd is answered.
    path = LossyPath(scripted({1: 1}), scripted({1: 1}))
    path.run_until(1006.0)
    (event,) = path.resolved()
    assert (event.lost_forward, event.lost_return, event.directions) == (1, 1, (FORWARD, RETURN))
    assert (path.counters.lost.get(FORWARD), path.counters.lost.get(RETURN)) == (1, 1)


def test_five_of_five_reached_the_server_resolved_on_the_next_socket() -> None:
    path = LossyPath(never, scripted({1: 5}))
    path.run_until(1008.0)
    (event,) = path.resolved()
    assert (event.sent, event.reached, event.answered, event.lost_return) == (5, 5, 0, 5)
    assert path.ports == [2]  # resolved by the answer on the new socket: the session id outlives the socket


def test_a_third_party_server_leaves_losses_unattributed() -> None:
    path = LossyPath(never, scripted({1: 1}), nettester_server=False)
    path.run_until(1006.0)
    (event,) = path.resolved()
    assert event.reached is None and event.reason == NOT_NETTESTER and event.directions == (UNATTRIBUTED,)
    assert path.counters.lost.get(UNATTRIBUTED) == 1


def test_an_episode_open_at_stop_is_unattributed() -> None:
    path = LossyPath(never, lambda client, trid: True)
    path.run_until(1002.5)
    path.stop()
    (event,) = path.resolved()
    assert event.reason == AT_STOP and event.directions == (UNATTRIBUTED,)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: Receipt(r.received, r.first, r.highest + 50, 0, 0),  # claims what was never sent
        lambda r: Receipt(r.received + 1, r.first, r.highest, r.window | (1 << 40), 0),  # before the state began
        lambda r: Receipt(0, r.first, r.highest, r.window, 0),  # fewer receptions than listed
        None,  # a malformed (short) value
    ],
)
def test_hostile_receipts_are_counted_never_trusted(tamper: Callable[[Receipt], Receipt] | None) -> None:
    path = LossyPath(never, scripted({1: 2}))

    def rewrite(response: bytes) -> bytes:
        message = decode(response)
        attributes = []
        for attribute in message.attributes:
            if attribute.type == NETTESTER_RECEIVED:
                value = tamper(Receipt.decode(attribute.value)).encode() if tamper else attribute.value[:10]
                attribute = Attribute(NETTESTER_RECEIVED, value)
            attributes.append(attribute)
        return Message(message.method, message.message_class, message.transaction_id, tuple(attributes)).encode()

    path.tamper = rewrite
    path.run_until(1006.0)
    path.stop()
    assert path.counters.attribution_invalid.value >= 1
    assert any(isinstance(event, AttributionInvalid) for event in path.events)
    assert [event.directions for event in path.resolved()] == [(UNATTRIBUTED,)]
    assert path.counters.responses.value >= 4  # the responses themselves still count


@given(
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 0.4),
    st.floats(0.0, 0.4),
    st.booleans(),
)
@settings(max_examples=25, deadline=None)
def test_every_resolved_episode_matches_the_paths_record(
    seed: int, request_loss: float, response_loss: float, rfc: bool
) -> None:
    rng = random.Random(seed)
    path = LossyPath(
        lambda client, trid: rng.random() < request_loss,
        lambda client, trid: rng.random() < response_loss,
        clients=3,
        rfc_retransmit=rfc,
        interval=1.0 if not rfc else 60.0,
        max_failures=3,
    )
    path.run_until(1000.0 + (40.0 if not rfc else 400.0), step=0.05 if not rfc else 0.25)
    path.stop()
    for event in path.resolved():
        if event.reached is None:
            continue
        fates = path.truth[event.transaction_id][: event.sent]
        assert event.lost_forward == fates.count(FORWARD), (event, fates)
        assert event.lost_return == fates.count(RETURN), (event, fates)
        assert event.answered == fates.count("ok")


@given(st.binary(max_size=40), st.integers(0, 2**32 - 1))
@settings(max_examples=300)
def test_fuzz_any_nettester_sequence_value_is_answered_never_raised(value: bytes, sequence: int) -> None:
    server, counters = responder()
    request = Message(Method.BINDING, MessageClass.REQUEST, b"H" * 12, (Attribute(NETTESTER_SEQUENCE, value),))
    reply = server.respond(request.encode(), PEER, now=1.0)
    assert reply is not None and decode(reply[0]).message_class == MessageClass.SUCCESS
    assert counters.attribution_invalid.value == (0 if len(value) == 12 else 1)


@given(st.binary(max_size=40))
@settings(max_examples=300, deadline=None)
def test_fuzz_any_nettester_received_value_is_counted_never_raised(value: bytes) -> None:
    path = LossyPath(never, scripted({1: 1}))

    def rewrite(response: bytes) -> bytes:
        message = decode(response)
        attributes = tuple(
            Attribute(NETTESTER_RECEIVED, value) if attribute.type == NETTESTER_RECEIVED else attribute
            for attribute in message.attributes
        )
        return Message(message.method, message.message_class, message.transaction_id, attributes).encode()

    path.tamper = rewrite
    path.run_until(1003.0, step=0.05)
    path.stop()
    assert path.counters.responses.value == 2  # the first transaction and the re-send of the second
    assert len(path.resolved()) == 1  # the one episode ends exactly once, attributed or not
