"""The keepalive module's roles: discovery, options, environment variables, TLS material, local scenario."""

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from zope.interface.verify import verifyObject

from nettester.interfaces import (
    ICommandRole,
    ILocalScenario,
    IProtocolModule,
    IReportingService,
    IRole,
)
from nettester.module import discover_modules
from nettester.plugins.keepalive import keepalive
from nettester.protocols.keepalive import tls
from nettester.protocols.keepalive.options import ClientOptions, ReportOptions, ServerOptions
from nettester.protocols.keepalive.roles import build_client, build_server


def parse(options_class: type, *argv: str) -> dict:
    options = options_class()
    options.parseOptions(list(argv))
    return options


def test_module_is_discovered_and_provides_its_interfaces() -> None:
    assert keepalive.name in [module.name for module in discover_modules()]
    verifyObject(IProtocolModule, keepalive)
    server, client, report = keepalive.roles
    assert [role.name for role in keepalive.roles] == ["keepalive-server", "keepalive-client", "keepalive-report"]
    verifyObject(IRole, server)
    verifyObject(IRole, client)
    verifyObject(ICommandRole, report)


def test_server_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    options = parse(ServerOptions)
    assert (options["port"], options["keepalive-timeout"], options["tls"], options["certificate"]) == (
        49665, 20.0, 0, None)
    monkeypatch.setenv("TCP_SERVER_PORT", "5000")
    monkeypatch.setenv("TCP_KEEPALIVE_TIMEOUT", "7.5")
    assert (parse(ServerOptions)["port"], parse(ServerOptions)["keepalive-timeout"]) == (5000, 7.5)
    assert parse(ServerOptions, "--port", "6000")["port"] == 6000


def test_client_reads_the_original_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCP_SERVER_IP", "10.1.2.3")
    monkeypatch.setenv("TCP_CLIENT_COUNT", "250")
    options = parse(ClientOptions)
    assert (options["server"], options["clients"], options["keepalive-interval"], options["response-timeout"],
            options["dummy-interval"], options["ramp-up"]) == ("10.1.2.3", 250, 5.0, 10.0, 11.0, 10.0)


@pytest.mark.parametrize(
    "options_class, argv, message",
    [
        (ClientOptions, [], "--server is required (or set TCP_SERVER_IP)"),
        (ClientOptions, ["--server", "h", "--clients", "0"], "--clients: expected a whole number of at least 1"),
        (ClientOptions, ["--server", "h", "--insecure"], "--ca, --server-name and --insecure need --tls"),
        (ClientOptions, ["--server", "h", "--tls", "--insecure", "--ca", "x"], "give one of them"),
        (ClientOptions, ["--server", "h", "--tls", "--ca", "/nonexistent.pem"], "--ca: cannot read /nonexistent.pem"),
        (ServerOptions, ["--port", "70000"], "--port: expected a port number 0-65535"),
        (ServerOptions, ["--keepalive-timeout", "0"], "--keepalive-timeout: expected a number above 0"),
        (ServerOptions, ["--tls", "--cert", "c.pem"], "--cert and --key go together"),
        (ServerOptions, ["--cert", "c.pem", "--key", "k.pem"], "--cert/--key need --tls"),
        (ServerOptions, ["--tls", "--cert", "/nonexistent.pem", "--key", "k"], "--cert: cannot read /nonexistent.pem"),
        (ReportOptions, ["server.jsonl"], "at least one client's JSON log"),
    ],
)
def test_bad_options_say_what_is_wrong(options_class: type, argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(options_class, *argv)


def test_server_loads_a_certificate_and_refuses_a_mismatched_key(tmp_path: Path) -> None:
    first, second = tls.self_signed_certificate(), tls.self_signed_certificate()
    (tmp_path / "cert.pem").write_bytes(first.chain_pem[0])
    (tmp_path / "key.pem").write_bytes(first.key_pem)
    (tmp_path / "other.pem").write_bytes(second.key_pem)
    options = parse(ServerOptions, "--tls", "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "key.pem"))
    assert options["certificate"].fingerprint == first.fingerprint and not options["certificate"].self_signed
    with pytest.raises(UsageError, match="does not match the first certificate"):
        parse(ServerOptions, "--tls", "--cert", str(tmp_path / "cert.pem"), "--key", str(tmp_path / "other.pem"))
    with pytest.raises(UsageError, match="holds no PEM certificate"):
        parse(ServerOptions, "--tls", "--cert", str(tmp_path / "key.pem"), "--key", str(tmp_path / "key.pem"))
    assert parse(ServerOptions, "--tls")["certificate"].self_signed


def test_built_services_report_and_use_the_options() -> None:
    reactor = MemoryReactorClock()
    server = build_server(reactor, parse(ServerOptions, "--port", "0", "--tls"))
    client = build_client(reactor, parse(ClientOptions, "--server", "127.0.0.1", "--clients", "3", "--ramp-up", "0"))
    verifyObject(IReportingService, server)
    verifyObject(IReportingService, client)
    server.startService()
    client.startService()
    reactor.advance(0)
    assert [entry[:2] for entry in reactor.tcpClients] == [("127.0.0.1", 49665)] * 3


def test_local_scenario_runs_plain_and_tls_fleets_on_loopback() -> None:
    reactor = MemoryReactorClock()
    scenario = keepalive.local_scenario(reactor, {"duration": 30.0})
    verifyObject(ILocalScenario, scenario)
    scenario.service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [(0, "127.0.0.1")] * 2
    reactor.advance(2.0)
    assert len(reactor.tcpClients) == 30
    verdict = scenario.verdict()
    assert not verdict.passed and verdict.evidence["connections"] == 0


def test_the_ca_file_may_be_a_bundle_and_must_hold_a_certificate(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"".join(tls.self_signed_certificate().chain_pem[0] for _ in range(3)))
    assert parse(ClientOptions, "--server", "h", "--tls", "--ca", str(bundle))["tls-creator"] is not None
    (tmp_path / "empty.pem").write_bytes(b"no certificate here")
    with pytest.raises(UsageError, match="holds no PEM certificate"):
        parse(ClientOptions, "--server", "h", "--tls", "--ca", str(tmp_path / "empty.pem"))


def test_port_0_is_not_a_destination() -> None:
    import pytest as _pytest
    from twisted.python.usage import UsageError as _UsageError

    with _pytest.raises(_UsageError, match="--port 0 is not a destination"):
        parse(ClientOptions, "--server", "127.0.0.1", "--port", "0")


@pytest.mark.parametrize(("role", "option", "expected"), [
    ("keepalive-server", "--cert", "--cert: {bad} holds no PEM certificate; expected one or more "
                                   "-----BEGIN CERTIFICATE----- blocks, leaf first"),
    ("keepalive-server", "--key", "--key: {bad} holds no unencrypted PEM private key; expected a "
                                  "-----BEGIN PRIVATE KEY----- (or EC / RSA PRIVATE KEY) block"),
    ("keepalive-client", "--ca", "--ca: {bad} holds no PEM certificate; expected one or more "
                                 "-----BEGIN CERTIFICATE----- blocks (a CA bundle)"),
])
def test_a_file_that_is_not_pem_names_the_option_the_file_and_what_it_should_hold(
        tmp_path: Path, role: str, option: str, expected: str) -> None:
    """As a newcomer meets it (issue 16): one line, exit status 2, no library exception text."""
    import subprocess
    import sys

    certificate = tls.self_signed_certificate()
    (tmp_path / "cert.pem").write_bytes(certificate.chain_pem[0])
    (tmp_path / "key.pem").write_bytes(certificate.key_pem)
    bad = tmp_path / "bad.pem"
    bad.write_text("not a PEM file\n")
    files = {"--cert": str(tmp_path / "cert.pem"), "--key": str(tmp_path / "key.pem"), option: str(bad)}
    names = ("--cert", "--key") if role == "keepalive-server" else ("--ca", "--server")
    files["--server"] = "127.0.0.1"
    argv = ["--tls", *(word for name in names for word in (name, files[name]))]
    result = subprocess.run([sys.executable, "-m", "nettester", role, *argv], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[0] == "nettester: error: " + expected.format(bad=bad)
    assert "Traceback" not in result.stderr and "cryptography" not in result.stderr
