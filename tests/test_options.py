"""RoleOptions: environment variables, precedence and clear errors."""

from typing import Any, ClassVar

import pytest
from twisted.python.usage import UsageError

from nettester.options import RoleOptions, choice, port_number, positive_float, positive_int


class DemoOptions(RoleOptions):
    envVars: ClassVar[dict[str, str]] = {"port": "DEMO_PORT", "clients": "DEMO_CLIENTS", "tls": "DEMO_TLS"}
    optFlags: ClassVar[list[list[Any]]] = [["tls", None, "Use TLS."]]
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", 49665, "Port.", port_number],
        ["clients", None, 100, "Clients.", positive_int],
    ]


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DEMO_PORT", "DEMO_CLIENTS", "DEMO_TLS", "LOG_LEVEL", "LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    options = DemoOptions()
    options.parseOptions([])
    assert (options["port"], options["clients"], options["tls"]) == (49665, 100, 0)
    assert (options["log-level"], options["log-format"], options["stats-interval"]) == ("info", "text", 10.0)


def test_environment_overrides_default_and_command_line_overrides_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DEMO_PORT", "1234")
    monkeypatch.setenv("DEMO_CLIENTS", "7")
    monkeypatch.setenv("DEMO_TLS", "true")
    monkeypatch.setenv("LOG_LEVEL", "warning")
    options = DemoOptions()
    options.parseOptions(["--port", "4321"])
    assert options["port"] == 4321
    assert options["clients"] == 7
    assert options["tls"] == 1
    assert options["log-level"] == "warning"


def test_help_names_the_environment_variable() -> None:
    assert "[env: DEMO_PORT]" in DemoOptions().getUsage()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "abc"], "--port: expected a port number 0-65535, got 'abc'"),
        (["--port", "70000"], "--port: expected a port number 0-65535, got 70000"),
        (["--clients", "0"], "--clients: expected a whole number of at least 1"),
        (["--log-format", "xml"], "--log-format: expected one of text, json"),
        (["--log-level", "loud"], "--log-level: unknown log level 'loud'"),
    ],
)
def test_bad_command_line_value_names_option_and_expectation(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        DemoOptions().parseOptions(argv)


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "http")
    with pytest.raises(UsageError, match="environment variable DEMO_PORT='http'"):
        DemoOptions()
    monkeypatch.delenv("DEMO_PORT")
    monkeypatch.setenv("DEMO_TLS", "maybe")
    with pytest.raises(UsageError, match="DEMO_TLS='maybe': expected true or false"):
        DemoOptions()


def test_coercers() -> None:
    assert port_number("0") == 0
    assert positive_float("0.5") == 0.5
    with pytest.raises(ValueError, match="above 0"):
        positive_float("0")
    assert choice("a", "b")("B") == "b"
