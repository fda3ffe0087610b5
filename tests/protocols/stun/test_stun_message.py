"""The STUN codec: RFC 5769 vectors byte for byte, every typed attribute, and fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.protocols.stun.message import (
    Address,
    Attribute,
    AttributeType,
    ChangeRequest,
    ErrorCode,
    Message,
    MessageClass,
    Method,
    StunDecodeError,
    check_fingerprint,
    check_header,
    check_integrity,
    decode,
    format_transaction_id,
    long_term_key,
    make_attribute,
    message_type,
    short_term_key,
    split_message_type,
)


def vector(text: str) -> bytes:
    """Hex bytes as printed in RFC 5769 (whitespace ignored)."""
    return bytes.fromhex("".join(text.split()))


# RFC 5769 section 2.1: short-term credentials, password "VOkJxbRl1RmTxUk/WvJxBt".
SAMPLE_REQUEST = vector(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)
# RFC 5769 section 2.2: mapped address 192.0.2.1:32853.
SAMPLE_IPV4_RESPONSE = vector(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)
# RFC 5769 section 2.3: mapped address [2001:db8:1234:5678:11:2233:4455:6677]:32853.
SAMPLE_IPV6_RESPONSE = vector(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)
# RFC 5769 section 2.4: long-term credentials, realm "example.org", no FINGERPRINT.
SAMPLE_LONG_TERM_REQUEST = vector(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)
SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")
SPACES = b"\x20\x20\x20"


@pytest.mark.parametrize("data", [SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE, SAMPLE_LONG_TERM_REQUEST])
def test_rfc5769_vectors_reencode_byte_for_byte(data: bytes) -> None:
    message = decode(data)
    assert message.encode() == data


def test_rfc5769_sample_request_fields_integrity_and_fingerprint() -> None:
    message = decode(SAMPLE_REQUEST)
    assert (message.method, message.message_class) == (Method.BINDING, MessageClass.REQUEST)
    assert message.transaction_id == TRANSACTION_ID
    assert message.get(AttributeType.SOFTWARE) == "STUN test client"
    assert message.get(AttributeType.USERNAME) == "evtj:h6vY"
    assert message.find(0x0024) == Attribute(0x0024, bytes.fromhex("6e0001ff"))  # PRIORITY: unknown, kept raw
    assert check_integrity(SAMPLE_REQUEST, short_term_key(SHORT_TERM_PASSWORD))
    assert not check_integrity(SAMPLE_REQUEST, b"wrong password")
    assert check_fingerprint(SAMPLE_REQUEST)


@pytest.mark.parametrize(
    ("data", "mapped"),
    [
        (SAMPLE_IPV4_RESPONSE, Address("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, Address("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses_decode_xor_mapped_address(data: bytes, mapped: Address) -> None:
    message = decode(data)
    assert message.message_class == MessageClass.SUCCESS
    assert message.get(AttributeType.XOR_MAPPED_ADDRESS) == mapped
    assert message.get(AttributeType.SOFTWARE) == "test vector"
    assert check_integrity(data, short_term_key(SHORT_TERM_PASSWORD))
    assert check_fingerprint(data)


def test_rfc5769_long_term_request_integrity() -> None:
    key = long_term_key("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "example.org", "TheMatrIX")
    assert check_integrity(SAMPLE_LONG_TERM_REQUEST, key)
    assert not check_fingerprint(SAMPLE_LONG_TERM_REQUEST)


def test_rfc5769_request_built_from_scratch_computes_integrity_and_fingerprint() -> None:
    """Encoding computes MESSAGE-INTEGRITY and FINGERPRINT exactly as the RFC printed them."""
    built = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        TRANSACTION_ID,
        (
            make_attribute(AttributeType.SOFTWARE, "STUN test client"),
            Attribute(0x0024, bytes.fromhex("6e0001ff")),
            Attribute(0x8029, bytes.fromhex("932ff9b151263b36")),
            make_attribute(AttributeType.USERNAME, "evtj:h6vY", padding=SPACES),
        ),
    ).encode(integrity_key=short_term_key(SHORT_TERM_PASSWORD), fingerprint=True)
    assert built == SAMPLE_REQUEST


@pytest.mark.parametrize(
    ("data", "mapped"),
    [
        (SAMPLE_IPV4_RESPONSE, Address("192.0.2.1", 32853)),
        (SAMPLE_IPV6_RESPONSE, Address("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses_built_from_scratch(data: bytes, mapped: Address) -> None:
    built = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        TRANSACTION_ID,
        (
            make_attribute(AttributeType.SOFTWARE, "test vector", padding=b"\x20"),
            make_attribute(AttributeType.XOR_MAPPED_ADDRESS, mapped, TRANSACTION_ID),
        ),
    ).encode(integrity_key=short_term_key(SHORT_TERM_PASSWORD), fingerprint=True)
    assert built == data


def test_message_type_interleaves_method_and_class() -> None:
    assert message_type(Method.BINDING, MessageClass.REQUEST) == 0x0001
    assert message_type(Method.BINDING, MessageClass.INDICATION) == 0x0011
    assert message_type(Method.BINDING, MessageClass.SUCCESS) == 0x0101
    assert message_type(Method.BINDING, MessageClass.ERROR) == 0x0111
    assert message_type(0x003, MessageClass.REQUEST) == 0x0003  # Allocate (RFC 8656)


@given(st.integers(0, 0xFFF), st.sampled_from(list(MessageClass)))
@settings(max_examples=200, deadline=None)
def test_message_type_round_trips(method: int, message_class: int) -> None:
    assert split_message_type(message_type(method, message_class)) == (method, message_class)


@pytest.mark.parametrize(
    ("attribute_type", "value"),
    [
        (AttributeType.MAPPED_ADDRESS, Address("10.1.2.3", 1)),
        (AttributeType.ALTERNATE_SERVER, Address("::1", 3478)),
        (AttributeType.RESPONSE_ORIGIN, Address("192.0.2.7", 3479)),
        (AttributeType.OTHER_ADDRESS, Address("2001:db8::9", 65535)),
        (AttributeType.XOR_MAPPED_ADDRESS, Address("2001:db8::1", 40000)),
        (AttributeType.XOR_MAPPED_ADDRESS, Address("203.0.113.5", 0)),
        (AttributeType.ERROR_CODE, ErrorCode(420, "Unknown Attribute")),
        (AttributeType.ERROR_CODE, ErrorCode(300, "")),
        (AttributeType.UNKNOWN_ATTRIBUTES, (0x0003, 0x7FFF)),
        (AttributeType.CHANGE_REQUEST, ChangeRequest(True, False)),
        (AttributeType.CHANGE_REQUEST, ChangeRequest(False, True)),
        (AttributeType.RESPONSE_PORT, 40404),
        (AttributeType.SOURCE_ADDRESS, Address("192.0.2.9", 3478)),
        (AttributeType.CHANGED_ADDRESS, Address("192.0.2.10", 3479)),
        (AttributeType.USERNAME, "\u00e9l\u00e8ve"),
        (AttributeType.SOFTWARE, "nettester"),
        (AttributeType.FINGERPRINT, 0xDEADBEEF),
        (AttributeType.MESSAGE_INTEGRITY, bytes(range(20))),
        (AttributeType.MESSAGE_INTEGRITY_SHA256, bytes(range(32))),
    ],
)
def test_typed_attributes_round_trip(attribute_type: AttributeType, value: object) -> None:
    message = Message(
        Method.BINDING, MessageClass.SUCCESS, TRANSACTION_ID, (make_attribute(attribute_type, value, TRANSACTION_ID),)
    )
    data = message.encode()
    assert len(data) % 4 == 0
    assert decode(data).get(attribute_type) == value


def test_xor_mapped_address_wire_form_hides_the_address() -> None:
    attribute = make_attribute(AttributeType.XOR_MAPPED_ADDRESS, Address("192.0.2.1", 32853), TRANSACTION_ID)
    assert attribute.value == bytes.fromhex("0001a147e112a643")  # RFC 5769 section 2.2


def test_sha256_integrity_and_fingerprint_together() -> None:
    key = b"secret"
    data = Message(Method.BINDING, MessageClass.REQUEST, TRANSACTION_ID).encode(
        integrity_key=key, integrity_sha256_key=key, fingerprint=True
    )
    assert check_integrity(data, key) and check_integrity(data, key, sha256=True)
    assert check_fingerprint(data)
    corrupted = bytearray(data)
    corrupted[-1] ^= 1
    assert not check_fingerprint(bytes(corrupted))


def test_encoding_refuses_a_transaction_id_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="12 bytes, not 16"):
        Message(Method.BINDING, MessageClass.REQUEST, bytes(16)).encode()


def test_format_transaction_id_is_upper_case_colon_hex() -> None:
    assert format_transaction_id(TRANSACTION_ID) == "B7:E7:A7:01:BC:34:D6:86:FA:87:DF:AE"


def test_address_text_brackets_ipv6() -> None:
    assert str(Address("192.0.2.1", 5)) == "192.0.2.1:5"
    assert str(Address("::1", 5)) == "[::1]:5"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than the 20-byte"),
        (SAMPLE_REQUEST[:19], "shorter than the 20-byte"),
        (b"\x80" + SAMPLE_REQUEST[1:], "most significant bits"),
        (SAMPLE_REQUEST[:4] + b"\x00\x00\x00\x00" + SAMPLE_REQUEST[8:], "magic cookie"),
        (SAMPLE_REQUEST[:3] + b"\x57" + SAMPLE_REQUEST[4:], "multiple of 4"),
        (SAMPLE_REQUEST[:-4], "present"),
        (SAMPLE_REQUEST + b"\x00\x00\x00\x00", "present"),
        (struct.pack("!HHI12s", 1, 4, 0x2112A442, TRANSACTION_ID) + b"\x00\x01\x00\x08", "overruns"),
        (SAMPLE_IPV4_RESPONSE[:2] + b"\x00\x40" + SAMPLE_IPV4_RESPONSE[4:] + b"\x80\x22\x00\x00", "after FINGERPRINT"),
    ],
)
def test_malformed_messages_raise_the_documented_error(data: bytes, reason: str) -> None:
    with pytest.raises(StunDecodeError, match=reason):
        decode(data)


@pytest.mark.parametrize(
    ("attribute_type", "value"),
    [
        (AttributeType.XOR_MAPPED_ADDRESS, b"\x00\x01\x00"),
        (AttributeType.MAPPED_ADDRESS, b"\x00\x03\x00\x01\x01\x02\x03\x04"),
        (AttributeType.MAPPED_ADDRESS, b"\x00\x01\x00\x01\x01\x02\x03"),
        (AttributeType.USERNAME, b"\xff\xfe"),
        (AttributeType.USERNAME, b"a" * 514),
        (AttributeType.ERROR_CODE, b"\x00\x00\x07\x00"),
        (AttributeType.ERROR_CODE, b"\x00\x00\x04\x64"),
        (AttributeType.UNKNOWN_ATTRIBUTES, b"\x00\x01\x00"),
        (AttributeType.CHANGE_REQUEST, b"\x00\x00\x06"),
        (AttributeType.RESPONSE_PORT, b"\x00\x01"),
        (AttributeType.FINGERPRINT, b"\x00"),
        (AttributeType.MESSAGE_INTEGRITY, bytes(19)),
        (AttributeType.MESSAGE_INTEGRITY_SHA256, bytes(18)),
    ],
)
def test_malformed_values_raise_the_documented_error(attribute_type: AttributeType, value: bytes) -> None:
    data = Message(Method.BINDING, MessageClass.SUCCESS, TRANSACTION_ID, (Attribute(attribute_type, value),)).encode()
    message = decode(data)
    with pytest.raises(StunDecodeError):
        message.get(attribute_type)


def test_check_header_accepts_a_longer_buffer_for_tcp_framing() -> None:
    assert check_header(SAMPLE_REQUEST + b"more") == 0x58


@given(st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        message = decode(data)
    except StunDecodeError:
        return
    assert message.encode() == data
    for attribute in message.attributes:
        with contextlib.suppress(StunDecodeError):
            message.get(attribute.type)  # type: ignore[arg-type]


attributes = st.lists(
    st.tuples(st.integers(0, 0xFFFF).filter(lambda t: t != AttributeType.FINGERPRINT), st.binary(max_size=40)),
    max_size=6,
)


@given(st.integers(0, 0x3FFF), st.binary(min_size=12, max_size=12), attributes, st.data())
@settings(max_examples=300, deadline=None)
def test_fuzz_well_framed_messages_with_mutated_bytes(kind: int, tid: bytes, attrs, data) -> None:  # type: ignore[no-untyped-def]
    """Valid framing with random values (the parser's deeper paths), then one flipped byte."""
    method, message_class = split_message_type(kind)
    encoded = Message(method, message_class, tid, tuple(Attribute(t, v) for t, v in attrs)).encode(fingerprint=True)
    assert check_fingerprint(encoded)
    position = data.draw(st.integers(0, len(encoded) - 1))
    mutated = bytearray(encoded)
    mutated[position] ^= data.draw(st.integers(1, 255))
    for candidate in (encoded, bytes(mutated)):
        try:
            message = decode(candidate)
            check_fingerprint(candidate)
            check_integrity(candidate, b"key")
            for attribute in message.attributes:
                message.get(attribute.type)  # type: ignore[arg-type]
        except StunDecodeError:
            pass
