"""Record layer and record protection: RFC 6347, RFC 9146, RFC 5246 PRF."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.record import ReadState, RecordError, ReplayWindow, WriteState


def test_prf_sha256_known_vector() -> None:
    """The widely used TLS 1.2 PRF (P_SHA256) test vector."""
    out = suites.prf(
        bytes.fromhex("9bbe436ba940f017b17652849a71db35"),
        b"test label",
        bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c"),
        100,
    )
    assert out.hex() == (
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e14baf9af"
        "0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


def test_extended_master_secret_uses_session_hash_only() -> None:
    pms, session_hash = b"p" * 48, b"h" * 32
    ems = suites.master_secret(pms, b"c" * 32, b"s" * 32, session_hash)
    assert ems == suites.prf(pms, b"extended master secret", session_hash, 48)
    assert ems == suites.master_secret(pms, b"x" * 32, b"y" * 32, session_hash)
    assert suites.master_secret(pms, b"c" * 32, b"s" * 32, None) == suites.prf(
        pms, b"master secret", b"c" * 32 + b"s" * 32, 48
    )


def test_psk_premaster_layouts() -> None:
    assert suites.psk_pre_master_secret(b"\x01\x02") == b"\x00\x02\x00\x00\x00\x02\x01\x02"
    assert suites.psk_pre_master_secret(b"\x01", b"zz") == b"\x00\x02zz\x00\x01\x01"


def _pair(name: str) -> tuple[suites.RecordProtection, suites.RecordProtection]:
    suite = suites.SUITES_BY_NAME[name]
    block = suites.key_block(b"m" * 48, b"c" * 32, b"s" * 32, suite)
    return suite.protections(block)


ALL_SUITES = sorted(suites.SUITES_BY_NAME)


@pytest.mark.parametrize("name", ALL_SUITES)
@pytest.mark.parametrize("cid", [b"", b"\x00\x01\x02\x03\x04\x05"])
def test_seal_open_round_trip_and_tamper(name: str, cid: bytes) -> None:
    client_write, _ = _pair(name)
    writer = WriteState(1, client_write, cid)
    reader = ReadState(1, client_write, cid)
    for payload in (b"", b"x", b"hello world" * 40):
        wire = writer.seal(record.APPLICATION_DATA, payload)
        (parsed,), bad = record.parse_records(wire, len(cid))
        assert not bad
        assert parsed.content_type == (record.TLS12_CID if cid else record.APPLICATION_DATA)
        assert parsed.cid == cid
        assert reader.open(parsed) == (record.APPLICATION_DATA, payload)
        assert len(wire) <= writer.overhead + len(payload)
        for position in (1, 4, len(wire) - 1):  # version, epoch/seq (in AAD), tag
            tampered = bytearray(wire)
            tampered[position] ^= 0x01
            records, _ = record.parse_records(bytes(tampered), len(cid))
            if records:
                with pytest.raises(RecordError):
                    reader.open(records[0])


def test_cid_record_matches_rfc9146_construction() -> None:
    """Rebuild a CCM-8 tls12_cid record by hand from RFC 9146 section 5.3."""
    key, salt, cid = b"k" * 16, b"saltsalt"[:4], b"\xaa\xbb\xcc"
    writer = WriteState(1, suites.AeadProtection(AESCCM(key, tag_length=8), salt, 8), cid)
    writer.next_sequence = 0x010203040506
    wire = writer.seal(record.APPLICATION_DATA, b"data")
    seq = struct.pack("!HHI", 1, 0x0102, 0x03040506)
    inner = b"data" + bytes([record.APPLICATION_DATA])
    aad = b"\xff" * 8 + b"\x19" + b"\x03" + b"\x19" + b"\xfe\xfd" + seq + cid + len(inner).to_bytes(2, "big")
    fragment = seq + AESCCM(key, tag_length=8).encrypt(salt + seq, inner, aad)
    assert wire == b"\x19\xfe\xfd" + seq + cid + len(fragment).to_bytes(2, "big") + fragment


def test_plain_aead_record_matches_rfc5246_construction() -> None:
    key, salt = b"k" * 16, b"abcd"
    writer = WriteState(1, suites.AeadProtection(AESCCM(key, tag_length=8), salt, 8))
    wire = writer.seal(record.HANDSHAKE, b"fin")
    seq = struct.pack("!HHI", 1, 0, 0)
    aad = seq + b"\x16\xfe\xfd\x00\x03"
    fragment = seq + AESCCM(key, tag_length=8).encrypt(salt + seq, b"fin", aad)
    assert wire == b"\x16\xfe\xfd" + seq + len(fragment).to_bytes(2, "big") + fragment


def test_cbc_mac_then_encrypt_layout() -> None:
    client_write, _ = _pair("TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256")
    wire = WriteState(1, client_write).seal(record.APPLICATION_DATA, b"a" * 15)
    fragment = wire[13:]
    # IV + ceil((15 + 32 + 1) / 16) blocks
    assert len(fragment) == 16 + 48


def test_cid_inner_plaintext_zero_padding_accepted() -> None:
    """A peer may pad DTLSInnerPlaintext with zeros (RFC 9146 section 4)."""
    protection, _ = _pair("TLS_PSK_WITH_AES_128_CCM_8")
    cid = b"\x01\x02"
    seq = struct.pack("!HHI", 1, 0, 7)
    inner = b"abc\x17\x00\x00\x00"
    aad = b"\xff" * 8 + b"\x19\x02\x19\xfe\xfd" + seq + cid + len(inner).to_bytes(2, "big")
    fragment = protection.seal(inner, aad, seq)
    rec = record.Record(record.TLS12_CID, record.DTLS_1_2, 1, 7, cid, fragment, seq)
    assert ReadState(1, protection, cid).open(rec) == (record.APPLICATION_DATA, b"abc")
    zero_inner = b"\x00\x00"
    aad = b"\xff" * 8 + b"\x19\x02\x19\xfe\xfd" + seq + cid + b"\x00\x02"
    rec.fragment = protection.seal(zero_inner, aad, seq)
    with pytest.raises(RecordError):
        ReadState(1, protection, cid).open(rec)


def test_several_records_per_datagram_and_truncation() -> None:
    writer = WriteState(0, None)
    wire = writer.seal(record.HANDSHAKE, b"one") + writer.seal(record.ALERT, b"\x01\x00")
    records, bad = record.parse_records(wire, 0)
    assert [(r.content_type, r.sequence_number, r.fragment) for r in records] == [
        (record.HANDSHAKE, 0, b"one"),
        (record.ALERT, 1, b"\x01\x00"),
    ]
    assert not bad
    records, bad = record.parse_records(wire[:-1], 0)
    assert len(records) == 1 and bad


def test_cid_record_without_negotiated_cid_is_malformed() -> None:
    protection, _ = _pair("TLS_PSK_WITH_AES_128_CCM_8")
    wire = WriteState(1, protection, b"\x01\x02").seal(record.APPLICATION_DATA, b"x")
    assert record.parse_records(wire, 0) == ([], True)
    assert record.peek_cid(wire, 2) == b"\x01\x02"
    assert record.peek_cid(wire, 0) is None


def test_record_without_cid_rejected_when_cid_expected() -> None:
    protection, _ = _pair("TLS_PSK_WITH_AES_128_CCM_8")
    wire = WriteState(1, protection).seal(record.APPLICATION_DATA, b"x")
    (rec,), _ = record.parse_records(wire, 2)
    with pytest.raises(RecordError):
        ReadState(1, protection, b"\x01\x02").open(rec)


def test_replay_window() -> None:
    window = ReplayWindow()
    assert not window.is_replay(0)
    window.mark(0)
    assert window.is_replay(0)
    window.mark(100)
    assert window.is_replay(36)  # 100 - 64: outside the window
    assert not window.is_replay(37)
    window.mark(37)
    assert window.is_replay(37)
    assert not window.is_replay(99)
    window.mark(2**48 - 1)
    assert window.is_replay(100) and window.highest == 2**48 - 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=300), max_size=60))
def test_replay_window_matches_reference(sequence: list[int]) -> None:
    window, seen, highest = ReplayWindow(), set(), -1
    for number in sequence:
        expected = number in seen or (highest - number >= 64)
        assert window.is_replay(number) == expected
        if not expected:
            window.mark(number)
            seen.add(number)
            highest = max(highest, number)


def test_sequence_number_exhaustion() -> None:
    writer = WriteState(0, None)
    writer.next_sequence = record.MAX_SEQUENCE
    writer.seal(record.HANDSHAKE, b"")
    with pytest.raises(RecordError):
        writer.seal(record.HANDSHAKE, b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([0, 1, 6]))
def test_parse_records_never_raises(data: bytes, cid_length: int) -> None:
    records, _ = record.parse_records(data, cid_length)
    protection, _ = _pair("TLS_PSK_WITH_AES_128_CCM_8")
    for states in (ReadState(0, None), ReadState(1, protection, b"\x00" * cid_length)):
        for rec in records:
            try:
                states.open(rec)
            except RecordError:
                pass
