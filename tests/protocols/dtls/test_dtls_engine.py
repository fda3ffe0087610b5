"""Engine to engine: both roles of DtlsConnection against each other."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from dtls_pair import PSK, PSK_IDENTITY, Pair, fake_clock_time, psk_configs

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record
from nettester.protocols.dtls.certificates import issue, make_ca
from nettester.protocols.dtls.connection import (
    ClientAuth,
    ConnectionClosed,
    DtlsConfiguration,
    SessionCache,
)
from nettester.protocols.dtls.credentials import PskStore


def established_pair(**client_overrides: object) -> Pair:
    pair = Pair(*psk_configs(**client_overrides))
    pair.start()
    pair.run()
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    assert pair.now == 0.0  # no retransmission was needed on a perfect network
    return pair


def test_psk_ccm8_handshake_with_cookie_and_cid() -> None:
    pair = established_pair()
    assert pair.hello_verify_requests == 1
    client, server = pair.completed("client"), pair.completed("server")
    assert client.cipher_suite == server.cipher_suite == "TLS_PSK_WITH_AES_128_CCM_8"
    assert server.peer_identity == PSK_IDENTITY.decode()
    assert client.write_cid == server.read_cid and server.read_cid[0] == 0 and len(server.read_cid) == 6
    assert client.read_cid == server.write_cid and len(client.read_cid) == 6
    # Every record after the handshake is a tls12_cid record.
    pair.client.send_application_data(b"ping")
    datagram = [d for d, _ in pair.client.datagrams_to_send()][0]
    assert datagram[0] == record.TLS12_CID and datagram[11:17] == server.read_cid
    pair.server.receive_datagram(datagram, pair.client_address, pair.now)
    pair._collect()
    assert pair.app_data("server") == [b"ping"]
    assert pair.wire and pair.now == 0.0


def test_finished_records_are_cid_records() -> None:
    pair = established_pair()
    finished_datagrams = [d for direction, d in pair.wire if direction == "s2c"][-1]
    records, _ = record.parse_records(finished_datagrams, 6)
    assert [r.content_type for r in records] == [record.CHANGE_CIPHER_SPEC, record.TLS12_CID]


@pytest.mark.parametrize(
    "suite", ["TLS_PSK_WITH_AES_128_CCM_8", "TLS_PSK_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256"]
)
@pytest.mark.parametrize("cid_length", [None, 0, 4])
def test_psk_suites_and_cid_variants(suite: str, cid_length: int | None) -> None:
    pair = established_pair(cipher_suites=(suite,), cid_length=cid_length)
    completed = pair.completed("client")
    assert completed.cipher_suite == suite
    if cid_length is None:
        assert completed.read_cid is None and completed.write_cid is None
    else:
        assert completed.read_cid == pair.completed("server").write_cid and len(completed.read_cid) == cid_length
    pair.server.send_application_data(b"x" * 1000)
    pair.client.send_application_data(b"hello")
    pair.pump()
    assert pair.app_data("client") == [b"x" * 1000]
    assert pair.app_data("server") == [b"hello"]


def ecdsa_configs(
    client_auth: ClientAuth = ClientAuth.NONE,
    suite: str = "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    client_cert: bool = True,
):
    ca = make_ca()
    server_identity = issue(ca, "server.example", ("server.example",))
    client_identity = issue(ca, "client-1")
    client = DtlsConfiguration(
        is_client=True,
        cipher_suites=(suite,),
        trust_anchors=[ca.certificate],
        certificate_time=fake_clock_time,
        server_name="server.example",
        certificate_chain=client_identity.full_chain() if client_cert else [],
        private_key=client_identity.private_key if client_cert else None,
    )
    server = DtlsConfiguration(
        is_client=False,
        certificate_chain=server_identity.full_chain(),
        private_key=server_identity.private_key,
        trust_anchors=[ca.certificate],
        certificate_time=fake_clock_time,
        client_auth=client_auth,
    )
    from nettester.protocols.dtls.cid import NodeConnectionIdGenerator

    server.cid_generator = NodeConnectionIdGenerator(6, 3)
    return client, server


@pytest.mark.parametrize("suite", ["TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"])
def test_ecdhe_ecdsa_with_verification(suite: str) -> None:
    pair = Pair(*ecdsa_configs(suite=suite))
    pair.start()
    pair.run()
    assert pair.now == 0.0
    completed = pair.completed("client")
    assert completed.cipher_suite == suite
    assert completed.peer_identity == "CN=server.example"
    assert completed.write_cid[0] == 3
    assert pair.completed("server").peer_identity is None


def test_certificate_flight_is_fragmented_to_mtu() -> None:
    client, server = ecdsa_configs()
    server.mtu = client.mtu = 300
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.now == 0.0
    assert pair.client.is_established
    assert max(len(d) for _, d in pair.wire) <= 300


@pytest.mark.parametrize("client_auth", [ClientAuth.WANTED, ClientAuth.NEEDED])
def test_client_authentication(client_auth: ClientAuth) -> None:
    pair = Pair(*ecdsa_configs(client_auth))
    pair.start()
    pair.run()
    assert pair.now == 0.0
    assert pair.completed("server").peer_identity == "CN=client-1"


def test_client_authentication_needed_without_certificate_fails() -> None:
    pair = Pair(*ecdsa_configs(ClientAuth.NEEDED, client_cert=False))
    pair.start()
    pair.run()
    assert pair.server.is_closed and pair.server.failure_reason == "client_certificate_required"
    assert pair.client.is_closed
    (closed,) = [e for e in pair.client_events if isinstance(e, ConnectionClosed)]
    assert closed.by_peer and closed.alert == 40


def test_client_authentication_wanted_without_certificate() -> None:
    pair = Pair(*ecdsa_configs(ClientAuth.WANTED, client_cert=False))
    pair.start()
    pair.run()
    assert pair.now == 0.0
    assert pair.server.is_established and pair.completed("server").peer_identity is None


def test_untrusted_server_certificate_is_rejected() -> None:
    client, server = ecdsa_configs()
    client.trust_anchors = [make_ca("other CA").certificate]
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.client.is_closed and pair.client.failure_reason == "certificate_rejected"


def test_expired_server_certificate_is_rejected() -> None:
    import datetime

    client, server = ecdsa_configs()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    client.certificate_time = lambda now: later
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.client.failure_reason == "certificate_rejected"


def test_wrong_server_name_is_rejected() -> None:
    client, server = ecdsa_configs()
    client.server_name = "other.example"
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.client.failure_reason == "certificate_rejected"


def test_wrong_psk_is_a_fatal_alert_at_once() -> None:
    """Issue 13: a Finished that does not decrypt ends the handshake with
    bad_record_mac at once, naming the identity, instead of 120 s of silence."""
    client, server = psk_configs(psk=b"wrong")
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.now == 0.0, "no timer was needed"
    assert pair.server.is_closed and pair.server.failure_reason == "bad_record_mac"
    assert pair.server.dropped["bad_mac"] >= 1
    (server_closed,) = [e for e in pair.server_events if isinstance(e, ConnectionClosed)]
    assert server_closed.description == 'wrong key for PSK identity "Client_identity"'
    (client_closed,) = [e for e in pair.client_events if isinstance(e, ConnectionClosed)]
    assert client_closed.by_peer and client_closed.alert == 20 and client_closed.reason == "bad_record_mac"
    assert client_closed.description == "the server rejected the handshake: bad_record_mac"


def test_one_forged_record_after_the_ccs_does_not_end_a_handshake() -> None:
    """A lone record of the new epoch that does not decrypt, in its own
    datagram, is dropped: only the peer's own Finished failing (in the CCS
    datagram, or twice) means a wrong key."""
    pair = Pair(*psk_configs())
    pair.start()
    forged = bytes([record.HANDSHAKE]) + b"\xfe\xfd\x00\x01" + bytes(6) + (40).to_bytes(2, "big") + bytes(40)

    def network(direction: str, datagrams: list[bytes]) -> list[bytes]:
        out = []
        for datagram in datagrams:
            offsets, offset = [], 0
            while offset < len(datagram):
                received, offset = record.parse_record(datagram, offset, 6)
                offsets.append((received.content_type if received else None, offset))
            if direction == "c2s" and len(offsets) > 1 and offsets[-2][0] == record.CHANGE_CIPHER_SPEC:
                # up to the CCS, then the forged record, then the genuine Finished
                split = offsets[-2][1]
                out += [datagram[:split], forged, datagram[split:]]
            else:
                out.append(datagram)
        return out

    pair.network = network
    pair.run()
    assert pair.server.is_established and pair.client.is_established
    assert pair.server.dropped["bad_mac"] == 1  # the forged record reached the server in wait_finished


def test_unknown_psk_identity_is_a_fatal_alert() -> None:
    pair = Pair(*psk_configs(psk_identity=b"nobody"))
    pair.start()
    pair.run()
    assert pair.server.failure_reason == "unknown_psk_identity"
    assert pair.client.is_closed


def test_session_resumption() -> None:
    client, server = psk_configs()
    server.session_cache = SessionCache()
    first = Pair(client, server)
    first.start()
    first.run()
    session = first.completed("client").session
    assert session is not None and len(server.session_cache) == 1
    resumed_client, _ = psk_configs(session=session)
    second = Pair(resumed_client, server)
    second.start()
    second.run()
    completed = second.completed("client")
    assert completed.resumed and second.completed("server").resumed
    assert second.now == 0.0  # the CID'd Finished shares the ServerHello's datagram: parsed record by record
    assert completed.session_id == session.session_id
    assert second.completed("server").peer_identity == PSK_IDENTITY.decode()
    second.client.send_application_data(b"again")
    second.pump()
    assert second.app_data("server") == [b"again"]


def test_resumption_with_unknown_session_falls_back_to_full_handshake() -> None:
    client, server = psk_configs()
    server.session_cache = SessionCache()
    first = Pair(client, server)
    first.start()
    first.run()
    session = first.completed("client").session
    other_server = psk_configs()[1]
    other_server.session_cache = SessionCache()
    second = Pair(psk_configs(session=session)[0], other_server)
    second.start()
    second.run()
    assert not second.completed("client").resumed and second.client.is_established


def start_with_modified_hello(pair: Pair, modify: Callable[[dict[int, bytes]], None]) -> None:
    """Start the client, then replace its first ClientHello by one whose
    extensions ``modify`` changed (what another implementation might send)."""
    pair.start()
    assert pair.client._client_hello is not None
    modify(pair.client._client_hello.extensions)
    pair.client._outgoing.clear()
    pair.client._next_send_seq = 0
    pair.client._send_client_hello(pair.now)


def test_extended_master_secret_required_by_default() -> None:
    client, server = psk_configs()
    client.require_extended_master_secret = False
    pair = Pair(client, server)
    start_with_modified_hello(pair, lambda extensions: extensions.pop(23))
    pair.run()
    assert pair.server.failure_reason == "no_extended_master_secret"


def test_ecdsa_needs_the_certificate_curve_among_the_client_groups() -> None:
    """RFC 8422 section 5.1: a client offering only x25519 cannot use our P-256 certificate."""
    pair = Pair(*ecdsa_configs())
    start_with_modified_hello(pair, lambda extensions: extensions.update({10: hs.encode_uint16_list([29])}))
    pair.run()
    assert pair.server.failure_reason == "no_common_cipher_suite"


def test_close_notify_both_ways() -> None:
    pair = established_pair()
    pair.client.close()
    pair.pump()
    (closed,) = [e for e in pair.server_events if isinstance(e, ConnectionClosed)]
    assert closed.by_peer and closed.alert == 0
    assert pair.server.is_closed and pair.client.is_closed
    with pytest.raises(RuntimeError):
        pair.client.send_application_data(b"late")


def test_no_common_suite_is_a_handshake_failure() -> None:
    client, server = psk_configs(cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",))
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.server.failure_reason == "no_common_cipher_suite"
    (closed,) = [e for e in pair.client_events if isinstance(e, ConnectionClosed)]
    assert closed.alert == 40 and closed.by_peer


def test_psk_sandbox_identities() -> None:
    client, server = psk_configs(psk_identity=b"cali.1234", psk=b".fornium")
    server.psk_store = PskStore(sandbox=True)
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.now == 0.0
    assert pair.completed("server").peer_identity == "cali.1234"
    assert PSK == b"secretPSK"


def test_the_engine_is_a_datagram_core() -> None:
    """interfaces.DatagramCore: (datagram, address) pairs out, handed out once."""
    from nettester.interfaces import DatagramCore
    from nettester.protocols.dtls.connection import DtlsConnection

    client_config, _ = psk_configs()
    core: DatagramCore = DtlsConnection(client_config, ("192.0.2.2", 5684))
    assert isinstance(core, DtlsConnection)
    core.connect(0.0)
    ((datagram, address),) = core.datagrams_to_send()
    assert address == ("192.0.2.2", 5684) and datagram[0] == record.HANDSHAKE
    assert list(core.datagrams_to_send()) == []
    assert core.get_timer() == 1.0
