"""Hostile input: every parser and the engine as a whole, with hypothesis.

Parsers raise their one documented exception (DecodeError, RecordError) or
nothing; the engine never raises, stays consistent, and a valid peer still
completes its handshake around the garbage.
"""

from __future__ import annotations

from dtls_pair import CLIENT_ADDRESS, SERVER_ADDRESS, Pair, psk_configs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record
from nettester.protocols.dtls.cookie import CookieGate, Verdict
from nettester.protocols.dtls.credentials import CredentialsError, PskStore

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_decode_error(function, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        function(*args)
    except hs.DecodeError:
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_handshake_message_decoders(body: bytes) -> None:
    decodes_or_decode_error(hs.ClientHello.decode, body)
    decodes_or_decode_error(hs.ServerHello.decode, body)
    decodes_or_decode_error(hs.decode_hello_verify_request, body)
    decodes_or_decode_error(hs.decode_certificate, body)
    decodes_or_decode_error(hs.CertificateRequest.decode, body)
    decodes_or_decode_error(hs.decode_digitally_signed, body)
    for psk in (False, True):
        for ecdhe in (False, True):
            decodes_or_decode_error(hs.ClientKeyExchange.decode, body, psk, ecdhe)
            for signed in (False, True):
                decodes_or_decode_error(hs.ServerKeyExchange.decode, body, psk, ecdhe, signed)
    decodes_or_decode_error(hs.parse_fragments, body)


@FUZZ
@given(st.binary(max_size=100))
def test_extension_decoders(body: bytes) -> None:
    decodes_or_decode_error(hs.uint16_list, body)
    decodes_or_decode_error(hs.decode_server_name, body)
    decodes_or_decode_error(hs.decode_single_vector, body, 1)
    decodes_or_decode_error(hs.decode_extensions, hs.Reader(body))


def _valid_client_hello() -> bytes:
    pair = Pair(*psk_configs())
    pair.start()
    (datagram,) = pair.client.datagrams_to_send()
    return datagram


VALID_HELLO = _valid_client_hello()


@FUZZ
@given(st.data())
def test_client_hello_roundtrip_and_mutations(data: st.DataObject) -> None:
    (rec,), _ = record.parse_records(VALID_HELLO, 0)
    (fragment,) = hs.parse_fragments(rec.fragment)
    hello = hs.ClientHello.decode(fragment.body)
    assert hs.ClientHello.decode(hello.encode()) == hello
    mutated = bytearray(fragment.body)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        mutated[position] = data.draw(st.integers(0, 255))
    decodes_or_decode_error(hs.ClientHello.decode, bytes(mutated))


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**16 - 1))
def test_cookie_gate_never_raises(datagram: bytes, port: int) -> None:
    result = CookieGate().check(datagram, ("203.0.113.7", port), 0.0)
    assert result.verdict in (Verdict.DROP, Verdict.VERIFY)
    if result.verdict is Verdict.VERIFY:
        assert len(result.reply) <= len(datagram)  # never an amplifier


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=5))
def test_psk_file_lines(lines: list[str]) -> None:
    try:
        store = PskStore.from_lines(lines)
    except CredentialsError:
        return
    assert all(secret for secret in store.secrets.values())


def _garbage() -> st.SearchStrategy[bytes]:
    """Random bytes, and random bytes behind plausible DTLS record headers."""
    header = st.tuples(st.sampled_from([20, 21, 22, 23, 25]), st.sampled_from([0, 1, 2]), st.integers(0, 2**16)).map(
        lambda t: bytes([t[0], 0xFE, 0xFD]) + t[1].to_bytes(2, "big") + t[2].to_bytes(6, "big")
    )
    body = st.binary(max_size=120)
    framed = st.tuples(header, body).map(lambda hb: hb[0] + len(hb[1]).to_bytes(2, "big") + hb[1])
    return st.one_of(st.binary(max_size=150), framed)


def _is_plaintext_alert(datagram: bytes) -> bool:
    """An epoch-0 alert record: it ends a handshake by design (RFC 5246
    section 7.2; before keys exist alerts can only be plaintext)."""
    return datagram[:1] == b"\x15" and datagram[3:5] == b"\x00\x00"


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 6), _garbage().filter(lambda d: not _is_plaintext_alert(d))), max_size=8))
def test_engine_survives_garbage_mid_handshake(injections: list[tuple[int, bytes]]) -> None:
    """Garbage into both sides at random points of a handshake: nothing
    escapes, and the genuine handshake still completes."""
    pair = Pair(*psk_configs())
    pair.start()
    steps = 0
    original_network = pair.network

    def network(direction: str, datagrams: list[bytes]) -> list[bytes]:
        nonlocal steps
        steps += 1
        garbage = [g for step, g in injections if step == steps]
        return garbage + original_network(direction, datagrams)

    pair.network = network
    pair.run()
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    pair.client.send_application_data(b"still fine")
    pair.pump()
    assert pair.app_data("server") == [b"still fine"]


@FUZZ
@given(st.lists(_garbage(), max_size=10))
def test_established_engine_ignores_garbage(garbage: list[bytes]) -> None:
    pair = Pair(*psk_configs())
    pair.start()
    pair.run()
    for datagram in garbage:
        pair.server.receive_datagram(datagram, CLIENT_ADDRESS, pair.now)
        pair.client.receive_datagram(datagram, SERVER_ADDRESS, pair.now)
    pair._collect()
    assert pair.server.is_established and pair.client.is_established
    assert pair.app_data("server") == [] and pair.app_data("client") == []
    assert pair.server.peer_address == CLIENT_ADDRESS  # unauthenticated records never move a peer
    pair.server.send_application_data(b"ok")
    pair.pump()
    assert pair.app_data("client") == [b"ok"]


@FUZZ
@given(st.data())
def test_engine_survives_bit_flips_of_genuine_traffic(data: st.DataObject) -> None:
    """Flip bytes in genuine datagrams (copies are delivered too): every
    outcome is an orderly one, never an exception."""
    pair = Pair(*psk_configs())

    def network(direction: str, datagrams: list[bytes]) -> list[bytes]:
        out = list(datagrams)
        for datagram in datagrams:
            if data.draw(st.booleans()):
                mutated = bytearray(datagram)
                position = data.draw(st.integers(0, len(mutated) - 1))
                mutated[position] ^= data.draw(st.integers(1, 255))
                out.insert(0, bytes(mutated))
        return out

    pair.network = network
    pair.start()
    pair.run()
    for connection in (pair.client, pair.server):
        if connection is not None:
            assert connection.is_established or connection.is_closed or connection.get_timer() is not None
