"""The DTLS engine against GnuTLS 3.7 (``gnutls-cli``/``gnutls-serv --udp``)
on loopback: PSK and ECDHE-ECDSA suites, a fragmented ClientHello (small
MTU), resumption, renegotiation refused, a wrong PSK alerted at once.

A missing peer skips, or fails under CI=true (.ci/install.d/40-dtls.sh
installs gnutls-bin).
"""

from __future__ import annotations

import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel, formatEvent

from nettester import logs
from nettester.protocols.dtls.connection import SessionCache
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from tests.interop.test_dtls_interop import (
    PSK,
    PSK_IDENTITY,
    Receiver,
    ecdsa_files,
    listen,
    psk_client,
    require,
    server_config,
    spawn,
    wait_for,
)
from tests.logcapture import log_events
from tests.loopback import free_ports

pytestmark = pytest.mark.interop

#: our suite name -> the GnuTLS priority string that offers only it, over DTLS 1.2
GNUTLS_CASES = {
    "TLS_PSK_WITH_AES_128_CCM_8": "NONE:+VERS-DTLS1.2:+PSK:+AES-128-CCM-8:+AEAD:+SIGN-ALL:+COMP-NULL:+CURVE-ALL",
    "TLS_PSK_WITH_AES_128_GCM_SHA256": "NONE:+VERS-DTLS1.2:+PSK:+AES-128-GCM:+AEAD:+SIGN-ALL:+COMP-NULL:+CURVE-ALL",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8": (
        "NONE:+VERS-DTLS1.2:+ECDHE-ECDSA:+AES-128-CCM-8:+AEAD:+SIGN-ALL:+COMP-NULL:+CURVE-ALL"
    ),
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": (
        "NONE:+VERS-DTLS1.2:+ECDHE-ECDSA:+AES-128-GCM:+AEAD:+SIGN-ALL:+COMP-NULL:+CURVE-ALL"
    ),
}


def gnutls(program: str) -> str:
    return require(shutil.which(program), program + " (gnutls-bin)")


def _client_arguments(suite: str, port: int, ca_file: str = "", psk: bytes = PSK) -> list[str]:
    """gnutls-cli offering only ``suite``; the host comes last."""
    arguments = [gnutls("gnutls-cli"), "--udp", "--port", str(port), "--priority", GNUTLS_CASES[suite]]
    if "ECDSA" in suite:
        return arguments + ["--x509cafile", ca_file, "localhost"]
    return arguments + ["--pskusername", PSK_IDENTITY.decode(), "--pskkey", psk.hex(), "127.0.0.1"]


def _our_server(suite: str, identity: Any = None, **endpoint_options: Any) -> tuple[DtlsEndpoint, Receiver, Any]:
    receiver = Receiver(answer=lambda data: b"echo:" + data)
    configuration = server_config(suite, identity)
    configuration.session_cache = SessionCache()
    endpoint = DtlsEndpoint(reactor, server_configuration=configuration, **endpoint_options)
    return endpoint, receiver, listen(endpoint, receiver)


@pytest.mark.parametrize("suite", sorted(GNUTLS_CASES))
@pytest_twisted.inlineCallbacks
def test_gnutls_cli_with_our_server(suite: str, tmp_path: Path) -> Generator[Any, Any, None]:
    identity, ca_file = None, ""
    if "ECDSA" in suite:
        _, identity, files = ecdsa_files(tmp_path)
        ca_file = files["ca.pem"]
    endpoint, receiver, port_handle = _our_server(suite, identity)
    client = spawn(_client_arguments(suite, port_handle.getHost().port, ca_file))
    try:
        yield wait_for(lambda: endpoint.counters.handshakes.value == 1, "the handshake")
        yield wait_for(lambda: b"Handshake was completed" in client.output, "gnutls-cli ready")
        client.write(b"ping from gnutls\n")
        yield wait_for(lambda: b"echo:ping from gnutls" in client.output, "our echo in gnutls-cli")
        ((_, peer),) = receiver.received
        assert endpoint.peer_context(peer).cipher_suite == suite
    finally:
        client.stop()
        yield port_handle.stopListening()


@pytest.mark.parametrize("mtu", [150, 200])
@pytest_twisted.inlineCallbacks
def test_gnutls_cli_fragmented_client_hello(mtu: int, tmp_path: Path) -> Generator[Any, Any, None]:
    """Issue 13: ``--mtu 150`` splits the ClientHello into fragments; it is
    reassembled in front of the cookie gate and the handshake completes."""
    suite = "TLS_PSK_WITH_AES_128_CCM_8"
    endpoint, receiver, port_handle = _our_server(suite)
    arguments = _client_arguments(suite, port_handle.getHost().port)
    long_name = ".".join("label%02d" % i for i in range(20)) + ".example"  # a ClientHello of about 330 bytes
    client = spawn(arguments[:-1] + ["--mtu", str(mtu), "--sni-hostname", long_name, arguments[-1]])
    try:
        yield wait_for(lambda: endpoint.counters.handshakes.value == 1, "the handshake")
        yield wait_for(lambda: b"Handshake was completed" in client.output, "gnutls-cli ready")
        client.write(b"small mtu\n")
        yield wait_for(lambda: b"echo:small mtu" in client.output, "our echo")
        assert endpoint.counters.dropped.get("not_client_hello") == 0
        assert endpoint.admission.reassembled >= 1, "the ClientHello came in fragments"
    finally:
        client.stop()
        yield port_handle.stopListening()


@pytest_twisted.inlineCallbacks
def test_gnutls_cli_resumes_a_session(tmp_path: Path) -> Generator[Any, Any, None]:
    suite = "TLS_PSK_WITH_AES_128_GCM_SHA256"
    endpoint, receiver, port_handle = _our_server(suite)
    arguments = _client_arguments(suite, port_handle.getHost().port)
    client = spawn(arguments[:-1] + ["--resume", arguments[-1]])
    try:
        yield wait_for(lambda: endpoint.counters.resumptions.value == 1, "the resumed handshake")
        yield wait_for(lambda: b"This is a resumed session" in client.output, "gnutls-cli to see the resumption")
        assert endpoint.counters.handshakes.value == 2
    finally:
        client.stop()
        yield port_handle.stopListening()


@pytest_twisted.inlineCallbacks
def test_gnutls_cli_rehandshake_is_refused(tmp_path: Path) -> Generator[Any, Any, None]:
    """Issue 13: ``--rehandshake`` used to hang; now every renegotiating
    ClientHello gets a no_renegotiation warning on the session, and
    gnutls-cli reports the refused rehandshake (it then ends the session
    itself with an internal_error alert: GnuTLS's choice, not ours)."""
    suite = "TLS_PSK_WITH_AES_128_CCM_8"
    endpoint, receiver, port_handle = _our_server(suite)
    arguments = _client_arguments(suite, port_handle.getHost().port)
    client = spawn(arguments[:-1] + ["--rehandshake", arguments[-1]])
    try:
        yield wait_for(lambda: b"ReHandshake has failed" in client.output, "gnutls-cli to report the refusal")
        assert b"No renegotiation is allowed" in client.output or b"warning alert" in client.output
        assert endpoint.counters.renegotiations_refused.value >= 1
        assert endpoint.counters.handshakes.value == 1, "no second handshake"
        assert not any(reason.startswith("internal_error:") for reason in endpoint.counters.failures.values)
    finally:
        client.stop()
        yield port_handle.stopListening()


@pytest_twisted.inlineCallbacks
def test_gnutls_cli_with_a_wrong_psk_gets_a_fatal_alert_at_once(tmp_path: Path) -> Generator[Any, Any, None]:
    """Issue 13: a wrong key ends the handshake with bad_record_mac at once,
    and our log names the identity."""
    suite = "TLS_PSK_WITH_AES_128_CCM_8"
    threshold = logs._threshold[0]
    logs.set_level(LogLevel.info)  # whatever an earlier test left
    with log_events() as events:
        endpoint, receiver, port_handle = _our_server(suite)
        arguments = _client_arguments(suite, port_handle.getHost().port, psk=b"wrong key")
        client = spawn(arguments)
        try:
            yield wait_for(lambda: client.exit_code is not None, "gnutls-cli to give up")
            assert b"Bad record MAC" in client.output or b"bad record mac" in client.output.lower(), client.output
            assert endpoint.counters.failures.get("bad_record_mac") == 1
            messages = [formatEvent(event) for event in events]
            assert any('failed: wrong key for PSK identity "Client_identity"' in m for m in messages), messages
        finally:
            client.stop()
            yield port_handle.stopListening()
            logs._threshold[0] = threshold


# --- our client against gnutls-serv ---------------------------------------------------------


@pytest.mark.parametrize("suite", ["TLS_PSK_WITH_AES_128_CCM_8", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"])
@pytest_twisted.inlineCallbacks
def test_our_client_with_gnutls_serv(suite: str, tmp_path: Path) -> Generator[Any, Any, None]:
    (port,) = free_ports()
    arguments = [gnutls("gnutls-serv"), "--udp", "--port", str(port), "--echo", "--priority", GNUTLS_CASES[suite]]
    config = psk_client(suite)
    if "ECDSA" in suite:
        ca, _, files = ecdsa_files(tmp_path)
        arguments += ["--x509certfile", files["server.pem"], "--x509keyfile", files["server.key"]]
        config.trust_anchors, config.server_name = [ca.certificate], "localhost"
    else:
        passwd = tmp_path / "psk.passwd"
        passwd.write_text("%s:%s\n" % (PSK_IDENTITY.decode(), PSK.hex()))
        arguments += ["--pskpasswd", str(passwd)]
    server = spawn(arguments)
    receiver = Receiver()
    endpoint = DtlsEndpoint(reactor, client_configuration=config)
    port_handle = listen(endpoint, receiver)
    try:
        yield wait_for(lambda: b"listening on IPv4" in server.output, "gnutls-serv")
        peer = yield endpoint.connect(("127.0.0.1", port))
        assert endpoint.peer_context(peer).cipher_suite == suite
        endpoint.send_datagram(b"hello gnutls", peer)
        yield wait_for(lambda: bool(receiver.received), "the echo")
        assert receiver.received[0][0] == b"hello gnutls"
    finally:
        server.stop()
        yield port_handle.stopListening()
