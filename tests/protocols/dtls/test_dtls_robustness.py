"""Loss, reordering, duplication and the specific attacks of issue 4."""

from __future__ import annotations

import dataclasses
import random

import pytest
from dtls_pair import CLIENT_ADDRESS, Pair, psk_configs

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record
from nettester.protocols.dtls.connection import ConnectionClosed, DtlsConnection
from nettester.protocols.dtls.cookie import CookieGate, Verdict
from nettester.protocols.dtls.record import WriteState


def lossy(seed: int, loss: float = 0.3, duplicate: float = 0.2, reorder: bool = True):
    rng = random.Random(seed)

    def network(direction: str, datagrams: list[bytes]) -> list[bytes]:
        out = []
        for datagram in datagrams:
            if rng.random() < loss:
                continue
            out.append(datagram)
            if rng.random() < duplicate:
                out.append(datagram)
        if reorder:
            rng.shuffle(out)
        return out

    return network


@pytest.mark.parametrize("seed", range(40))
def test_handshake_completes_despite_loss_duplication_reordering(seed: int) -> None:
    client, server = psk_configs()
    client.mtu = server.mtu = 120  # many small fragments and records
    for config in (client, server):
        # Enough attempts that 30 % loss cannot exhaust them: the test is
        # about the retransmission machinery, not the timeout budget.
        config.max_retransmissions, config.max_retransmit_timeout, config.handshake_timeout = 30, 8.0, 1000.0
    pair = Pair(client, server, network=lossy(seed))
    pair.start()
    pair.run(limit=3000)
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    assert pair.completed("client").write_cid == pair.completed("server").read_cid


def test_retransmission_backs_off_exponentially_then_gives_up() -> None:
    client, server = psk_configs()
    client.max_retransmissions = 3
    pair = Pair(client, server, network=lambda direction, datagrams: [])
    pair.start()
    sent_at = []
    while not pair.client.is_closed:
        sent_at.append(pair.now)
        timer = pair.client.get_timer()
        assert timer is not None
        pair.now = timer
        pair.client.handle_timer(pair.now)
        pair.client.datagrams_to_send()
    assert sent_at == [0.0, 1.0, 3.0, 7.0]  # 1 s, then doubling (RFC 6347 section 4.2.4.1)
    assert pair.client.failure_reason == "handshake_timeout"


def test_lost_final_flight_is_resent_when_the_peer_retransmits() -> None:
    dropped = []

    def drop_server_finished(direction: str, datagrams: list[bytes]) -> list[bytes]:
        if direction == "s2c" and not dropped and any(d[0] == record.CHANGE_CIPHER_SPEC for d in datagrams):
            dropped.append(datagrams)
            return []
        return datagrams

    pair = Pair(*psk_configs(), network=drop_server_finished)
    pair.start()
    pair.run()
    assert dropped and pair.client.is_established and pair.server.is_established
    assert pair.now == pytest.approx(1.0)  # the client's first retransmission brought it


def established() -> Pair:
    pair = Pair(*psk_configs())
    pair.start()
    pair.run()
    assert pair.server is not None and pair.server.is_established
    return pair


def test_replayed_record_is_dropped() -> None:
    pair = established()
    pair.client.send_application_data(b"once")
    (datagram,) = pair.client.datagrams_to_send()
    pair.server.receive_datagram(datagram, CLIENT_ADDRESS, pair.now)
    pair.server.receive_datagram(datagram, CLIENT_ADDRESS, pair.now)
    pair._collect()
    assert pair.app_data("server") == [b"once"]
    assert pair.server.dropped["replay"] == 1


def test_old_epoch_and_plaintext_records_after_handshake_are_ignored() -> None:
    pair = established()
    plaintext = WriteState(0, None)
    plaintext.next_sequence = 1000
    forged = (
        plaintext.seal(record.APPLICATION_DATA, b"forged")
        + plaintext.seal(record.ALERT, b"\x02\x28")  # fatal handshake_failure, unauthenticated
        + plaintext.seal(record.HANDSHAKE, hs.encode_message(hs.CLIENT_HELLO, 9, b"x"))
    )
    pair.server.receive_datagram(forged, CLIENT_ADDRESS, pair.now)
    pair._collect()
    assert pair.server.is_established and pair.app_data("server") == []
    assert pair.server.dropped["unauthenticated_alert"] == 1


def test_tampered_record_is_dropped_and_not_answered() -> None:
    pair = established()
    pair.client.send_application_data(b"secret")
    (datagram,) = pair.client.datagrams_to_send()
    tampered = datagram[:-1] + bytes([datagram[-1] ^ 0x80])
    pair.server.receive_datagram(tampered, CLIENT_ADDRESS, pair.now)
    assert pair.server.datagrams_to_send() == []
    assert pair.server.dropped["bad_mac"] == 1 and pair.server.is_established


class LyingClient(DtlsConnection):
    """Sends a Finished whose verify_data is wrong, under valid record keys."""

    def _finished_messages(self):  # type: ignore[no-untyped-def]
        ccs, finished = super()._finished_messages()
        return [ccs, dataclasses.replace(finished, body=bytes(b ^ 1 for b in finished.body))]


def test_wrong_finished_is_a_decrypt_error() -> None:
    client_config, server_config = psk_configs()
    pair = Pair(client_config, server_config)
    pair.client = LyingClient(client_config, pair.client.peer_address)
    pair.start()
    pair.run()
    assert pair.server.failure_reason == "bad_finished"
    (closed,) = [e for e in pair.client_events if isinstance(e, ConnectionClosed)]
    assert closed.by_peer and closed.alert == 51


def test_renegotiation_is_refused() -> None:
    pair = established()
    writer = pair.client._write_states[1]
    next_seq = pair.server._reassembler.next_seq
    hello = writer.seal(record.HANDSHAKE, hs.encode_message(hs.CLIENT_HELLO, next_seq, b"\x00" * 40))
    pair.server.receive_datagram(hello, CLIENT_ADDRESS, pair.now)
    (alert,) = pair.server.datagrams_to_send()
    records, _ = record.parse_records(alert, 6)
    assert pair.client._read_states[1].open(records[0]) == (record.ALERT, b"\x01\x64")  # warning no_renegotiation
    assert pair.server.is_established


def test_client_hello_flood_without_cookie_creates_no_state() -> None:
    client, _ = psk_configs()
    connection = DtlsConnection(client, ("192.0.2.2", 5684))
    connection.connect(0.0)
    (hello,) = connection.datagrams_to_send()
    gate = CookieGate()
    verdicts = {gate.check(hello, ("198.51.100.%d" % (i % 250), 1000 + i), 0.0).verdict for i in range(500)}
    assert verdicts == {Verdict.VERIFY}


def test_cookie_is_bound_to_address_and_rotates() -> None:
    client, _ = psk_configs()
    connection = DtlsConnection(client, ("192.0.2.2", 5684))
    connection.connect(0.0)
    (hello,) = connection.datagrams_to_send()
    gate = CookieGate(rotation=10.0)
    reply = gate.check(hello, CLIENT_ADDRESS, 0.0).reply
    connection.receive_datagram(reply, None, 0.0)
    (hello_with_cookie,) = connection.datagrams_to_send()
    assert gate.check(hello_with_cookie, CLIENT_ADDRESS, 5.0).verdict is Verdict.ACCEPT
    assert gate.check(hello_with_cookie, ("192.0.2.99", 5684), 5.0).verdict is Verdict.VERIFY
    assert gate.check(hello_with_cookie, CLIENT_ADDRESS, 12.0).verdict is Verdict.ACCEPT  # previous secret
    assert gate.check(hello_with_cookie, CLIENT_ADDRESS, 23.0).verdict is Verdict.VERIFY  # two rotations later


def test_truncated_and_oversized_fragments() -> None:
    with pytest.raises(hs.DecodeError):
        hs.parse_fragments(hs.encode_header(hs.CLIENT_HELLO, 10, 0, 5, 10) + b"x" * 10)  # beyond its message
    with pytest.raises(hs.DecodeError):
        hs.parse_fragments(hs.encode_header(hs.CLIENT_HELLO, 10, 0, 0, 10) + b"x" * 5)  # truncated
    reassembler = hs.Reassembler(max_message_length=1000)
    (huge,) = hs.parse_fragments(hs.encode_header(hs.CERTIFICATE, 2**24 - 1, 0, 0, 4) + b"abcd")
    assert reassembler.add(huge, 0) == "rejected"
    (first,) = hs.parse_fragments(hs.encode_header(hs.CERTIFICATE, 8, 0, 0, 4) + b"abcd")
    (conflicting,) = hs.parse_fragments(hs.encode_header(hs.CERTIFICATE, 9, 0, 4, 4) + b"efgh")
    assert reassembler.add(first, 0) == "new" and reassembler.add(conflicting, 0) == "rejected"
    assert reassembler.pop() is None
    (rest,) = hs.parse_fragments(hs.encode_header(hs.CERTIFICATE, 8, 0, 4, 4) + b"efgh")
    assert reassembler.add(rest, 0) == "new"
    assert reassembler.pop() == (hs.CERTIFICATE, 0, 0, b"abcdefgh")
    (far_future,) = hs.parse_fragments(hs.encode_message(hs.FINISHED, 50, b"x"))
    assert reassembler.add(far_future, 0) == "rejected"
    # All partial messages together stay within the budget.
    budget = hs.Reassembler(max_message_length=1000)
    (first_half,) = hs.parse_fragments(hs.encode_header(hs.CERTIFICATE, 600, 0, 0, 4) + b"abcd")
    (second,) = hs.parse_fragments(hs.encode_header(hs.CLIENT_KEY_EXCHANGE, 600, 1, 0, 4) + b"abcd")
    assert budget.add(first_half, 0) == "new" and budget.add(second, 0) == "rejected"


def test_oversized_fragment_mid_handshake_is_counted() -> None:
    pair = Pair(*psk_configs())
    pair.network = lambda direction, datagrams: [] if direction == "s2c" and pair.server is not None else datagrams
    pair.start()
    pair.pump()
    assert pair.server is not None and not pair.server.is_established
    plaintext = WriteState(0, None)
    plaintext.next_sequence = 500
    huge = plaintext.seal(record.HANDSHAKE, hs.encode_header(hs.CLIENT_KEY_EXCHANGE, 2**24 - 1, 2, 0, 4) + b"abcd")
    pair.server.receive_datagram(huge, CLIENT_ADDRESS, pair.now)
    assert pair.server.dropped["fragment"] == 1 and not pair.server.is_closed


class Broken(DtlsConnection):
    """A server whose handshake logic has a bug."""

    def _dispatch(self, *args: object) -> None:  # type: ignore[override]
        raise KeyError("bug")


def hello_with_cookie(client_record_number: int = 0) -> tuple[DtlsConnection, bytes]:
    """A client and its second ClientHello, which passes the cookie gate."""
    client_config, _ = psk_configs()
    client = DtlsConnection(client_config, ("192.0.2.2", 5684))
    client.connect(0.0)
    (hello,) = client.datagrams_to_send()
    gate = CookieGate()
    client._write_states[0].next_sequence = client_record_number or client._write_states[0].next_sequence
    client.receive_datagram(gate.check(hello, CLIENT_ADDRESS, 0.0).reply, None, 0.0)
    (hello,) = client.datagrams_to_send()
    assert gate.check(hello, CLIENT_ADDRESS, 0.0).verdict is Verdict.ACCEPT
    return client, hello


def test_a_bug_ends_only_its_association_with_internal_error() -> None:
    client, hello = hello_with_cookie()
    server = Broken(psk_configs()[1], CLIENT_ADDRESS)
    server.receive_datagram(hello, CLIENT_ADDRESS, 0.0)
    assert server.is_closed and server.failure_reason == "internal_error:KeyError"
    for datagram in server.datagrams_to_send():
        client.receive_datagram(datagram, None, 0.0)
    # issue 13: failure reasons are alert names, never alert_80
    assert client.next_event() == ConnectionClosed(
        80, "internal_error", by_peer=True, detail="the server rejected the handshake: internal_error"
    )


def test_hostile_client_hello_record_number_is_not_adopted() -> None:
    _, hello = hello_with_cookie(client_record_number=2**48 - 2)
    server = DtlsConnection(psk_configs()[1], CLIENT_ADDRESS)
    server.receive_datagram(hello, CLIENT_ADDRESS, 0.0)
    assert server.datagrams_to_send() and not server.is_closed
    assert server._write_states[0].next_sequence < 2**16


def test_plaintext_fatal_alert_ends_a_handshake_by_design() -> None:
    """Before keys exist a peer can only alert in plaintext (RFC 5246
    section 7.2): honoured during the handshake, ignored after it."""
    client, hello = hello_with_cookie()
    server = DtlsConnection(psk_configs()[1], CLIENT_ADDRESS)
    server.receive_datagram(hello, CLIENT_ADDRESS, 0.0)
    server.receive_datagram(WriteState(0, None).seal(record.ALERT, b"\x02\x28"), CLIENT_ADDRESS, 0.0)
    assert server.is_closed and server.failure_reason == "handshake_failure"  # issue 13: never alert_40


def test_application_data_overtaking_finished_is_delivered_after_it() -> None:
    """Resumption: the client's first request may overtake its Finished
    (here the Finished datagram is held back and delivered last)."""
    from nettester.protocols.dtls.connection import ApplicationData, HandshakeCompleted, SessionCache

    client_config, server_config = psk_configs()
    server_config.session_cache = SessionCache()
    first = Pair(client_config, server_config)
    first.start()
    first.run()
    session = first.completed("client").session
    pair = Pair(psk_configs(session=session)[0], server_config)
    held: list[bytes] = []

    def hold_client_finished(direction: str, datagrams: list[bytes]) -> list[bytes]:
        if direction == "c2s" and not held and pair.client.is_established:
            held.extend(datagrams)
            pair.client.send_application_data(b"early request")
            return []
        return datagrams

    pair.network = hold_client_finished
    pair.start()
    pair.pump()
    assert held and pair.server is not None and not pair.server.is_established
    for datagram in reversed(held + pair.client.datagrams_to_send()):  # data first, then CCS + Finished
        pair.server.receive_datagram(datagram, CLIENT_ADDRESS, pair.now)
    pair._collect()
    kinds = [type(event) for event in pair.server_events]
    assert kinds == [HandshakeCompleted, ApplicationData]
    assert pair.app_data("server") == [b"early request"]
