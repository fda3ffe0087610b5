"""The sans-IO CoAP stream (RFC 8323): framing, signalling, hostile-stream bounds, engine to engine."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.interfaces import StreamCore
from nettester.protocols.coap.message import (
    ACK,
    NON,
    CoapDecodeError,
    Code,
    Message,
    OptionNumber,
    decode_uint,
    encode_message,
)
from nettester.protocols.coap.tcp import (
    DEFAULT_MAX_MESSAGE_SIZE,
    CoapStream,
    CsmReceived,
    MessageReceived,
    PongReceived,
    ReleaseReceived,
    SignalCode,
    SignalOption,
    StreamClosed,
    StreamParameters,
    decode_frame,
    encode_frame,
    frame_from_datagram,
    parse_frame_header,
)


def events(stream: CoapStream) -> list[object]:
    found = []
    while (event := stream.next_event()) is not None:
        found.append(event)
    return found


def exchange(a: CoapStream, b: CoapStream, now: float = 0.0) -> None:
    """Move bytes both ways until both are quiet."""
    for _ in range(10):
        ab, ba = a.data_to_send(), b.data_to_send()
        if not ab and not ba:
            return
        b.receive_data(ab, now)
        a.receive_data(ba, now)


def connected_pair() -> tuple[CoapStream, CoapStream]:
    client, server = CoapStream(0.0), CoapStream(0.0)
    exchange(client, server)
    assert [type(event) for event in events(client)] == [CsmReceived]
    assert [type(event) for event in events(server)] == [CsmReceived]
    return client, server


# ---------------------------------------------------------------- framing


def test_length_nibbles_and_extended_lengths_round_trip() -> None:
    # RFC 8323 section 3.2: Len 0-12 inline, 13/14/15 with 1/2/4 extended bytes.
    for size, first_nibble, header_length in ((0, 0, 2), (11, 12, 2), (12, 13, 3), (267, 13, 3),
                                               (268, 14, 4), (65803, 14, 4), (65804, 15, 6)):
        payload = b"x" * size
        frame = encode_frame(Code.CONTENT, b"\x01\x02", (), payload)
        body = size + 1 if size else 0  # the payload marker counts
        assert frame[0] >> 4 == (body if body < 13 else first_nibble if size else 0)
        header = parse_frame_header(frame)
        assert header is not None and header[0] == (header_length if body >= 13 else 2)
        assert header[3] == body
        message = decode_frame(frame)
        assert (message.code, message.token, message.payload) == (Code.CONTENT, b"\x01\x02", payload)


def test_frame_of_a_datagram_drops_type_and_message_id() -> None:
    datagram = encode_message(ACK, Code.CONTENT, 0x1234, b"tok", [(OptionNumber.CONTENT_FORMAT, b"")], b"hello")
    frame = frame_from_datagram(datagram)
    assert frame == encode_frame(Code.CONTENT, b"tok", [(OptionNumber.CONTENT_FORMAT, b"")], b"hello")
    assert frame_from_datagram(encode_message(ACK, 0, 7)) is None  # an Empty ACK means nothing on TCP


def test_signalling_options_are_kept_raw() -> None:
    frame = encode_frame(SignalCode.CSM, b"", [(SignalOption.MAX_MESSAGE_SIZE, b"\x04\x00"),
                                              (SignalOption.BLOCK_WISE_TRANSFER, b"")])
    message = decode_frame(frame)
    assert message.options == [(2, b"\x04\x00"), (4, b"")]


# ---------------------------------------------------------------- signalling


def test_both_sides_send_csm_first_and_learn_the_peer_limits() -> None:
    client = CoapStream(0.0, StreamParameters(max_message_size=2000, block_wise=False))
    server = CoapStream(0.0)
    first = client.data_to_send()
    assert decode_frame(first).code == SignalCode.CSM
    server.receive_data(first, 0.0)
    assert events(server) == [CsmReceived(2000, False)]
    client.receive_data(server.data_to_send(), 0.0)
    assert events(client) == [CsmReceived(server.params.max_message_size, True)]
    assert client.ready and server.ready and server.peer_max_message_size == 2000


def test_peer_limits_default_before_csm() -> None:
    assert CoapStream(0.0).peer_max_message_size == DEFAULT_MAX_MESSAGE_SIZE


def test_messages_flow_and_split_arbitrarily() -> None:
    client, server = connected_pair()
    frame = encode_frame(Code.GET, b"\xaa", [(OptionNumber.URI_PATH, b"test")])
    data = frame * 3
    for index in range(len(data)):  # one byte at a time
        server.receive_data(data[index:index + 1], 0.0)
    received = events(server)
    assert len(received) == 3
    assert all(isinstance(event, MessageReceived) and event.message.path_string == "/test" for event in received)
    assert all(isinstance(event, MessageReceived) and event.message.mtype == NON for event in received)


def test_ping_gets_pong_with_token_and_custody() -> None:
    client, server = connected_pair()
    client.ping(b"\x07", custody=True)
    exchange(client, server)
    assert events(client) == [PongReceived(b"\x07")]
    assert events(server) == []


def test_release_and_abort_end_the_stream() -> None:
    client, server = connected_pair()
    client.release()
    exchange(client, server)
    assert events(server) == [ReleaseReceived(None, None), StreamClosed(
        "released", "the peer released the connection: no Alternative-Address, no Hold-Off")]
    assert events(client) == [StreamClosed("released", "released")]
    client, server = connected_pair()
    client.abort("aborted", "bye")
    exchange(client, server)
    assert events(server) == [StreamClosed("peer_abort", "the peer aborted: bye")]


def test_release_options_are_parsed_and_reported() -> None:
    """RFC 8323 section 5.5: Alternative-Address (string) and Hold-Off (uint seconds)."""
    client, server = connected_pair()
    server.release("moving", alternative_address="backup.example:5684", hold_off=30)
    exchange(server, client)
    release = ReleaseReceived("backup.example:5684", 30)
    assert events(client) == [release, StreamClosed(
        "released", "the peer released the connection: Alternative-Address backup.example:5684, Hold-Off 30 s")]
    assert ReleaseReceived(None, 5).describe() == "Hold-Off 5 s"


def test_peer_abort_detail_carries_bad_csm_option() -> None:
    """Section 5.6: the Bad-CSM-Option of an Abort reaches the log line's detail."""
    client, server = connected_pair()
    client.abort("bad_signal", "unknown critical option 9 in signal 1", 9)
    exchange(client, server)
    assert events(server) == [StreamClosed(
        "peer_abort", "the peer aborted: unknown critical option 9 in signal 1 (Bad-CSM-Option 9)")]


def test_empty_message_is_ignored() -> None:
    client, server = connected_pair()
    server.receive_data(b"\x00\x00", 0.0)
    assert events(server) == [] and server.closed is None


def test_unknown_critical_csm_option_aborts_with_bad_csm_option() -> None:
    server = CoapStream(0.0)
    server.data_to_send()
    server.receive_data(encode_frame(SignalCode.CSM, b"", [(9, b"")]), 0.0)
    assert server.closed == "bad_signal"
    abort = decode_frame(server.data_to_send())
    assert abort.code == SignalCode.ABORT and decode_uint(abort.option(SignalOption.BAD_CSM_OPTION) or b"") == 9


def test_bad_critical_option_in_a_request_gets_4_02() -> None:
    client, server = connected_pair()
    server.receive_data(encode_frame(Code.GET, b"\x01", [(2049, b"x")]), 0.0)
    answer = decode_frame(server.data_to_send())
    assert (answer.code, answer.token) == (Code.BAD_OPTION, b"\x01") and server.closed is None


def test_format_error_aborts() -> None:
    client, server = connected_pair()
    server.receive_data(bytes((0x10, Code.GET, 0xF0)), 0.0)  # option delta 15
    assert server.closed == "format"


# ---------------------------------------------------------------- hostile streams


def test_message_first_instead_of_csm_is_aborted() -> None:
    server = CoapStream(0.0)
    server.data_to_send()
    server.receive_data(encode_frame(Code.GET, b"", [(OptionNumber.URI_PATH, b"test")]), 0.0)
    assert server.closed == "csm_not_first"
    assert decode_frame(server.data_to_send()).code == SignalCode.ABORT
    assert events(server) == [StreamClosed("csm_not_first", "first message 0.01 is not a CSM")]


def test_csm_never_sent_is_aborted_after_the_bound() -> None:
    server = CoapStream(100.0, StreamParameters(csm_timeout=5.0))
    assert server.get_timer() == 105.0
    server.handle_timer(104.0)
    assert server.closed is None
    server.handle_timer(105.0)
    assert server.closed == "no_csm"
    assert server.get_timer() is None


def test_two_gigabyte_length_is_refused_from_the_header() -> None:
    client, server = connected_pair()
    header = bytes((0xF0, 0x7F, 0xFF, 0xFF, 0xFF, Code.PUT))  # 2 GiB announced
    server.receive_data(header + b"x" * 1000, 0.0)
    assert server.closed == "too_large"
    assert len(server._buffer) == 0
    abort = decode_frame(server.data_to_send())
    assert abort.code == SignalCode.ABORT
    assert decode_uint(abort.option(SignalOption.BAD_CSM_OPTION) or b"") == SignalOption.MAX_MESSAGE_SIZE
    server.receive_data(b"y" * 100000, 0.0)  # nothing more is read
    assert len(server._buffer) == 0


def test_slowloris_partial_message_is_closed() -> None:
    client, server = connected_pair()
    frame = encode_frame(Code.GET, b"", [(OptionNumber.URI_PATH, b"test")])
    server.receive_data(frame[:3], 10.0)
    assert server.get_timer() == 40.0
    server.receive_data(frame[3:4], 35.0)  # trickling does not extend the bound
    server.handle_timer(40.0)
    assert server.closed == "slowloris"


def test_completed_message_clears_the_slowloris_bound() -> None:
    client, server = connected_pair()
    frame = encode_frame(Code.GET)
    server.receive_data(frame[:1], 10.0)
    server.receive_data(frame[1:], 11.0)
    assert server.get_timer() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzzed_streams_never_raise(chunks: list[bytes]) -> None:
    server = CoapStream(0.0, StreamParameters(max_message_size=512))
    server.data_to_send()
    server.receive_data(encode_frame(SignalCode.CSM), 0.0)
    for chunk in chunks:
        server.receive_data(chunk, 1.0)
    server.handle_timer(1000.0)
    for event in events(server):
        assert isinstance(event, (CsmReceived, MessageReceived, PongReceived, ReleaseReceived, StreamClosed))
    assert len(server._buffer) <= 512 + 6 + 8 + 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_fuzzed_frames_decode_or_raise_the_codec_error(data: bytes) -> None:
    try:
        message = decode_frame(data)
    except CoapDecodeError:
        return
    assert isinstance(message, Message)


def test_the_stream_is_a_stream_core() -> None:
    """The one stream contract (``interfaces.StreamCore``): mypy checks the structural match."""
    core: StreamCore = CoapStream(0.0)
    assert core.data_to_send()  # our CSM goes first (RFC 8323 section 5.3.1)
    assert core.next_event() is None and core.get_timer() == CoapStream(0.0).get_timer()
