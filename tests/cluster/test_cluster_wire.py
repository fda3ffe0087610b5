"""Management records: Californium's layout byte for byte, the MAC, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nettester.cluster.wire import (
    TYPE_IN,
    TYPE_OUT,
    TYPE_PING,
    TYPE_PONG,
    ForwardedRecords,
    ManagementCodec,
    ManagementError,
    NodeMessage,
    NodeState,
    derive_mac_key,
)

RECORD = bytes([25, 254, 253, 0, 1, 0, 0, 0, 0, 0, 7]) + bytes([2, 1, 2, 3, 4, 5]) + b"\x00\x03abc"
SECRET = b"group secret"


def test_in_record_layout_is_californias() -> None:
    codec = ManagementCodec()
    encoded = codec.encode_records(TYPE_IN, ("192.0.2.7", 0x1234), RECORD)
    assert encoded == bytes([63, 0x34, 0x12, 4, 192, 0, 2, 7]) + RECORD
    assert codec.decode(encoded) == ForwardedRecords(TYPE_IN, ("192.0.2.7", 0x1234), RECORD)


def test_out_record_with_ipv6_client() -> None:
    codec = ManagementCodec()
    encoded = codec.encode_records(TYPE_OUT, ("2001:db8::1", 5684), RECORD)
    assert encoded[:4] == bytes([62, 0x34, 0x16, 16])
    assert encoded[4:20] == bytes.fromhex("20010db8000000000000000000000001")
    assert codec.decode(encoded) == ForwardedRecords(TYPE_OUT, ("2001:db8::1", 5684), RECORD)


def test_ping_pong_layout_is_californias() -> None:
    codec = ManagementCodec()
    assert codec.encode_node(TYPE_PING, 0x01020304, NodeState.UP) == bytes([61, 4, 3, 2, 1, 1])
    assert codec.decode(bytes([60, 2, 0, 0, 0, 2])) == NodeMessage(TYPE_PONG, 2, NodeState.INITIALIZED, None)


def test_keyed_records_carry_an_8_byte_mac_over_header_and_records() -> None:
    import hashlib
    import hmac

    codec = ManagementCodec(SECRET)
    encoded = codec.encode_records(TYPE_IN, ("192.0.2.7", 5684), RECORD)
    header = encoded[:8]
    expected = hmac.new(derive_mac_key(SECRET), header + RECORD, hashlib.sha256).digest()[:8]
    assert encoded == header + expected + RECORD
    assert codec.decode(encoded).records == RECORD
    ping = codec.encode_node(TYPE_PING, 3, NodeState.UP, timestamp_ms=1_700_000_000_123)
    assert len(ping) == 6 + 8 + 8
    assert ping[6:14] == (1_700_000_000_123).to_bytes(8, "little")
    assert codec.decode(ping) == NodeMessage(TYPE_PING, 3, NodeState.UP, 1_700_000_000_123)


def test_key_derivation_is_hkdf_sha256_with_a_fixed_info() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    expected = HKDF(hashes.SHA256(), 32, None, b"nettester dtls-cid cluster management mac v1").derive(SECRET)
    assert derive_mac_key(SECRET) == expected != derive_mac_key(b"other")
    with pytest.raises(ValueError):
        derive_mac_key(b"")


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "empty"),
        (b"\x17\xfe\xfd", "unknown_type"),
        (bytes([63, 1]), "truncated"),
        (bytes([63, 1, 0, 5, 1, 2, 3, 4, 5]) + RECORD, "bad_address"),
        (bytes([63, 1, 0, 4, 1, 2]), "truncated"),
        (bytes([63, 1, 0, 4, 1, 2, 3, 4]), "truncated"),
        (bytes([61, 1, 0, 0, 0]), "bad_length"),
        (bytes([61, 1, 0, 0, 0, 1, 0]), "bad_length"),
        (bytes([61, 1, 0, 0, 0, 3]), "bad_state"),
    ],
)
def test_unkeyed_bad_input_reasons(datagram: bytes, reason: str) -> None:
    with pytest.raises(ManagementError) as caught:
        ManagementCodec().decode(datagram)
    assert caught.value.reason == reason


def test_keyed_codec_rejects_unauthenticated_californium_records() -> None:
    keyed = ManagementCodec(SECRET)
    plain = ManagementCodec()
    for datagram, reason in (
        (plain.encode_records(TYPE_IN, ("192.0.2.7", 5684), RECORD), "bad_mac"),
        (plain.encode_records(TYPE_IN, ("192.0.2.7", 5684), b"x"), "missing_mac"),
        (plain.encode_node(TYPE_PING, 1, NodeState.UP), "missing_mac"),
        (ManagementCodec(b"wrong").encode_records(TYPE_IN, ("192.0.2.7", 5684), RECORD), "bad_mac"),
        (ManagementCodec(b"wrong").encode_node(TYPE_PONG, 1, NodeState.UP, 5), "bad_mac"),
    ):
        with pytest.raises(ManagementError) as caught:
            keyed.decode(datagram)
        assert caught.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_any_bytes_decode_or_raise_management_error(datagram: bytes) -> None:
    for codec in (ManagementCodec(), ManagementCodec(SECRET)):
        try:
            decoded = codec.decode(datagram)
        except ManagementError as error:
            assert error.reason
        else:
            assert isinstance(decoded, (ForwardedRecords, NodeMessage))


clients = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)
).flatmap(lambda host: st.tuples(st.just(host), st.integers(0, 65535)))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([TYPE_IN, TYPE_OUT]), clients, st.binary(min_size=1, max_size=60))
def test_records_round_trip(kind: int, client: tuple[str, int], records: bytes) -> None:
    import ipaddress

    for codec in (ManagementCodec(), ManagementCodec(SECRET)):
        decoded = codec.decode(codec.encode_records(kind, client, records))
        assert decoded.kind == kind and decoded.records == records
        assert ipaddress.ip_address(decoded.client[0]) == ipaddress.ip_address(client[0])
        assert decoded.client[1] == client[1]


@settings(max_examples=200, deadline=None)
@given(clients, clients, st.binary(min_size=1, max_size=40), st.data())
def test_forged_or_tampered_keyed_records_are_never_accepted(
    client: tuple[str, int], forged: tuple[str, int], records: bytes, data: st.DataObject
) -> None:
    """Without the key, nobody can inject a record for a chosen client address."""
    keyed = ManagementCodec(SECRET)
    genuine = keyed.encode_records(TYPE_IN, client, records)
    # 1. a forged client address on a genuine MAC
    attacker = ManagementCodec(b"guessed")
    forgery = attacker.encode_records(TYPE_IN, forged, records)
    with pytest.raises(ManagementError):
        keyed.decode(forgery)
    spliced = forgery[: len(forgery) - len(records) - 8] + genuine[-len(records) - 8 :]
    assume(spliced != genuine)
    with pytest.raises(ManagementError):
        keyed.decode(spliced)
    # 2. any single flipped bit, and any truncation
    position = data.draw(st.integers(0, len(genuine) - 1))
    bit = data.draw(st.integers(0, 7))
    tampered = bytearray(genuine)
    tampered[position] ^= 1 << bit
    with pytest.raises(ManagementError):
        keyed.decode(bytes(tampered))
    cut = data.draw(st.integers(0, len(genuine) - 1))
    with pytest.raises(ManagementError):
        keyed.decode(genuine[:cut])


def test_encode_rejects_wrong_kinds() -> None:
    with pytest.raises(ValueError):
        ManagementCodec().encode_records(TYPE_PING, ("192.0.2.1", 1), b"x")
    with pytest.raises(ValueError):
        ManagementCodec().encode_node(TYPE_IN, 1, NodeState.UP)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=100), clients, st.binary(min_size=1, max_size=200))
def test_the_padded_key_mac_is_hmac_sha256(secret: bytes, client: tuple[str, int], records: bytes) -> None:
    """The precomputed RFC 2104 pads give exactly hmac.new's tag, whatever the secret and records."""
    import hashlib
    import hmac

    encoded = ManagementCodec(secret).encode_records(TYPE_OUT, client, records)
    header_end = len(encoded) - len(records) - 8
    expected = hmac.new(derive_mac_key(secret), encoded[:header_end] + records, hashlib.sha256).digest()[:8]
    assert encoded[header_end:-len(records)] == expected


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([TYPE_IN, TYPE_OUT]), st.binary(max_size=80))
def test_the_records_fast_path_agrees_with_decode(kind: int, rest: bytes) -> None:
    """decode_records (the relay's hot path) accepts and rejects exactly what decode does."""
    datagram = bytes([kind]) + rest
    for codec in (ManagementCodec(), ManagementCodec(SECRET)):
        try:
            expected = codec.decode(datagram)
        except ManagementError as error:
            with pytest.raises(ManagementError) as caught:
                codec.decode_records(datagram)
            assert caught.value.reason == error.reason
        else:
            assert isinstance(expected, ForwardedRecords)
            assert codec.decode_records(datagram) == (expected.client, expected.records)


# -- STATE (59): connection snapshots for fail-over, encrypted ---------------------------------------


def test_state_records_are_encrypted_and_round_trip() -> None:
    from nettester.cluster.wire import TYPE_STATE, ConnectionState

    codec = ManagementCodec(SECRET)
    snapshot = b"session keys " * 8
    encoded = codec.encode_state(b"\x02abcde", snapshot, 1_700_000_000_123)
    # The CID in the clear (as in every record of its session), so the kernel can steer the replica by it.
    assert encoded[:8] == bytes((TYPE_STATE, 6)) + b"\x02abcde"
    assert b"session keys" not in encoded
    assert len(encoded) == 1 + 1 + 6 + 12 + 8 + len(snapshot) + 16
    assert codec.decode(encoded) == ConnectionState(b"\x02abcde", snapshot, 1_700_000_000_123)
    assert codec.encode_state(b"\x02abcde", snapshot, 1) != codec.encode_state(b"\x02abcde", snapshot, 1)  # nonce


def test_state_records_need_the_secret_both_ways() -> None:
    with pytest.raises(ValueError, match="secret"):
        ManagementCodec().encode_state(b"\x02abcde", b"snapshot", 1)
    encoded = ManagementCodec(SECRET).encode_state(b"\x02abcde", b"snapshot", 1)
    for codec, reason in ((ManagementCodec(), "state_without_secret"), (ManagementCodec(b"wrong"), "bad_state_record")):
        with pytest.raises(ManagementError) as caught:
            codec.decode(encoded)
        assert caught.value.reason == reason


def test_a_state_records_clear_cid_is_authenticated() -> None:
    """The CID is the additional data: a replica cannot be moved to another session's CID."""
    codec = ManagementCodec(SECRET)
    encoded = bytearray(codec.encode_state(b"\x02abcde", b"snapshot", 1))
    encoded[3] ^= 1  # CID byte 1, what the kernel steers by
    with pytest.raises(ManagementError) as caught:
        codec.decode(bytes(encoded))
    assert caught.value.reason == "bad_state_record"


def test_state_record_key_is_not_the_mac_key() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    encoded = ManagementCodec(SECRET).encode_state(b"\x02abcde", b"snapshot", 1)
    with pytest.raises(Exception):  # noqa: B017 - InvalidTag: the MAC key does not open it
        AESGCM(derive_mac_key(SECRET)).decrypt(encoded[8:20], encoded[20:], encoded[:8])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.binary(min_size=1, max_size=80), st.data())
def test_tampered_or_truncated_state_records_are_dropped(cid: bytes, snapshot: bytes, data: st.DataObject) -> None:
    codec = ManagementCodec(SECRET)
    encoded = bytearray(codec.encode_state(cid, snapshot, 7))
    if data.draw(st.booleans()):
        del encoded[data.draw(st.integers(0, len(encoded) - 1)):]
    else:
        position = data.draw(st.integers(1, len(encoded) - 1))
        encoded[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ManagementError) as caught:
        codec.decode(bytes(encoded))
    assert caught.value.reason in ("bad_state_record", "empty", "unknown_type")
