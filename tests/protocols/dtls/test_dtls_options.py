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
    monkeypatch.setenv("DTLS_MAX_HALF_OPEN", "12")
    options = parse(ServerOptions)
    assert options["max-connections"] == 77 and options["dtls"].psk_store.lookup(b"password") == b"sesame"
    assert options["max-half-open"] == 12 and options["half-open-timeout"] == 10.0


def test_client_secret_forms_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse(ClientOptions, "--identity", "a", "--secret", "hex:0a0b")["dtls"].psk == b"\n\x0b"
    assert parse(ClientOptions, "--identity", "a", "--secret", "base64:AAE=")["dtls"].psk == b"\x00\x01"
    monkeypatch.setenv("DTLS_PSK_IDENTITY", "env-device")
    monkeypatch.setenv("DTLS_PSK_SECRET", "plain")
    monkeypatch.setenv("DTLS_CID_LENGTH", "8")
    options = parse(ClientOptions)
    dtls = options["dtls"]
    assert (dtls.psk_identity, dtls.psk, dtls.cid_length) == (b"env-device", b"plain", 8)
    # The command line wins over the environment.
    assert parse(ClientOptions, "--identity", "cli", "--secret", "s")["dtls"].psk_identity == b"cli"


def test_client_auth_accepts_either_case() -> None:
    assert parse(ServerOptions, "--psk-sandbox", "--client-auth", "NONE")["dtls"].client_auth is ClientAuth.NONE


def _usage_error(options_class: type, *arguments: str) -> str:
    with pytest.raises(usage.UsageError) as raised:
        parse(options_class, *arguments)
    return str(raised.value)


@pytest.mark.parametrize(
    "option,expected",
    [
        ("--cid-length", "expected 0 (CID off) or a whole number 2..255, got 'abc'"),
        ("--dtls-mtu", "expected a whole number of at least 1, got 'abc'"),
        ("--dtls-retransmit", "expected a number above 0, got 'abc'"),
        ("--max-connections", "expected a whole number of at least 1, got 'abc'"),
        ("--max-half-open", "expected a whole number of at least 1, got 'abc'"),
        ("--half-open-timeout", "expected a number above 0, got 'abc'"),
    ],
)
def test_every_numeric_option_says_what_it_expects(option: str, expected: str) -> None:
    """Issue 16: like --port, never Python's 'invalid literal for int()'."""
    message = _usage_error(ServerOptions, "--psk-sandbox", option, "abc")
    assert option in message and expected in message and "invalid literal" not in message


def test_a_missing_psk_file_names_the_option() -> None:
    message = _usage_error(ServerOptions, "--psk-file", "/nonexistent/psk.txt")
    assert message.startswith("--psk-file /nonexistent/psk.txt: cannot read it (No such file or directory)"), message


def test_a_bad_psk_file_line_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.psk").write_text("device=not base64!\n")
    message = _usage_error(ServerOptions, "--psk-file", str(tmp_path / "bad.psk"))
    assert message.startswith("--psk-file %s: line 1: secret is not base64" % (tmp_path / "bad.psk")), message


def test_a_bad_pem_file_names_the_option_and_what_it_should_hold(tmp_path: Path) -> None:
    """Issue 16: no cryptography internals (MalformedFraming and its URL)."""
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    key = tmp_path / "key.pem"
    issue(make_ca(), "x").pem_files(str(tmp_path / "good.pem"), str(key))
    message = _usage_error(ServerOptions, "--cert", str(bad), "--key", str(key))
    assert message.startswith(
        "--cert %s: no PEM certificate in it; expected one or more -----BEGIN CERTIFICATE-----" % bad
    ), message
    assert "Malformed" not in message and "http" not in message
    message = _usage_error(ServerOptions, "--cert", str(tmp_path / "good.pem"), "--key", str(bad))
    assert message.startswith("--key %s: no unencrypted PEM private key in it" % bad), message
    message = _usage_error(ClientOptions, "--trust", str(tmp_path / "missing.pem"))
    assert message.startswith("--trust %s: cannot read it" % (tmp_path / "missing.pem")), message
