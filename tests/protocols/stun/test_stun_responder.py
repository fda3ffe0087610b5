"""The sans-IO Binding responder: success, errors, drops, RFC 5780, and fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import ServerCounters
from nettester.protocols.stun.message import (
    Address,
    Attribute,
    AttributeType,
    ChangeRequest,
    Message,
    MessageClass,
    Method,
    check_fingerprint,
    decode,
    make_attribute,
)
from nettester.protocols.stun.responder import (
    ALTERNATE_IP,
    ALTERNATE_PORT,
    PRIMARY,
    BindingResponder,
)
from nettester.protocols.stun.server import unmap_ipv4

TID = bytes(range(1, 13))
PEER = ("192.0.2.1", 32853)
RFC5780_ADDRESSES = [
    Address("192.0.2.10", 3478),
    Address("192.0.2.10", 3479),
    Address("192.0.2.11", 3478),
    Address("192.0.2.11", 3479),
]


def make_responder(addresses: list[Address] | None = None) -> tuple[BindingResponder, ServerCounters]:
    counters = ServerCounters(MetricSet("stun_server_test"))
    return BindingResponder(counters, "test server", addresses), counters


def request(*attributes: Attribute, fingerprint: bool = False, method: int = Method.BINDING) -> bytes:
    return Message(method, MessageClass.REQUEST, TID, attributes).encode(fingerprint=fingerprint)


def answer(responder: BindingResponder, data: bytes, peer: tuple[str, int] = PEER, via: int = PRIMARY) -> Message:
    reply = responder.respond(data, peer, via)
    assert reply is not None
    return decode(reply[0])


def test_bare_binding_request_gets_both_mapped_addresses_and_software() -> None:
    responder, counters = make_responder()
    response = answer(responder, request())
    assert (response.method, response.message_class, response.transaction_id) == (
        Method.BINDING,
        MessageClass.SUCCESS,
        TID,
    )
    assert response.get(AttributeType.XOR_MAPPED_ADDRESS) == Address(*PEER)
    assert response.get(AttributeType.MAPPED_ADDRESS) == Address(*PEER)
    assert response.get(AttributeType.SOFTWARE) == "test server"
    assert response.find(AttributeType.FINGERPRINT) is None
    assert response.find(AttributeType.OTHER_ADDRESS) is None
    assert (counters.requests.value, counters.responses.value) == (1, 1)


def test_cached_peer_still_gets_its_own_transaction_id() -> None:
    responder, _ = make_responder()
    answer(responder, request())
    other_tid = bytes(12)
    reply = responder.respond(request()[:8] + other_tid, PEER)
    assert reply is not None and decode(reply[0]).transaction_id == other_tid


def test_ipv6_peer() -> None:
    responder, _ = make_responder()
    peer = ("2001:db8::5", 40000)
    response = answer(responder, request(), peer)
    assert response.get(AttributeType.XOR_MAPPED_ADDRESS) == Address(*peer)
    assert response.get(AttributeType.MAPPED_ADDRESS) == Address(*peer)


def test_dual_stack_socket_reports_ipv4_peers_as_ipv4() -> None:
    assert unmap_ipv4(("::ffff:192.0.2.1", 5)) == ("192.0.2.1", 5)
    assert unmap_ipv4(("::1", 5)) == ("::1", 5)


def test_fingerprint_in_request_gives_fingerprint_in_response() -> None:
    responder, _ = make_responder()
    data = request(make_attribute(AttributeType.SOFTWARE, "client"), fingerprint=True)
    reply = responder.respond(data, PEER)
    assert reply is not None
    assert check_fingerprint(reply[0])
    assert decode(reply[0]).get(AttributeType.XOR_MAPPED_ADDRESS) == Address(*PEER)


def test_request_with_a_bad_fingerprint_is_dropped() -> None:
    responder, counters = make_responder()
    data = bytearray(request(fingerprint=True))
    data[-1] ^= 0xFF
    assert responder.respond(bytes(data), PEER) is None
    assert counters.dropped.get("bad_fingerprint") == 1


def test_unknown_comprehension_required_attributes_get_420_listing_them() -> None:
    responder, counters = make_responder()
    data = request(Attribute(0x0024, b"\x00\x00\x00\x01"), Attribute(0x7F00, b""), Attribute(0x8029, bytes(8)))
    response = answer(responder, data)
    assert response.message_class == MessageClass.ERROR
    assert response.get(AttributeType.ERROR_CODE).code == 420
    assert response.get(AttributeType.UNKNOWN_ATTRIBUTES) == (0x0024, 0x7F00)  # 0x8029 is optional
    assert counters.errors.get("420") == 1


def test_comprehension_optional_unknown_attributes_are_ignored() -> None:
    responder, _ = make_responder()
    response = answer(responder, request(Attribute(0x8029, bytes(8)), make_attribute(AttributeType.USERNAME, "u")))
    assert response.message_class == MessageClass.SUCCESS


def test_change_request_asking_for_nothing_is_answered_without_other_address() -> None:
    responder, _ = make_responder()
    response = answer(responder, request(make_attribute(AttributeType.CHANGE_REQUEST, ChangeRequest(False, False))))
    assert response.message_class == MessageClass.SUCCESS


CLASSIC_ID = bytes(range(100, 116))  # RFC 3489: a 128-bit id where the cookie would be


def classic_request(*attributes: Attribute) -> bytes:
    body = b"".join(attribute.encode() for attribute in attributes)
    return b"\x00\x01" + len(body).to_bytes(2, "big") + CLASSIC_ID + body


def test_rfc3489_client_gets_mapped_address_and_its_whole_id_back() -> None:
    responder, counters = make_responder()
    reply = responder.respond(
        classic_request(make_attribute(AttributeType.CHANGE_REQUEST, ChangeRequest(False, False))), PEER
    )
    assert reply is not None
    data = reply[0]
    assert data[:2] == b"\x01\x01" and data[4:20] == CLASSIC_ID
    response = decode(data, magic_cookie=False)
    assert response.get(AttributeType.MAPPED_ADDRESS) == Address(*PEER)
    assert response.find(AttributeType.XOR_MAPPED_ADDRESS) is None
    assert response.find(AttributeType.SOURCE_ADDRESS) is None  # unknown without --other-address
    assert all(len(attribute.value) % 4 == 0 for attribute in response.attributes)
    assert counters.requests.value == 1


def test_rfc3489_client_of_an_rfc5780_server_gets_source_and_changed_address() -> None:
    responder, _ = make_responder(RFC5780_ADDRESSES)
    change = make_attribute(AttributeType.CHANGE_REQUEST, ChangeRequest(True, False))
    reply = responder.respond(classic_request(change), PEER, PRIMARY)
    assert reply is not None and reply[1] == ALTERNATE_IP
    response = decode(reply[0], magic_cookie=False)
    assert response.get(AttributeType.SOURCE_ADDRESS) == RFC5780_ADDRESSES[ALTERNATE_IP]
    assert response.get(AttributeType.CHANGED_ADDRESS) == RFC5780_ADDRESSES[ALTERNATE_IP | ALTERNATE_PORT]


def test_rfc3489_client_errors_echo_the_whole_id() -> None:
    responder, _ = make_responder()
    reply = responder.respond(classic_request(Attribute(0x0002, bytes(8))), PEER)  # RESPONSE-ADDRESS: unsupported
    assert reply is not None and reply[0][4:20] == CLASSIC_ID
    response = decode(reply[0], magic_cookie=False)
    assert response.get(AttributeType.ERROR_CODE).code == 420
    # RFC 3489 parsers need every value a multiple of 4 bytes: the odd list repeats its last type.
    assert response.get(AttributeType.UNKNOWN_ATTRIBUTES) == (0x0002, 0x0002)
    assert all(len(attribute.value) % 4 == 0 for attribute in response.attributes)


def test_change_request_without_other_address_is_unknown() -> None:
    responder, _ = make_responder()
    response = answer(responder, request(make_attribute(AttributeType.CHANGE_REQUEST, ChangeRequest(True, True))))
    assert response.get(AttributeType.ERROR_CODE).code == 420
    assert response.get(AttributeType.UNKNOWN_ATTRIBUTES) == (AttributeType.CHANGE_REQUEST,)


@pytest.mark.parametrize(
    "data",
    [
        request()[:2] + b"\x00\x08" + request()[4:] + b"\x00\x01\x00\x08",  # attribute overruns
        request()[:2] + b"\x00\x04" + request()[4:],  # length says 4, nothing follows
        request()[:2] + b"\x00\x0c" + request(fingerprint=True)[4:] + b"\x80\x22\x00\x00",  # after FINGERPRINT
    ],
)
def test_malformed_request_with_valid_header_gets_400(data: bytes) -> None:
    responder, counters = make_responder()
    response = answer(responder, data)
    assert response.message_class == MessageClass.ERROR
    assert response.get(AttributeType.ERROR_CODE).code == 400
    assert counters.errors.get("400") == 1


def test_other_method_request_gets_400_and_indications_are_dropped() -> None:
    responder, counters = make_responder()
    response = answer(responder, request(method=0x003))
    assert response.get(AttributeType.ERROR_CODE).code == 400
    indication = Message(Method.BINDING, MessageClass.INDICATION, TID).encode()
    assert responder.respond(indication, PEER) is None
    success = Message(Method.BINDING, MessageClass.SUCCESS, TID).encode()
    assert responder.respond(success, PEER) is None
    assert counters.dropped.get("not_request") == 2


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GET / HTTP/1.1\r\n\r\n" * 2,
        bytes(20),  # no cookie, not a Binding request
        b"\x00\x01\x00\x04" + bytes(16),  # no cookie, length disagrees with the datagram
        b"\x00\x01\x00\x08" + bytes(16) + b"\x00\x01\x00\x10" + bytes(4),  # no cookie, attribute overruns
    ],
)
def test_not_stun_is_dropped_and_counted(data: bytes) -> None:
    responder, counters = make_responder()
    assert responder.respond(data, PEER) is None
    assert counters.dropped.get("not_stun") == 1


def test_rfc5780_addresses_in_every_response() -> None:
    responder, _ = make_responder(RFC5780_ADDRESSES)
    response = answer(responder, request(), via=ALTERNATE_PORT)
    assert response.get(AttributeType.RESPONSE_ORIGIN) == RFC5780_ADDRESSES[ALTERNATE_PORT]
    # OTHER-ADDRESS differs from the receiving address in both IP and port (RFC 5780 section 7.4).
    assert response.get(AttributeType.OTHER_ADDRESS) == RFC5780_ADDRESSES[ALTERNATE_IP]


@pytest.mark.parametrize(
    ("change", "via", "expected"),
    [
        (ChangeRequest(False, False), PRIMARY, PRIMARY),
        (ChangeRequest(True, False), PRIMARY, ALTERNATE_IP),
        (ChangeRequest(False, True), PRIMARY, ALTERNATE_PORT),
        (ChangeRequest(True, True), PRIMARY, ALTERNATE_IP | ALTERNATE_PORT),
        (ChangeRequest(True, True), ALTERNATE_IP | ALTERNATE_PORT, PRIMARY),
        (ChangeRequest(False, True), ALTERNATE_IP, ALTERNATE_IP | ALTERNATE_PORT),
    ],
)
def test_change_request_answers_from_the_other_socket(change: ChangeRequest, via: int, expected: int) -> None:
    responder, counters = make_responder(RFC5780_ADDRESSES)
    reply = responder.respond(request(make_attribute(AttributeType.CHANGE_REQUEST, change)), PEER, via)
    assert reply is not None
    data, send_via, port = reply
    assert port == 0
    assert send_via == expected
    assert decode(data).get(AttributeType.RESPONSE_ORIGIN) == RFC5780_ADDRESSES[expected]
    assert counters.changed.value == (1 if expected != via else 0)


def test_response_port_is_honoured_only_by_an_rfc5780_server() -> None:
    data = request(make_attribute(AttributeType.RESPONSE_PORT, 40404))
    responder, _ = make_responder(RFC5780_ADDRESSES)
    reply = responder.respond(data, PEER)
    assert reply is not None and reply[2] == 40404
    assert decode(reply[0]).message_class == MessageClass.SUCCESS
    plain, _ = make_responder()
    response = answer(plain, data)
    assert response.get(AttributeType.UNKNOWN_ATTRIBUTES) == (AttributeType.RESPONSE_PORT,)


def test_a_responder_needs_four_addresses_for_rfc5780() -> None:
    with pytest.raises(ValueError, match="four"):
        make_responder(RFC5780_ADDRESSES[:2])


@given(st.binary(max_size=120), st.sampled_from([PEER, ("2001:db8::1", 1), ("::ffff:10.0.0.1", 2)]))
@settings(max_examples=400, deadline=None)
def test_fuzz_any_datagram_is_answered_with_valid_stun_or_dropped(data: bytes, peer: tuple[str, int]) -> None:
    responder, counters = make_responder(RFC5780_ADDRESSES)
    reply = responder.respond(data, unmap_ipv4(peer))
    if reply is None:
        assert counters.dropped.total == 1
    else:
        decode(reply[0], magic_cookie=False)
        assert reply[0][4:20] == data[4:20]  # cookie and transaction id (or an RFC 3489 id) echoed


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=24)), max_size=5), st.booleans())
@settings(max_examples=300, deadline=None)
def test_fuzz_well_framed_requests(attributes: list[tuple[int, bytes]], fingerprint: bool) -> None:
    responder, _ = make_responder(RFC5780_ADDRESSES)
    attrs = tuple(Attribute(t, v) for t, v in attributes if t != AttributeType.FINGERPRINT)
    reply = responder.respond(request(*attrs, fingerprint=fingerprint), PEER)
    assert reply is not None
    response = decode(reply[0])
    assert response.message_class in (MessageClass.SUCCESS, MessageClass.ERROR)
    if fingerprint:
        assert check_fingerprint(reply[0])
