"""Interop with OpenSSL through pyOpenSSL over memory BIOs: an independent
DTLS 1.2 implementation in the same process, no sockets."""

from __future__ import annotations

import dataclasses

import pytest
from dtls_pair import CLIENT_ADDRESS, fake_clock_time
from OpenSSL import SSL, crypto

from nettester.protocols.dtls.certificates import issue, make_ca
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import (
    ApplicationData,
    ClientAuth,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    HandshakeCompleted,
)
from nettester.protocols.dtls.cookie import CookieGate, Verdict

DTLS1_2_VERSION = 0xFEFD  # OpenSSL's DTLS1_2_VERSION (not exported by pyOpenSSL)
OPENSSL_NAMES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8": b"ECDHE-ECDSA-AES128-CCM8",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": b"ECDHE-ECDSA-AES128-GCM-SHA256",
}


def openssl_context(identity, cipher: bytes, ca=None, verify_peer: bool = False) -> SSL.Context:
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_options(SSL.OP_NO_QUERY_MTU)
    # CCM8's 64-bit tag needs security level 0 in OpenSSL 3+.
    context.set_cipher_list(cipher + b":@SECLEVEL=0")
    if identity is not None:
        context.use_certificate(identity.certificate)
        context.use_privatekey(identity.private_key)
    if ca is not None:
        context.get_cert_store().add_cert(crypto.X509.from_cryptography(ca.certificate))
    if verify_peer:
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *args: args[-1])
    return context


def drain(openssl: SSL.Connection) -> list[bytes]:
    out = []
    while True:
        try:
            data = openssl.bio_read(65536)
        except SSL.WantReadError:
            return out
        if not data:
            return out
        out.append(data)


def step(openssl: SSL.Connection) -> None:
    try:
        openssl.do_handshake()
    except SSL.WantReadError:
        pass


def events(connection: DtlsConnection) -> list[object]:
    found = []
    while (event := connection.next_event()) is not None:
        found.append(event)
    return found


def _our_client_handshake(openssl: SSL.Connection, client: DtlsConnection) -> HandshakeCompleted:
    now = 0.0
    client.connect(now)
    seen: list[object] = []
    for _ in range(20):
        for datagram in client.datagrams_to_send():
            openssl.bio_write(datagram)
            step(openssl)
        for datagram in drain(openssl):
            client.receive_datagram(datagram, None, now)
        seen += events(client)
        if client.is_established:
            break
    for datagram in client.datagrams_to_send():  # our final flight of an abbreviated handshake
        openssl.bio_write(datagram)
        step(openssl)
    (completed,) = [e for e in seen if isinstance(e, HandshakeCompleted)]
    return completed


@pytest.mark.parametrize("suite", sorted(OPENSSL_NAMES))
def test_our_client_against_openssl_server_with_cookies(suite: str) -> None:
    ca = make_ca()
    server_identity = issue(ca, "localhost")
    context = openssl_context(server_identity, OPENSSL_NAMES[suite])
    context.set_options(SSL.OP_COOKIE_EXCHANGE)
    context.set_cookie_generate_callback(lambda connection: b"openssl-cookie")
    context.set_cookie_verify_callback(lambda connection, cookie: cookie == b"openssl-cookie")
    openssl = SSL.Connection(context, None)
    openssl.set_ciphertext_mtu(1400)
    openssl.set_accept_state()
    client = DtlsConnection(
        DtlsConfiguration(
            is_client=True, cipher_suites=(suite,), trust_anchors=[ca.certificate], server_name="localhost",
            certificate_time=fake_clock_time,
        )
    )
    now = 0.0
    completed = _our_client_handshake(openssl, client)
    assert completed.cipher_suite == suite and completed.peer_identity == "CN=localhost"
    assert completed.write_cid is None  # OpenSSL has no CID
    client.send_application_data(b"hello openssl")
    for datagram in client.datagrams_to_send():
        openssl.bio_write(datagram)
    assert openssl.recv(1000) == b"hello openssl"
    openssl.send(b"hello nettester")
    for datagram in drain(openssl):
        client.receive_datagram(datagram, None, now)
    assert [e.data for e in events(client) if isinstance(e, ApplicationData)] == [b"hello nettester"]
    openssl.shutdown()
    for datagram in drain(openssl):
        client.receive_datagram(datagram, None, now)
    (closed,) = [e for e in events(client) if isinstance(e, ConnectionClosed)]
    assert closed.by_peer and closed.alert == 0


@pytest.mark.parametrize("suite", sorted(OPENSSL_NAMES))
@pytest.mark.parametrize("client_auth", [False, True])
def test_openssl_client_against_our_server(suite: str, client_auth: bool) -> None:
    ca = make_ca()
    server_identity, client_identity = issue(ca, "localhost"), issue(ca, "openssl-client")
    server_config = DtlsConfiguration(
        is_client=False,
        certificate_chain=server_identity.full_chain(),
        private_key=server_identity.private_key,
        trust_anchors=[ca.certificate],
        certificate_time=fake_clock_time,
        client_auth=ClientAuth.NEEDED if client_auth else ClientAuth.NONE,
        cid_generator=NodeConnectionIdGenerator(),
        mtu=600,  # force fragmentation of the certificate flight
    )
    context = openssl_context(client_identity if client_auth else None, OPENSSL_NAMES[suite], ca, verify_peer=True)
    openssl = SSL.Connection(context, None)
    openssl.set_ciphertext_mtu(1400)
    openssl.set_connect_state()
    gate, server, now = CookieGate(), None, 0.0
    hello_verify = 0
    step(openssl)
    for _ in range(20):
        for datagram in drain(openssl):
            if server is None:
                verdict = gate.check(datagram, CLIENT_ADDRESS, now)
                if verdict.verdict is Verdict.VERIFY:
                    hello_verify += 1
                    openssl.bio_write(verdict.reply)
                    continue
                assert verdict.verdict is Verdict.ACCEPT
                server = DtlsConnection(server_config, CLIENT_ADDRESS)
            server.receive_datagram(datagram, CLIENT_ADDRESS, now)
        if server is not None:
            for datagram in server.datagrams_to_send():
                openssl.bio_write(datagram)
        step(openssl)
        if server is not None and server.is_established:
            break
    assert hello_verify == 1 and server is not None and server.is_established
    (completed,) = [e for e in events(server) if isinstance(e, HandshakeCompleted)]
    assert completed.cipher_suite == suite
    assert completed.peer_identity == ("CN=openssl-client" if client_auth else None)
    openssl.send(b"ping")
    for datagram in drain(openssl):
        server.receive_datagram(datagram, CLIENT_ADDRESS, now)
    assert [e.data for e in events(server) if isinstance(e, ApplicationData)] == [b"ping"]
    server.send_application_data(b"pong")
    for datagram in server.datagrams_to_send():
        openssl.bio_write(datagram)
    assert openssl.recv(100) == b"pong"
    server.close()
    for datagram in server.datagrams_to_send():
        openssl.bio_write(datagram)
    with pytest.raises(SSL.ZeroReturnError):
        openssl.recv(100)


def test_our_client_resumes_a_session_with_openssl() -> None:
    ca = make_ca()
    context = openssl_context(issue(ca, "localhost"), b"ECDHE-ECDSA-AES128-CCM8")
    config = DtlsConfiguration(
        is_client=True,
        cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",),
        trust_anchors=[ca.certificate],
        certificate_time=fake_clock_time,
        server_name="localhost",
    )
    first = SSL.Connection(context, None)
    first.set_ciphertext_mtu(1400)
    first.set_accept_state()
    full = _our_client_handshake(first, DtlsConnection(config))
    assert not full.resumed and full.session is not None and full.session_id
    second = SSL.Connection(context, None)
    second.set_ciphertext_mtu(1400)
    second.set_accept_state()
    resumed_config = dataclasses.replace(config, session=full.session)
    client = DtlsConnection(resumed_config)
    resumed = _our_client_handshake(second, client)
    # OpenSSL took the abbreviated handshake: a full one would have been refused.
    assert resumed.resumed and resumed.session_id == full.session_id
    client.send_application_data(b"resumed")
    for datagram in client.datagrams_to_send():
        second.bio_write(datagram)
    assert second.recv(100) == b"resumed"


def test_openssl_client_resumes_a_session_with_our_server() -> None:
    from nettester.protocols.dtls.connection import SessionCache

    ca = make_ca()
    server_identity = issue(ca, "localhost")
    server_config = DtlsConfiguration(
        is_client=False,
        certificate_chain=server_identity.full_chain(),
        private_key=server_identity.private_key,
        session_cache=SessionCache(),
    )
    context = openssl_context(None, b"ECDHE-ECDSA-AES128-GCM-SHA256", ca, verify_peer=True)
    context.set_options(SSL.OP_NO_TICKET)
    results = []
    session = None
    for _ in range(2):
        openssl = SSL.Connection(context, None)
        openssl.set_ciphertext_mtu(1400)
        if session is not None:
            openssl.set_session(session)
        openssl.set_connect_state()
        server = DtlsConnection(server_config, CLIENT_ADDRESS)
        step(openssl)
        for _ in range(20):
            for datagram in drain(openssl):
                server.receive_datagram(datagram, CLIENT_ADDRESS, 0.0)
            for datagram in server.datagrams_to_send():
                openssl.bio_write(datagram)
            step(openssl)
            if server.is_established:
                break
        (completed,) = [e for e in events(server) if isinstance(e, HandshakeCompleted)]
        results.append(completed.resumed)
        session = openssl.get_session()
        openssl.send(b"hi")
        for datagram in drain(openssl):
            server.receive_datagram(datagram, CLIENT_ADDRESS, 0.0)
        assert [e.data for e in events(server) if isinstance(e, ApplicationData)] == [b"hi"]
        # OpenSSL only resumes sessions that were shut down properly.
        openssl.shutdown()
        for datagram in drain(openssl):
            server.receive_datagram(datagram, CLIENT_ADDRESS, 0.0)
        assert server.is_closed
    assert results == [False, True]
    assert len(server_config.session_cache) == 1
