"""coap-server's --trust-all and --interfaces-pattern (issue 12 section 2), and --max-body-size."""

from __future__ import annotations

import datetime
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from coap_testing import UdpClock
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.python import usage

from nettester.protocols.coap import server as server_module
from nettester.protocols.coap.options import CoapServerOptions
from nettester.protocols.coap.roles import build_server
from nettester.protocols.dtls.certificates import issue, make_ca
from nettester.protocols.dtls.connection import ClientAuth, DtlsConfiguration


def _dtls_pair() -> ModuleType:
    """The DTLS tests' engine-to-engine driver (tests/protocols/dtls/dtls_pair.py)."""
    if "dtls_pair" not in sys.modules:
        path = Path(__file__).parents[1] / "dtls" / "dtls_pair.py"
        spec = importlib.util.spec_from_file_location("dtls_pair", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["dtls_pair"] = module
        spec.loader.exec_module(module)
    return sys.modules["dtls_pair"]


Pair = _dtls_pair().Pair


def parse(*argv: str) -> CoapServerOptions:
    options = CoapServerOptions()
    options.parseOptions(list(argv))
    return options


def credentials(tmp_path: Path) -> list[str]:
    ca = make_ca("server CA")
    issue(ca, "localhost").pem_files(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    return ["--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key")]


def at_start_of_test(now: float) -> datetime.datetime:
    """The engine-to-engine pair's clock starts at 0: certificates are checked at the wall-clock time of the test."""
    return STARTED + datetime.timedelta(seconds=now)


STARTED = datetime.datetime.now(datetime.UTC)


def test_trust_all_accepts_a_client_chain_of_an_unknown_ca(tmp_path: Path) -> None:
    options = parse(*credentials(tmp_path), "--trust-all")
    server = options["dtls"]
    server.certificate_time = at_start_of_test
    assert server.trust_all and server.trust_anchors is None and server.client_auth is ClientAuth.WANTED
    stranger = issue(make_ca("a CA nobody configured"), "device-7")
    client = DtlsConfiguration(is_client=True, cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",),
                               certificate_chain=stranger.full_chain(), private_key=stranger.private_key)
    pair = Pair(client, server)
    pair.start()
    pair.run()
    assert pair.completed("server").peer_identity == "CN=device-7"


def test_without_trust_all_the_unknown_ca_is_rejected(tmp_path: Path) -> None:
    ca = make_ca("the configured CA")
    (tmp_path / "ca.pem").write_bytes(ca.certificate.public_bytes(Encoding.PEM))
    options = parse(*credentials(tmp_path), "--trust", str(tmp_path / "ca.pem"), "--client-auth", "needed")
    stranger = issue(make_ca("a CA nobody configured"), "device-7")
    client = DtlsConfiguration(is_client=True, cipher_suites=("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",),
                               certificate_chain=stranger.full_chain(), private_key=stranger.private_key)
    options["dtls"].certificate_time = at_start_of_test
    pair = Pair(client, options["dtls"])
    pair.start()
    pair.run()
    assert pair.server is not None and pair.server.is_closed
    assert pair.server.failure_reason == "certificate_rejected"


def test_trust_all_keeps_needed_and_needs_coaps(tmp_path: Path) -> None:
    assert parse(*credentials(tmp_path), "--trust-all", "--client-auth", "needed")["dtls"].client_auth \
        is ClientAuth.NEEDED
    with pytest.raises(usage.UsageError, match="--trust-all"):
        parse("--trust-all")


def test_trust_all_warns_at_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, object]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        build_server(UdpClock(), parse(*credentials(tmp_path), "--trust-all", "--interfaces", "127.0.0.1"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert any(event.get("event") == "coap_trust_all" and event["log_level"].name == "warn" for event in seen)


def fake_adapters() -> list[SimpleNamespace]:
    def adapter(name: str, *ips: object) -> SimpleNamespace:
        return SimpleNamespace(name=name, ips=[SimpleNamespace(ip=ip) for ip in ips])

    return [adapter("lo", "127.0.0.1", ("::1", 0, 0)), adapter("eth0", "192.0.2.7", ("fe80::1", 0, 2),
                                                               ("2001:db8::7", 0, 0)),
            adapter("eth10", "198.51.100.1"), adapter("docker0", "172.17.0.1")]


def test_interfaces_pattern_matches_whole_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.ifaddr, "get_adapters", fake_adapters)
    monkeypatch.setattr(server_module, "ipv6_available", lambda: True)
    patterns = [re.compile("eth[0-9]")]
    assert server_module.pattern_addresses(patterns, True, True) == ["192.0.2.7", "2001:db8::7"]
    assert server_module.pattern_addresses([re.compile("eth.*"), re.compile("lo")], True, False) == [
        "127.0.0.1", "192.0.2.7", "198.51.100.1"]


def test_interfaces_pattern_joins_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module.ifaddr, "get_adapters", fake_adapters)
    options = parse("--interfaces", "10.9.9.9", "--interfaces-pattern", "docker.* lo", "--no-ipv6")
    assert [pattern.pattern for pattern in options["interfaces-pattern"]] == ["docker.*", "lo"]
    service = build_server(UdpClock(), options)
    assert service._addresses == ["10.9.9.9", "127.0.0.1", "172.17.0.1"]  # type: ignore[attr-defined]


def test_interfaces_pattern_on_this_host_finds_loopback() -> None:
    assert "127.0.0.1" in server_module.pattern_addresses([re.compile("lo")], True, False)


def test_bad_pattern_is_a_usage_error() -> None:
    with pytest.raises(usage.UsageError, match="regular expressions"):
        parse("--interfaces-pattern", "eth[")


def test_max_body_size_reaches_the_endpoints() -> None:
    service = build_server(UdpClock(), parse("--max-body-size", "1000", "--interfaces", "127.0.0.1"))
    assert service._params.max_body_size == 1000  # type: ignore[attr-defined]


def test_half_open_bound_and_timeout_reach_the_dtls_endpoint() -> None:
    """Issue 13 section 4: half-open handshakes have their own bound and a short timeout, both settable."""
    service = build_server(UdpClock(), parse("--psk-sandbox", "--max-half-open", "7", "--half-open-timeout", "2.5",
                                             "--interfaces", "127.0.0.1"))
    endpoint = service._dtls_link_factory()  # type: ignore[attr-defined]
    assert endpoint.peers.max_half_open == 7
    assert endpoint.server_configuration.handshake_timeout == 2.5
    default = build_server(UdpClock(), parse("--psk-sandbox", "--interfaces", "127.0.0.1"))
    assert default._dtls_link_factory().peers.max_half_open == 1000  # type: ignore[attr-defined]


def test_trust_without_anything_it_is_about_is_refused(tmp_path: Path) -> None:
    """Issue 16: ``--trust bad.pem`` with neither DTLS credentials nor --tcp was accepted and ignored."""
    bad = tmp_path / "bad.pem"
    bad.write_text("junk\n")
    with pytest.raises(usage.UsageError, match=r"--trust is about coaps \(DTLS\) or coaps\+tcp \(TLS\)"):
        parse("--trust", str(bad))
    with pytest.raises(usage.UsageError, match="no PEM certificate"):
        parse("--trust", str(bad), "--psk-sandbox")


@pytest.mark.integration
@pytest.mark.parametrize("option", ["--port", "--ready-port"])
def test_a_port_in_use_is_one_line_naming_the_option_and_exit_1(option: str) -> None:
    """Issue 16: the one shape for every role: cannot listen on <addr>:<port> (<option>): <reason>; choose another."""
    import socket
    import subprocess

    from tests.loopback import free_ports

    if option == "--port":
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        arguments = ["--port", str(port)]
    else:
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        arguments = ["--port", str(free_ports(1)[0]), "--ready-port", str(port)]
    try:
        result = subprocess.run([sys.executable, "-m", "nettester", "coap-server", "--interfaces", "127.0.0.1",
                                 *arguments], capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    output = result.stdout + result.stderr
    where = f"127.0.0.1:{port}" if option == "--port" else f"0.0.0.0:{port}"
    assert f"cannot listen on {where} ({option}): Address already in use; choose another {option}" in output, output
    assert result.returncode == 1 and "Traceback" not in output
