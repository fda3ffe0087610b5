"""Engine to engine: loss recovery (RFC 6347 section 4.2.4), renegotiation
refused (RFC 5746), and a strict ClientHello after the cookie (issue 13)."""

from __future__ import annotations

import dataclasses

import pytest
from dtls_pair import CLIENT_ADDRESS, Pair, psk_configs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record
from nettester.protocols.dtls.alerts import DECODE_ERROR, FATAL, ILLEGAL_PARAMETER, NO_RENEGOTIATION, WARNING
from nettester.protocols.dtls.connection import ConnectionClosed, DtlsConnection, RenegotiationRefused
from nettester.protocols.dtls.cookie import CookieGate, Verdict


def established() -> Pair:
    pair = Pair(*psk_configs())
    pair.start()
    pair.run()
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    return pair


# --- loss recovery -------------------------------------------------------------


def drop_once(direction: str, index: int) -> tuple[list[int], object]:
    """A network losing the ``index``-th datagram (0-based) sent in ``direction``."""
    count = [0]

    def network(went: str, datagrams: list[bytes]) -> list[bytes]:
        kept = []
        for datagram in datagrams:
            if went == direction:
                count[0] += 1
                if count[0] - 1 == index:
                    continue
            kept.append(datagram)
        return kept

    return count, network


def test_client_keeps_its_timer_until_the_whole_server_flight_arrived() -> None:
    """The ServerHello arrives, the ServerHelloDone is lost.  The client's
    timer (1 s) resends the ClientHello and the server answers at once, long
    before the server's own timer (10 s) would."""
    client, server = psk_configs()
    server.mtu = 100  # ServerHello and ServerHelloDone in separate datagrams
    server.initial_retransmit_timeout = 10.0
    _, network = drop_once("s2c", 2)  # 0: HelloVerifyRequest, 1: ServerHello, 2: ServerHelloDone
    pair = Pair(client, server, network)  # type: ignore[arg-type]
    pair.start()
    pair.run()
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    assert pair.now == 1.0, "recovered by the client's first retransmission"


def test_a_retransmitted_flight_is_answered_at_once() -> None:
    """The server's flight 4 is lost; the client resends its ClientHello
    after 0.3 s, well within half the server's 1 s timer: answered at once."""
    client, server = psk_configs(initial_retransmit_timeout=0.3)
    _, network = drop_once("s2c", 1)
    pair = Pair(client, server, network)  # type: ignore[arg-type]
    pair.start()
    pair.run()
    assert pair.server is not None and pair.server.is_established
    assert pair.now == pytest.approx(0.3)


def test_answers_to_a_retransmitted_flight_are_rate_limited() -> None:
    """Many copies of the peer's previous flight at one instant get one answer."""
    pair = Pair(*psk_configs())
    pair.start()
    pair.pump(rounds=1)  # ClientHello, HelloVerifyRequest
    pair.pump(rounds=1)  # ClientHello with cookie, the server's flight 4 (kept by nobody)
    assert pair.server is not None
    hello = [d for direction, d in pair.wire if direction == "c2s"][-1]
    pair.server.datagrams_to_send()
    for _ in range(10):
        pair.server.receive_datagram(hello, CLIENT_ADDRESS, pair.now + 0.01)
    assert len(pair.server.datagrams_to_send()) == 1
    pair.server.receive_datagram(hello, CLIENT_ADDRESS, pair.now + 0.5)
    assert len(pair.server.datagrams_to_send()) == 1, "a later copy is answered again"


def test_a_copy_of_the_flight_being_received_triggers_no_resend() -> None:
    """A second copy of the ServerHello (the flight we wait for, not the one
    before it) is no sign our ClientHello was lost: nothing is resent."""
    client, server = psk_configs()
    server.mtu = 100  # ServerHello and ServerHelloDone in separate datagrams
    pair = Pair(client, server, lambda direction, datagrams: [] if direction == "s2c" and pair.server else datagrams)
    pair.start()
    pair.pump(rounds=2)
    assert pair.server is not None
    pair.network = lambda direction, datagrams: datagrams
    server_hello = [d for direction, d in pair.wire if direction == "s2c"][1]
    pair.client.receive_datagram(server_hello, None, pair.now)
    pair.client.receive_datagram(server_hello, None, pair.now)
    assert pair.client.datagrams_to_send() == []


# --- renegotiation ---------------------------------------------------------------


def test_renegotiation_is_refused_with_a_warning_and_the_session_goes_on() -> None:
    """An encrypted ClientHello on an established session (message_seq 0,
    RFC 6347 section 4.2.2) gets a no_renegotiation warning (RFC 5246 section
    7.2.2, RFC 5746); it is not taken for an old retransmission."""
    pair = established()
    assert pair.server is not None and pair.client._client_hello is not None
    body = dataclasses.replace(pair.client._client_hello, cookie=b"").encode()
    writer = pair.client._write_states[pair.client._write_epoch]
    renegotiate = writer.seal(record.HANDSHAKE, hs.encode_message(hs.CLIENT_HELLO, 0, body))
    pair.server.receive_datagram(renegotiate, CLIENT_ADDRESS, pair.now)
    (alert,) = pair.server.datagrams_to_send()
    client_reader = pair.client._read_states[pair.client._read_epoch]
    (received,), _ = record.parse_records(alert, len(client_reader.cid))
    # the warning, encrypted under the session's keys
    assert client_reader.open(received) == (record.ALERT, bytes((WARNING, NO_RENEGOTIATION)))
    assert pair.server.next_event() == RenegotiationRefused()
    assert pair.server.is_established and pair.client.is_established
    pair.client.send_application_data(b"after")
    pair.pump()
    pair._collect()
    assert pair.app_data("server")[-1] == b"after"


def test_hello_request_is_refused_by_the_client() -> None:
    pair = established()
    assert pair.server is not None
    writer = pair.server._write_states[pair.server._write_epoch]
    pair.client.receive_datagram(
        writer.seal(record.HANDSHAKE, hs.encode_message(hs.HELLO_REQUEST, 0, b"")), None, pair.now
    )
    (alert,) = pair.client.datagrams_to_send()
    server_reader = pair.server._read_states[pair.server._read_epoch]
    (received,), _ = record.parse_records(alert, len(server_reader.cid))
    assert server_reader.open(received) == (record.ALERT, bytes((WARNING, NO_RENEGOTIATION)))
    assert pair.client.next_event() == RenegotiationRefused() and pair.client.is_established


# --- a strict ClientHello after a valid cookie -------------------------------------------


def _extension(extension_type: int, body: bytes) -> bytes:
    return extension_type.to_bytes(2, "big") + hs.vector(2, body)


def _hello_body(extensions: bytes) -> bytes:
    """A PSK ClientHello whose extension block is ``extensions`` (raw)."""
    client, _ = psk_configs()
    connection = DtlsConnection(client, ("192.0.2.2", 5684))
    connection.connect(0.0)
    assert connection._client_hello is not None
    hello = dataclasses.replace(connection._client_hello, extensions={})
    return hello.encode() + hs.vector(2, extensions)


def _server_answer(body: bytes) -> tuple[DtlsConnection, list[bytes]]:
    """A server connection given ``body`` with a valid cookie, and its answer."""
    gate = CookieGate()
    plain = record.encode_plaintext_record(
        record.HANDSHAKE, record.DTLS_1_2, 0, 0, hs.encode_message(hs.CLIENT_HELLO, 0, body)
    )
    verify = gate.check(plain, CLIENT_ADDRESS, 0.0)
    assert verify.verdict is Verdict.VERIFY, "the gate lets the connection judge the extensions"
    (reply,), _ = record.parse_records(verify.reply, 0)
    cookie = hs.decode_hello_verify_request(hs.parse_fragments(reply.fragment)[0].body)
    hello = hs.ClientHello.decode(body, strict=False)
    split = 2 + 32 + 1 + len(hello.session_id)
    with_cookie = body[:split] + hs.vector(1, cookie) + body[split + 1 :]
    result = gate.judge(with_cookie, 1, 1, CLIENT_ADDRESS, 0.0)
    assert result.verdict is Verdict.ACCEPT
    _, server_config = psk_configs()
    server = DtlsConnection(server_config, CLIENT_ADDRESS)
    server.receive_datagram(result.datagram, CLIENT_ADDRESS, 0.0)
    return server, server.datagrams_to_send()


def _alert_of(datagrams: list[bytes]) -> bytes:
    (datagram,) = datagrams
    (received,), _ = record.parse_records(datagram, 0)
    assert received.content_type == record.ALERT
    return received.fragment


EMS = _extension(hs.EXT_EXTENDED_MASTER_SECRET, b"")
RENEGOTIATION = _extension(hs.EXT_RENEGOTIATION_INFO, b"\x00")


@pytest.mark.parametrize(
    "name,extensions,alert",
    [
        ("ems_with_body", _extension(hs.EXT_EXTENDED_MASTER_SECRET, b"\x00") + RENEGOTIATION, DECODE_ERROR),
        ("duplicate_extension", EMS + RENEGOTIATION + EMS, ILLEGAL_PARAMETER),
        ("cid_bad_inner_length", EMS + _extension(hs.EXT_CONNECTION_ID, b"\x05ab"), DECODE_ERROR),
    ],
)
def test_bad_client_hello_after_the_cookie_gets_a_fatal_alert(name: str, extensions: bytes, alert: int) -> None:
    server, answer = _server_answer(_hello_body(extensions))
    assert _alert_of(answer) == bytes((FATAL, alert)), name
    assert server.is_closed
    event = server.next_event()
    assert isinstance(event, ConnectionClosed) and event.alert == alert and not event.by_peer


FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([0, 10, 11, 13, 23, 54, 0xFF01, 0x1234]), st.binary(max_size=12)), max_size=6))
@example([(23, b"\x00")]).via("ems_with_body")
@example([(23, b""), (0xFF01, b"\x00"), (23, b"")]).via("duplicate_extension")
@example([(23, b""), (54, b"\x05ab")]).via("cid_bad_inner_length")
def test_any_client_hello_after_the_cookie_is_answered_or_alerted(extensions: list[tuple[int, bytes]]) -> None:
    """Whatever extensions a ClientHello with a valid cookie carries, the
    server answers with its flight or ends with a fatal alert: never silence,
    never an exception."""
    server, answer = _server_answer(_hello_body(b"".join(_extension(t, b) for t, b in extensions)))
    assert answer, "never silence"
    if server.is_closed:
        assert _alert_of(answer)[0] == FATAL
    else:
        records, _ = record.parse_records(answer[0], 0)
        assert records[0].content_type == record.HANDSHAKE
