"""Codec tests: RFC 7252 section 3 layout, option registry, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.protocols.coap.message import (
    ACK,
    CON,
    NON,
    OPTION_SPECS,
    RST,
    BlockValue,
    CoapDecodeError,
    Code,
    ContentFormat,
    DecodeFailure,
    Message,
    OptionNumber,
    code_name,
    decode,
    decode_block,
    encode_block,
    encode_empty,
    encode_uint,
    media_type,
    parse_content_format,
    peek_header,
    szx_for_size,
)


def test_get_with_path_and_query_matches_hand_encoding() -> None:
    message = Message(
        CON,
        Code.GET,
        0x1234,
        b"\xab",
        [(OptionNumber.URI_QUERY, b"rlen=40"), (OptionNumber.URI_PATH, b"benchmark")],
    )
    expected = (
        b"\x41\x01\x12\x34\xab"
        + b"\xb9benchmark"  # delta 11, length 9
        + b"\x47rlen=40"  # delta 4, length 7
    )
    assert message.encode() == expected
    decoded = decode(expected)
    assert decoded.uri_path == ["benchmark"]
    assert decoded.uri_query == ["rlen=40"]
    assert decoded.mid == 0x1234 and decoded.token == b"\xab"


def test_extended_delta_and_length_one_and_two_bytes() -> None:
    long_value = b"x" * 300
    message = Message(
        NON,
        Code.CONTENT,
        7,
        b"",
        [(OptionNumber.PROXY_URI, long_value), (OptionNumber.SIZE1, encode_uint(1280))],
        b"payload",
    )
    data = message.encode()
    # Proxy-Uri 35: delta 13+22, length 14 + (300-269).
    assert data[4] == 0xDE and data[5] == 22 and data[6:8] == (300 - 269).to_bytes(2, "big")
    assert decode(data) == message
    # Echo (252) after Size1 (60): delta 192 -> one extended byte.
    big_delta = Message(CON, Code.GET, 1, b"", [(OptionNumber.REQUEST_TAG, b"t")])
    encoded = big_delta.encode()
    assert encoded[4] == 0xE1 and encoded[5:7] == (292 - 269).to_bytes(2, "big")
    assert decode(encoded) == big_delta


def test_repeated_options_keep_their_order() -> None:
    message = Message(CON, Code.GET, 1, b"", [(11, b"a"), (15, b"q"), (11, b"b"), (11, b"c")])
    assert decode(message.encode()).uri_path == ["a", "b", "c"]


def test_payload_marker_and_empty_message() -> None:
    assert encode_empty(ACK, 0xBEEF) == b"\x60\x00\xbe\xef"
    ack = decode(b"\x60\x00\xbe\xef")
    assert ack.mtype == ACK and ack.is_empty and ack.mid == 0xBEEF
    assert decode(Message(ACK, Code.CONTENT, 3, b"t", [], b"hi").encode()).payload == b"hi"
    assert decode(encode_empty(RST, 9)).mtype == RST


@pytest.mark.parametrize(
    ("data", "failure"),
    [
        (b"", DecodeFailure.GARBAGE),
        (b"\x40\x01\x00", DecodeFailure.GARBAGE),
        (b"\x80\x01\x00\x01", DecodeFailure.GARBAGE),  # version 2
        (b"\x49\x01\x00\x01" + b"t" * 9, DecodeFailure.FORMAT),  # TKL 9
        (b"\x42\x01\x00\x01t", DecodeFailure.FORMAT),  # truncated token
        (b"\x40\x01\x00\x01\xff", DecodeFailure.FORMAT),  # marker, no payload
        (b"\x40\x01\x00\x01\xf0", DecodeFailure.FORMAT),  # delta 15
        (b"\x40\x01\x00\x01\x1f", DecodeFailure.FORMAT),  # length 15
        (b"\x40\x01\x00\x01\xb5ab", DecodeFailure.FORMAT),  # value past the end
        (b"\x40\x01\x00\x01\xd0", DecodeFailure.FORMAT),  # truncated extended delta
        (b"\x40\x00\x00\x01\xff", DecodeFailure.FORMAT),  # empty with bytes
        (b"\x41\x00\x00\x01t", DecodeFailure.FORMAT),  # empty with token
        (b"\x40\x21\x00\x01", DecodeFailure.FORMAT),  # class 1 reserved
        (b"\x70\x45\x00\x01", DecodeFailure.FORMAT),  # RST with a code
        (b"\x60\x01\x00\x01", DecodeFailure.FORMAT),  # ACK with a request code
    ],
)
def test_malformed_datagrams(data: bytes, failure: DecodeFailure) -> None:
    with pytest.raises(CoapDecodeError) as caught:
        decode(data)
    assert caught.value.failure is failure
    if failure is not DecodeFailure.GARBAGE:
        assert caught.value.mid == 1 and caught.value.mtype is not None


def test_unknown_critical_option_is_bad_option_with_token() -> None:
    # Option 9999 (odd = critical) is not registered: RFC 7252 section 5.4.1.
    data = Message(CON, Code.GET, 5, b"tok", [(11, b"x"), (9999, b"v")]).encode()
    with pytest.raises(CoapDecodeError) as caught:
        decode(data)
    error = caught.value
    assert error.failure is DecodeFailure.BAD_OPTION
    assert (error.option, error.token, error.mid, error.code) == (9999, b"tok", 5, Code.GET)


def test_unknown_elective_and_bad_length_elective_are_dropped() -> None:
    data = Message(CON, Code.GET, 5, b"", [(11, b"x"), (9998, b"v"), (14, b"12345")]).encode()
    assert decode(data).options == [(11, b"x")]  # Max-Age longer than 4: ignored


def test_critical_option_with_bad_length_is_bad_option() -> None:
    data = Message(CON, Code.GET, 5, b"", [(OptionNumber.BLOCK2, b"1234")]).encode()
    with pytest.raises(CoapDecodeError) as caught:
        decode(data)
    assert caught.value.option == OptionNumber.BLOCK2


def test_peek_header() -> None:
    assert peek_header(b"\x52\x45\x01\x02tt") == (1, 2, Code.CONTENT, 0x0102)
    assert peek_header(b"\x00\x45\x01\x02") is None
    assert peek_header(b"\x40") is None


def test_block_values() -> None:
    assert encode_block(0, False, 0) == b""
    assert encode_block(1, True, 6) == b"\x1e"
    assert decode_block(b"\x1e") == BlockValue(1, True, 6)
    assert BlockValue(3, False, 2).size == 64 and BlockValue(3, False, 2).offset == 192
    assert decode_block(encode_block(0xFFFFF, True, 6)) == (0xFFFFF, True, 6)
    with pytest.raises(ValueError):
        encode_block(1 << 20, False, 0)
    with pytest.raises(ValueError):
        encode_block(0, False, 7)
    assert [szx_for_size(n) for n in (1, 16, 31, 32, 1024, 5000)] == [0, 0, 0, 1, 6, 6]


def test_typed_accessors() -> None:
    message = Message(CON, Code.GET, 1)
    message.set_uint_option(OptionNumber.ACCEPT, ContentFormat.CBOR)
    message.set_uint_option(OptionNumber.OBSERVE, 0)
    message.set_option(OptionNumber.BLOCK2, encode_block(2, False, 4))
    decoded = decode(message.encode())
    assert decoded.accept == 60 and decoded.observe == 0
    assert decoded.block2 == BlockValue(2, False, 4)
    assert decoded.block1 is None and decoded.content_format is None
    assert decoded.option(OptionNumber.OBSERVE) == b""


def test_names_and_content_formats() -> None:
    assert code_name(Code.CONTENT) == "2.05 Content"
    assert code_name(Code.GET) == "GET"
    assert code_name(0xE0) == "7.00"
    assert media_type(60) == "application/cbor"
    assert parse_content_format("json") == 50
    assert parse_content_format("application/link-format") == 40
    assert parse_content_format("11542") == 11542
    with pytest.raises(ValueError):
        parse_content_format("image/png")


# ---------------------------------------------------------------- hypothesis

registered_values = st.sampled_from(
    [
        (11, st.binary(max_size=20)),
        (15, st.binary(max_size=20)),
        (4, st.binary(min_size=1, max_size=8)),
        (6, st.binary(max_size=3)),
        (23, st.binary(max_size=3)),
        (27, st.binary(max_size=3)),
        (35, st.binary(min_size=1, max_size=600)),
        (60, st.binary(max_size=4)),
    ]
)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    mtype = draw(st.sampled_from([CON, NON, ACK]))
    code_class = draw(st.sampled_from([0, 2, 4, 5]) if mtype != ACK else st.sampled_from([2, 4, 5]))
    code = (code_class << 5) | draw(st.integers(1 if code_class == 0 else 0, 31))
    pairs = draw(st.lists(registered_values, max_size=6))
    options = [(number, draw(values)) for number, values in pairs]
    seen: set[int] = set()
    for number, _ in list(options):  # RFC 7252 section 5.4.5: keep one of each non-repeatable
        if number in seen and not OPTION_SPECS[number].repeatable:
            options.remove(next(option for option in reversed(options) if option[0] == number))
        seen.add(number)
    return Message(
        mtype,
        code,
        draw(st.integers(0, 0xFFFF)),
        draw(st.binary(max_size=8)),
        sorted(options, key=lambda o: o[0]),
        draw(st.binary(max_size=100)),
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(message: Message) -> None:
    assert decode(message.encode()) == message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_only_decode_error(data: bytes) -> None:
    try:
        message = decode(data)
    except CoapDecodeError as error:
        assert isinstance(error.failure, DecodeFailure)
        return
    # Whatever decodes re-encodes to something that decodes to the same.
    assert decode(message.encode()) == message


@settings(max_examples=300, deadline=None)
@given(messages(), st.data())
def test_fuzz_mutated_messages(message: Message, data: st.DataObject) -> None:
    raw = bytearray(message.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(raw) - 1))
        raw[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode(bytes(raw[:cut]))
    except CoapDecodeError:
        pass


def test_repeated_non_repeatable_options_are_unrecognized() -> None:
    # RFC 7252 section 5.4.5: Max-Age (elective) twice -> the second is ignored;
    # Uri-Host (critical) twice -> 4.02.
    elective = Message(CON, Code.GET, 1, b"", [(14, b"\x01"), (14, b"\x02"), (11, b"a"), (11, b"b")]).encode()
    assert decode(elective).options == [(11, b"a"), (11, b"b"), (14, b"\x01")]
    critical = Message(CON, Code.GET, 2, b"", [(3, b"h1"), (3, b"h2")]).encode()
    with pytest.raises(CoapDecodeError) as caught:
        decode(critical)
    assert caught.value.failure is DecodeFailure.BAD_OPTION and caught.value.option == 3
