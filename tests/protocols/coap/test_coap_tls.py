"""coaps+tcp (RFC 8323 section 8.2): the server's TLS (self-signed or --cert, client authentication,
ALPN ``coap``) and the client's, on loopback."""

from __future__ import annotations

import datetime
import io
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import reactor
from twisted.python import usage

from nettester.protocols.coap.client import CoapClientService, make_link
from nettester.protocols.coap.options import CoapClientOptions, CoapServerOptions
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.coap.tls import ALPN_COAP, client_tls, psk_supported, server_tls
from nettester.protocols.coap.uri import build_request, parse_uri
from nettester.protocols.dtls.certificates import Identity, issue, make_ca

pytestmark = pytest.mark.integration


def server_options(*argv: str) -> CoapServerOptions:
    options = CoapServerOptions()
    options.parseOptions(["--tcp", *argv])
    return options


def pki(tmp_path: Path) -> dict[str, str]:
    ca = make_ca()
    files = {name: str(tmp_path / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    Path(files["ca.pem"]).write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    issue(ca, "server.example").pem_files(files["server.pem"], files["server.key"])
    issue(ca, "client-7").pem_files(files["client.pem"], files["client.key"])
    return files


def test_self_signed_by_default_with_alpn_coap() -> None:
    tls = server_tls(server_options())
    assert tls.description.startswith("self-signed certificate SHA-256 ")
    assert tls.context_factory._acceptableProtocols == [ALPN_COAP]
    assert psk_supported() in (True, False)


@pytest_twisted.inlineCallbacks
def fetch(service: CoapServerService, path: str, tls: Any, extended: bool = True) -> Generator[Any, Any, str]:
    port = next(entry[2] for entry in service.listening
                if entry[0] == "coaps+tcp" and entry[3] == ("extended" if extended else "plugtest"))
    uri = parse_uri(f"coaps+tcp://127.0.0.1:{port}/{path}")
    out = io.StringIO()
    client = CoapClientService(reactor, uri, build_request(uri, "GET"), make_link(reactor, uri, tls=tls), out,
                               timeout=10.0)
    client.startService()
    status = yield client.done
    assert status == 0, out.getvalue()
    return out.getvalue()


@pytest_twisted.inlineCallbacks
def get_without_response(uri: Any, link: Any) -> Generator[Any, Any, None]:
    """A GET of ``uri`` through ``link`` whose TLS handshake the server refuses: no response, exit status 3."""
    out = io.StringIO()
    client = CoapClientService(reactor, uri, build_request(uri, "GET"), link, out, timeout=5.0)
    client.startService()
    status = yield client.done
    assert status == 3 and "==[ no response ]==" in out.getvalue()


def serving_client_certificates(files: dict[str, str], *extra: str) -> CoapServerService:
    """A started coaps+tcp server with the test PKI's certificate that needs client certificates."""
    options = server_options("--cert", files["server.pem"], "--key", files["server.key"], "--trust", files["ca.pem"],
                             "--client-auth", "needed", *extra)
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True, tls=server_tls(options))
    service.startService()
    return service

@pytest_twisted.inlineCallbacks
def test_mycontext_over_tls_shows_cipher_and_client_identity(tmp_path: Path) -> Generator[Any, Any, None]:
    files = pki(tmp_path)
    service = serving_client_certificates(files)
    try:
        client_options = CoapClientOptions()
        client_options.parseOptions(["--trust", files["ca.pem"], "--cert", files["client.pem"], "--key",
                                     files["client.key"], "coaps+tcp://127.0.0.1/mycontext"])
        out = yield fetch(service, "mycontext", client_tls("127.0.0.1", client_options))
        assert "cipher-suite: TLS_" in out and "peer: CN=client-7" in out
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_client_without_trust_reaches_a_self_signed_server() -> Generator[Any, Any, None]:
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True, tls=server_tls(server_options()))
    service.startService()
    try:
        out = yield fetch(service, "large", None, extended=False)
        assert "Payload (1280 bytes)" in out
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_client_certificate_needed_but_missing_fails(tmp_path: Path) -> Generator[Any, Any, None]:
    files = pki(tmp_path)
    service = serving_client_certificates(files)
    try:
        port = next(entry[2] for entry in service.listening if entry[0] == "coaps+tcp")
        uri = parse_uri(f"coaps+tcp://127.0.0.1:{port}/test")
        yield get_without_response(uri, make_link(reactor, uri))
    finally:
        yield service.stopService()


def foreign_client(tmp_path: Path, expired: bool = False) -> list[str]:
    """coap-client arguments with a client certificate from a CA the server was never told about
    (the file holds the leaf, then that CA: the chain up to its own root)."""
    root = make_ca("some device vendor")
    leaf = issue(root, "device-42")
    if expired:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(leaf.certificate.subject)
                   .issuer_name(root.certificate.subject).public_key(leaf.private_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=2))
                   .not_valid_after(now - datetime.timedelta(days=1)))
        leaf = Identity(builder.sign(root.private_key, hashes.SHA256()), leaf.private_key)
    Identity(leaf.certificate, leaf.private_key, (root.certificate,)).pem_files(
        str(tmp_path / "device.pem"), str(tmp_path / "device.key"))
    return ["--cert", str(tmp_path / "device.pem"), "--key", str(tmp_path / "device.key")]


def test_trust_all_needs_tls_or_dtls_and_asks_for_a_certificate() -> None:
    options = server_options("--trust-all")
    assert options["client-auth"] == "wanted" and options["dtls"] is None
    with pytest.raises(usage.UsageError, match="--trust-all"):
        CoapServerOptions().parseOptions(["--trust-all"])


@pytest_twisted.inlineCallbacks
def test_trust_all_accepts_a_chain_to_its_own_root_not_to_trust(tmp_path: Path) -> Generator[Any, Any, None]:
    files = pki(tmp_path)
    service = serving_client_certificates(files, "--trust-all")
    try:
        client_options = CoapClientOptions()
        client_options.parseOptions(["--trust", files["ca.pem"], *foreign_client(tmp_path),
                                     "coaps+tcp://127.0.0.1/mycontext"])
        out = yield fetch(service, "mycontext", client_tls("127.0.0.1", client_options))
        assert "peer: CN=device-42" in out
    finally:
        yield service.stopService()


@pytest.mark.parametrize("trust_all", [False, True], ids=["trust", "trust-all"])
@pytest_twisted.inlineCallbacks
def test_rejected_client_chains(tmp_path: Path, trust_all: bool) -> Generator[Any, Any, None]:
    """Without --trust-all a foreign root fails; with it, an expired leaf still fails."""
    files = pki(tmp_path)
    service = serving_client_certificates(files, *(["--trust-all"] if trust_all else []))
    try:
        port = next(entry[2] for entry in service.listening if entry[0] == "coaps+tcp")
        address = f"coaps+tcp://127.0.0.1:{port}/test"
        uri = parse_uri(address)
        client_options = CoapClientOptions()
        client_options.parseOptions(["--trust", files["ca.pem"], *foreign_client(tmp_path, expired=trust_all),
                                     address])
        yield get_without_response(uri, make_link(reactor, uri, tls=client_tls("127.0.0.1", client_options)))
    finally:
        yield service.stopService()
