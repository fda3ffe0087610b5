"""The sans-IO keep-alive core: framing, parser, server and client state machines."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.interfaces import StreamCore
from nettester.protocols.keepalive.wire import (
    MAX_LINE_LENGTH,
    ClientConnection,
    ClientPlan,
    ClientTiming,
    Dummy,
    DummyReceived,
    EstablishSession,
    Event,
    KeepAlive,
    KeepAliveAnswered,
    KeepAliveMissing,
    KeepAliveReceived,
    KeepAliveResponse,
    LineFramer,
    ProtocolError,
    ResponseMissing,
    ServerConnection,
    SessionEstablished,
    WireError,
    parse_line,
)

TIMING = ClientTiming(keepalive_interval=5.0, response_timeout=10.0, dummy_interval=11.0,
                      short_payload=bytes(range(32)), long_payload=bytes(range(128)))


def _events(core: StreamCore) -> list[Event]:
    """Every event the core has not handed out yet."""
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)
    return events


def feed(core: StreamCore, data: bytes, now: float) -> list[Event]:
    """``receive_data``, then the events it produced."""
    core.receive_data(data, now)
    return _events(core)


def tick(core: StreamCore, now: float) -> list[Event]:
    """``handle_timer``, then the events it produced."""
    core.handle_timer(now)
    return _events(core)


def test_both_ends_are_stream_cores() -> None:
    """``interfaces.StreamCore``, the stream twin of the datagram contract: mypy checks the structural match."""
    cores: list[StreamCore] = [ServerConnection(20.0, 0.0), ClientConnection(ClientPlan(TIMING), "1", "c", 0.0)]
    for core in cores:
        assert core.next_event() is None and core.get_timer() is not None


@pytest.mark.parametrize(
    "message, line",
    [
        (EstablishSession("7", "ab12-7-1"), b"Establish Session 7 ab12-7-1\n"),
        (KeepAlive(3), b"Keep Alive 3\n"),
        (KeepAliveResponse(3), b"Keep Alive Response 3\n"),
        (Dummy("short", b"\x01\xff"), b"Short message 01ff\n"),
        (Dummy("short", b"\x01\xff", reply=True), b"Short message reply 01ff\n"),
        (Dummy("long", b"\xab"), b"Long message ab\n"),
        (Dummy("long", b"\xab", reply=True), b"Long message reply ab\n"),
    ],
)
def test_messages_encode_to_the_original_lines_and_parse_back(message: object, line: bytes) -> None:
    assert message.encode() == line  # type: ignore[attr-defined]
    assert parse_line(line[:-1]) == message
    assert parse_line(line[:-1] + b"\r") == message


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"Keep Alive",
        b"Keep Alive x",
        b"Keep Alive -1",
        b"Keep Alive 1 2",
        b"Keep Alive " + b"9" * 21,
        b"Keep alive 1",
        b"Short message 0",
        b"Short message zz",
        b"Long message " + b"00" * 129,
        b"Establish Session onlyone",
        b"Establish Session a b c",
        b"Establish Session a b\xff",
        b"Establish Session " + b"a" * 65 + b" b",
        b"\x00\x01",
    ],
)
def test_bad_lines_raise_wire_error(line: bytes) -> None:
    with pytest.raises(WireError):
        parse_line(line)


def test_framer_survives_any_split_and_coalescing() -> None:
    stream = b"Keep Alive 1\nKeep Alive 2\nShort message 00\n"
    for cut in range(len(stream) + 1):
        framer = LineFramer()
        assert framer.feed(stream[:cut]) + framer.feed(stream[cut:]) == [
            b"Keep Alive 1", b"Keep Alive 2", b"Short message 00"]


def test_framer_refuses_oversized_lines_complete_or_not() -> None:
    with pytest.raises(WireError):
        LineFramer().feed(b"x" * (MAX_LINE_LENGTH + 1))
    with pytest.raises(WireError):
        LineFramer().feed(b"x" * (MAX_LINE_LENGTH + 1) + b"\nKeep Alive 1\n")
    assert LineFramer().feed(b"x" * MAX_LINE_LENGTH + b"\n") == [b"x" * MAX_LINE_LENGTH]


# ------------------------------------------------------------------ server


def test_server_answers_and_moves_the_deadline() -> None:
    server = ServerConnection(keepalive_timeout=20.0, now=100.0)
    assert server.get_timer() == 120.0
    assert feed(server, b"Establish Session 4 c-4-1\nKeep Al", 101.0) == [SessionEstablished("4", "c-4-1")]
    assert (server.client_id, server.conn_id) == ("4", "c-4-1")
    assert server.get_timer() == 121.0
    assert feed(server, b"ive 1\nShort message 0a0b\n", 105.0) == [KeepAliveReceived(1), DummyReceived("short")]
    assert server.data_to_send() == b"Keep Alive Response 1\nShort message reply 0a0b\n"
    assert server.data_to_send() == b""
    assert server.get_timer() == 125.0
    # Dummies do not count as keep-alives.
    feed(server, b"Long message 00\n", 110.0)
    assert server.get_timer() == 125.0


def test_server_reports_a_client_that_stops_sending_keepalives() -> None:
    server = ServerConnection(keepalive_timeout=20.0, now=0.0)
    feed(server, b"Establish Session 1 c1\nKeep Alive 1\n", 5.0)
    assert tick(server, 24.9) == []
    assert tick(server, 25.0) == [KeepAliveMissing(20.0)]
    assert server.finished and server.get_timer() is None
    assert feed(server, b"Keep Alive 2\n", 26.0) == []
    assert server.data_to_send() == b"Keep Alive Response 1\n"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"Keep Alive 1\n", "Keep Alive before Establish Session"),
        (b"Establish Session 1 a\nEstablish Session 1 b\n", "second Establish Session on one connection"),
        (b"Establish Session 1 a\nKeep Alive Response 1\n", "a client never sends responses"),
        (b"Establish Session 1 a\nHELLO\nKeep Alive 1\n", "unknown message"),
        (b"x" * 400, f"line longer than {MAX_LINE_LENGTH} bytes"),
    ],
)
def test_server_stops_at_the_first_protocol_error(data: bytes, reason: str) -> None:
    server = ServerConnection(keepalive_timeout=20.0, now=0.0)
    events = feed(server, data, 1.0)
    assert isinstance(events[-1], ProtocolError) and events[-1].reason == reason
    assert server.finished and server.get_timer() is None and server.data_to_send() == b""


# ------------------------------------------------------------------ client


def _client(now: float = 0.0, timing: ClientTiming = TIMING) -> ClientConnection:
    return ClientConnection(ClientPlan(timing), "9", "run-9-1", now)


def test_client_establishes_then_sends_keepalives_and_dummies_on_time() -> None:
    client = _client()
    assert client.data_to_send() == b"Establish Session 9 run-9-1\n"
    assert client.get_timer() == 5.0
    assert tick(client, 5.0) == []
    assert client.data_to_send() == b"Keep Alive 1\n"
    assert client.get_timer() == 10.0
    assert feed(client, b"Keep Alive Response 1\n", 5.25) == [KeepAliveAnswered(1, 0.25)]
    tick(client, 10.0)
    assert client.data_to_send() == b"Keep Alive 2\n"
    assert client.get_timer() == 11.0
    tick(client, 11.0)
    assert client.data_to_send() == (Dummy("short", bytes(range(32))).encode()
                                     + Dummy("long", bytes(range(128))).encode())
    replies = Dummy("short", bytes(range(32)), True).encode() + Dummy("long", bytes(range(128)), True).encode()
    assert feed(client, b"Keep Alive Response 2\n" + replies, 11.5) == [
        KeepAliveAnswered(2, 1.5), DummyReceived("short"), DummyReceived("long")]


def test_client_reports_a_missing_response_after_the_timeout() -> None:
    client = _client(timing=ClientTiming(5.0, 10.0, 0.0))
    tick(client, 5.0)  # Keep Alive 1
    tick(client, 10.0)  # Keep Alive 2; the deadline of 1 comes next
    assert client.get_timer() == 15.0
    assert tick(client, 15.0) == [ResponseMissing(1, 10.0)]
    assert client.finished and client.get_timer() is None
    assert feed(client, b"Keep Alive Response 1\n", 16.0) == []


def test_client_keeps_its_grid_when_a_timer_fires_late() -> None:
    client = _client(timing=ClientTiming(5.0, 10.0, 0.0))
    client.data_to_send()
    tick(client, 5.5)
    assert client.get_timer() == 10.0
    feed(client, b"Keep Alive Response 1\n", 5.6)
    tick(client, 17.0)  # stalled for more than an interval: restart the grid
    assert client.get_timer() == 22.0


def test_client_without_dummies_never_sends_them() -> None:
    client = _client(timing=ClientTiming(5.0, 10.0, 0.0))
    client.data_to_send()
    for second in range(5, 60, 5):
        tick(client, float(second))
        feed(client, client.data_to_send().replace(b"Alive", b"Alive Response"), float(second))
    assert not client.finished


@pytest.mark.parametrize(
    "reply, reason",
    [
        (b"Keep Alive Response 2\n", "Keep Alive Response for a seq not outstanding"),
        (b"Keep Alive 1\n", "not a response the client expects"),
        (b"Short message reply 00\n", "not a response the client expects"),
        (Dummy("short", bytes(range(32)), True).encode(), "unexpected dummy reply"),
        (b"garbage\n", "unknown message"),
    ],
)
def test_client_rejects_unexpected_replies(reply: bytes, reason: str) -> None:
    client = _client()
    tick(client, 5.0)
    events = feed(client, reply, 6.0)
    assert events == [ProtocolError(reason, events[0].excerpt)]  # type: ignore[union-attr]
    assert client.finished


# ------------------------------------------------------------------ fuzzing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_raises_only_wire_error(line: bytes) -> None:
    try:
        parse_line(line)
    except WireError:
        pass


_tokens = st.sampled_from([b"Keep Alive ", b"Keep Alive Response ", b"Establish Session ", b"Short message ",
                           b"Long message reply ", b"1", b"00", b" ", b"\n", b"\r\n", b"\xff", b"a-b"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), _tokens), max_size=30), st.integers(1, 7))
def test_arbitrary_bytes_never_raise_out_of_either_state_machine(chunks: list[bytes], step: int) -> None:
    stream = b"".join(chunks)
    server = ServerConnection(20.0, 0.0)
    client = _client()
    for offset in range(0, len(stream), step):
        for machine in (server, client):
            events = feed(machine, stream[offset:offset + step], 1.0)
            assert all(not isinstance(e, ProtocolError) or machine.finished for e in events)
            machine.data_to_send()
            tick(machine, 2.0)
