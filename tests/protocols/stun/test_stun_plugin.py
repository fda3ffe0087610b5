"""The stun module as the core sees it: discovery, interfaces, options and env vars, local scenario."""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.python.usage import UsageError
from zope.interface.verify import verifyObject

from nettester.interfaces import ILocalScenario, IProtocolModule, IReportingService, IRole
from nettester.module import discover_modules
from nettester.plugins.stun import stun
from nettester.protocols.stun.options import (
    SecondsRange,
    StunClientOptions,
    StunServerOptions,
    seconds_range,
    transport_address,
)
from nettester.protocols.stun.roles import build_client, build_server
from tests.loopback import wait_until


@pytest.fixture
def any_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parse the default --clients 1000 on any machine: a fresh one may have a hard RLIMIT_NOFILE of 1024
    (the limit check itself is tested with raise_open_file_limit's own tests)."""
    monkeypatch.setattr("nettester.protocols.stun.options.raise_open_file_limit", lambda clients: clients)


def parse(options_class: type, *argv: str) -> Any:
    options = options_class()
    options.parseOptions(list(argv))
    return options


def test_module_is_discovered_and_provides_its_interfaces() -> None:
    assert stun in discover_modules()
    assert verifyObject(IProtocolModule, stun)
    assert [role.name for role in stun.roles] == ["stun-server", "stun-client", "stun-report"]
    for role in stun.roles:
        assert verifyObject(IRole, role)


def test_server_and_client_services_report(any_descriptor_limit: None) -> None:
    from twisted.internet.task import Clock

    server = build_server(Clock(), parse(StunServerOptions))
    client = build_client(Clock(), parse(StunClientOptions, "--server", "192.0.2.1"))
    for service in (server, client):
        assert verifyObject(IReportingService, service)
        assert service.summary()


def test_counters_are_exported_for_prometheus(any_descriptor_limit: None) -> None:
    from prometheus_client.exposition import generate_latest
    from twisted.internet.task import Clock

    from nettester.metrics import new_registry

    server = build_server(Clock(), parse(StunServerOptions))
    client = build_client(Clock(), parse(StunClientOptions, "--server", "192.0.2.1"))
    server.counters.dropped.inc("not_stun")
    text = generate_latest(new_registry(server.metrics, client.metrics)).decode()
    for name in (
        "nettester_stun_server_requests_total",
        'nettester_stun_server_dropped_total{reason="not_stun"} 1.0',
        "nettester_stun_client_timeouts_total",
        "nettester_stun_client_mapping_changes_total",
        "nettester_stun_client_clients 0.0",
    ):
        assert name in text


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_fuzz_option_parsers_raise_only_value_error(text: str) -> None:
    for parser in (seconds_range, transport_address):
        with contextlib.suppress(ValueError):
            parser(text)


def test_client_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, any_descriptor_limit: None) -> None:
    options = parse(StunClientOptions, "--server", "stun.example")
    assert (options["port"], options["clients"], options["interval"]) == (3478, 1000, 10.0)
    assert options["start-delay"] == (1.0, 10.0) and str(options["start-delay"]) == "1-10"
    monkeypatch.setenv("STUN_SERVER_IP", "198.51.100.1")
    monkeypatch.setenv("STUN_SERVER_PORT", "3479")
    monkeypatch.setenv("STUN_CLIENT_COUNT", "20")
    options = parse(StunClientOptions, "--clients", "30")
    assert (options["server"], options["port"], options["clients"]) == ("198.51.100.1", 3479, 30)


def test_client_needs_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STUN_SERVER_IP", raising=False)
    with pytest.raises(UsageError, match="--server is required"):
        parse(StunClientOptions)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server", "x", "--clients", "0"], "--clients: expected a whole number of at least 1"),
        (["--server", "x", "--interval", "-1"], "--interval: expected a number above 0"),
        (["--server", "x", "--start-delay", "5-1"], "--start-delay: expected 0 <= LOW <= HIGH"),
        (["--server", "x", "--port", "70000"], "--port: expected a port number"),
        (["--server", "x", "--clients", "100000000"], "--clients: 100000000 clients need"),
    ],
)
def test_client_bad_values_say_what_was_expected(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(StunClientOptions, *argv)


def test_seconds_range() -> None:
    assert seconds_range("0") == SecondsRange(0.0, 0.0)
    assert seconds_range("1-10") == (1.0, 10.0)
    with pytest.raises(ValueError, match="LOW-HIGH"):
        seconds_range("soon")


def test_transport_address() -> None:
    assert transport_address("192.0.2.1:3479") == ("192.0.2.1", 3479)
    assert transport_address("[2001:db8::1]:3479") == ("2001:db8::1", 3479)
    for bad in ("192.0.2.1", "host:3478", "192.0.2.1:99999"):
        with pytest.raises(ValueError, match="IP:PORT"):
            transport_address(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--other-address", "192.0.2.2:3479"], "needs --interface"),
        (["--interface", "192.0.2.1", "--other-address", "192.0.2.1:3479"], "must be another IP"),
        (["--interface", "192.0.2.1", "--other-address", "[2001:db8::1]:3479"], "must be another IP"),
        (["--interface", "192.0.2.1", "--other-address", "192.0.2.2:3478"], "must differ from --port"),
        (["--interface", "example.com"], "--interface: expected an IPv4 or IPv6 address"),
    ],
)
def test_server_rfc5780_option_checks(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(StunServerOptions, *argv)


def test_server_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUN_SERVER_PORT", "3490")
    monkeypatch.setenv("STUN_SERVER_TCP", "true")
    options = parse(StunServerOptions, "--interface", "::")
    assert (options["port"], options["tcp"], options["interface"]) == (3490, 1, "::")


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_local_scenario_passes_on_loopback() -> Generator[Any, Any, None]:
    from twisted.internet import reactor

    scenario = stun.local_scenario(reactor, {"duration": 3.0})
    assert verifyObject(ILocalScenario, scenario)
    scenario.service.startService()
    client = scenario.service.client
    try:
        # every one of the 20 clients answered twice
        yield wait_until(lambda: client.counters.responses.value >= 40, timeout=30.0, step=0.05)
    finally:
        yield scenario.service.stopService()
    verdict = scenario.verdict()
    assert verdict.passed, verdict.evidence
    assert verdict.evidence["clients"] == 20 and verdict.evidence["responses"] >= 20
