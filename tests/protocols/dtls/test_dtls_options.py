"""The DTLS option mixins build working configurations."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from dtls_pair import Pair, fake_clock_time
from twisted.python import usage

from nettester.options import RoleOptions
from nettester.protocols.dtls.certificates import issue, make_ca
from nettester.protocols.dtls.connection import ClientAuth
from nettester.protocols.dtls.options import DtlsClientOptionsMixin, DtlsServerOptionsMixin


class ServerOptions(DtlsServerOptionsMixin, RoleOptions):
    pass


class ClientOptions(DtlsClientOptionsMixin, RoleOptions):
    pass


def parse(options_class: type, *arguments: str) -> RoleOptions:
    options = options_class()
    options.parseOptions(list(arguments))
    return options


def test_sandbox_server_and_client_complete_a_handshake() -> None:
    server = parse(ServerOptions, "--psk-sandbox", "--cid-length", "4")
    client = parse(ClientOptions, "--psk-sandbox")
    assert server["dtls"].cid_generator.length == 4
    pair = Pair(client["dtls"], server["dtls"])
    pair.start()
    pair.run()
    assert pair.completed("server").peer_identity == "Client_identity"
    assert len(pair.completed("server").read_cid) == 4


def test_psk_file_and_explicit_client_identity(tmp_path: Path) -> None:
    secret = base64.b64encode(b"s3cret").decode()
    (tmp_path / "psk.txt").write_text("# devices\ndevice-1=%s\n" % secret)
    server = parse(ServerOptions, "--psk-file", str(tmp_path / "psk.txt"), "--cid-length", "0")
    client = parse(ClientOptions, "--identity", "device-1", "--secret", "base64:" + secret)
    assert server["dtls"].cid_generator is None
    pair = Pair(client["dtls"], server["dtls"])
    pair.start()
    pair.run()
    assert pair.completed("client").write_cid is None and pair.server.is_established


def test_certificates_and_client_auth(tmp_path: Path) -> None:
    ca = make_ca()
    issue(ca, "localhost").pem_files(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    issue(ca, "device").pem_files(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    ca_path = tmp_path / "ca.pem"
    from cryptography.hazmat.primitives.serialization import Encoding

    ca_path.write_bytes(ca.certificate.public_bytes(Encoding.PEM))
    server = parse(
        ServerOptions,
        "--cert",
        str(tmp_path / "server.pem"),
        "--key",
        str(tmp_path / "server.key"),
        "--trust",
        str(ca_path),
        "--client-auth",
        "needed",
    )
    client = parse(
        ClientOptions,
        "--cert",
        str(tmp_path / "client.pem"),
        "--key",
        str(tmp_path / "client.key"),
        "--trust",
        str(ca_path),
        "--server-name",
        "localhost",
    )
    assert server["dtls"].client_auth is ClientAuth.NEEDED
    assert all("ECDSA" in name for name in client["dtls"].cipher_suites)  # no PSK configured
    client["dtls"].certificate_time = server["dtls"].certificate_time = fake_clock_time  # Pair's clock starts at 0
    pair = Pair(client["dtls"], server["dtls"])
    pair.start()
    pair.run()
    assert pair.completed("server").peer_identity == "CN=device"


@pytest.mark.parametrize(
    "options_class,arguments",
    [
        (ServerOptions, []),  # no credentials at all
        (ServerOptions, ["--psk-sandbox", "--cid-length", "1"]),
        (ServerOptions, ["--psk-sandbox", "--dtls-suites", "TLS_RSA_WITH_NULL"]),
        (ServerOptions, ["--psk-sandbox", "--client-auth", "sometimes"]),
        (ServerOptions, ["--psk-sandbox", "--client-auth", "needed"]),  # without --trust
        (ServerOptions, ["--psk-file", "/nonexistent/psk.txt"]),
        (ClientOptions, ["--identity", "x", "--secret", "base64:not base64!"]),
        (ClientOptions, ["--identity", "x", "--secret", "hex:zz"]),
        (ClientOptions, ["--identity", "x"]),  # a secret is missing
        (ClientOptions, []),  # no credentials and no trust anchors
        (ServerOptions, ["--psk-sandbox", "--cert", "c.pem"]),  # --key is missing
        (ClientOptions, ["--dtls-suites", "TLS_PSK_WITH_AES_128_CCM_8"]),  # PSK suite without a PSK
    ],
)
def test_bad_options_are_usage_errors(options_class: type, arguments: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(options_class, *arguments)


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTLS_PSK_SANDBOX", "true")
    monkeypatch.setenv("DTLS_MAX_CONNECTIONS", "77")
    options = parse(ServerOptions)
    assert options["max-connections"] == 77 and options["dtls"].psk_store.lookup(b"password") == b"sesame"


def test_client_secret_forms_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(ClientOptions, "--identity", "a", "--secret", "hex:0a0b")["dtls"].psk == b"\n\x0b"
    assert parse(ClientOptions, "--identity", "a", "--secret", "base64:AAE=")["dtls"].psk == b"\x00\x01"
    monkeypatch.setenv("DTLS_PSK_IDENTITY", "env-device")
    monkeypatch.setenv("DTLS_PSK_SECRET", "plain")
    monkeypatch.setenv("DTLS_CID_LENGTH", "8")
    options = parse(ClientOptions)
    assert (options["dtls"].psk_identity, options["dtls"].psk, options["dtls"].cid_length) == (b"env-device", b"plain", 8)
    # The command line wins over the environment.
    assert parse(ClientOptions, "--identity", "cli", "--secret", "s")["dtls"].psk_identity == b"cli"


def test_client_auth_accepts_either_case() -> None:
    assert parse(ServerOptions, "--psk-sandbox", "--client-auth", "NONE")["dtls"].client_auth is ClientAuth.NONE
