"""RoleOptions: environment variables, precedence and clear errors."""

from typing import Any, ClassVar

import pytest
from twisted.python.usage import UsageError

from nettester.options import RoleOptions, choice, percentage, port_number, positive_float, positive_int


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


class _PositionalOptions(RoleOptions):
    optParameters: ClassVar[list[list[Any]]] = [
        ["clients", "c", 1, "Clients.", positive_int],
        ["interface", None, "", "Address to listen on."],
        ["count", None, 0, "A count.", int],
        ["ratio", None, 0.5, "A ratio.", float],
        ["suites", None, ("A", "B"), "Suites."],
        ["nothing", None, (), "Nothing by default."],
        ["example", None, "", "Cluster, e.g. \":15784;localhost:15884;1,---;localhost:25884;2\" or 'coap://host/path'."],
    ]
    optFlags: ClassVar[list[list[Any]]] = [["no-ipv4", None, "Do not: listen on IPv4"]]

    def parseArgs(self, *arguments: str) -> None:
        self["arguments"] = list(arguments)


def test_options_may_follow_positional_arguments() -> None:
    options = _PositionalOptions()
    options.parseOptions(["coap://h/x", "--clients", "5", "second", "-c", "6", "--", "--not-an-option"])
    assert options["clients"] == 6
    assert options["arguments"] == ["coap://h/x", "second", "--not-an-option"]


def test_an_unknown_option_after_an_argument_is_still_an_error() -> None:
    with pytest.raises(UsageError, match="option --frob not recognized; see --help"):
        _PositionalOptions().parseOptions(["x", "--frob"])


@pytest.mark.parametrize("spelling", ["--interface", "--interfaces"])
def test_interface_and_interfaces_are_one_option(spelling: str) -> None:
    options = _PositionalOptions()
    options.parseOptions([spelling, "127.0.0.1"])
    assert options["interface"] == "127.0.0.1"
    assert "--interfaces" not in options.getUsage()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--count", "abc"], "--count: expected a whole number, got 'abc'; see --help"),
        (["--ratio", "half"], "--ratio: expected a number, got 'half'; see --help"),
    ],
)
def test_plain_int_and_float_options_say_what_they_expect(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        _PositionalOptions().parseOptions(argv)
    assert str(raised.value) == message


def test_help_shows_defaults_as_typed_examples_whole_and_negated_flags_as_sentences() -> None:
    usage_text = _PositionalOptions().getUsage(width=80)
    flat = " ".join(usage_text.split())
    assert "[default: A, B]" in flat
    assert "(" + ")" not in usage_text and "[default: ]" not in usage_text and "[]" not in usage_text
    assert '":15784;localhost:15884;1,---;localhost:25884;2"' in usage_text
    assert "'coap://host/path'" in usage_text
    assert "Do not listen on IPv4." in flat and "Do not:" not in usage_text


def test_percentage_says_what_it_expects() -> None:
    assert percentage("0") == 0.0 and percentage("2.5") == 2.5 and percentage("100") == 100.0
    for bad in ("abc", "-1", "100.1"):
        with pytest.raises(ValueError, match=f"expected a percentage 0-100, got '{bad}'"):
            percentage(bad)


@pytest.mark.parametrize("role", ["coap-client", "coap-bench", "coap-receivetest", "stun-report", "keepalive-report",
                                  "plot"])
def test_roles_without_metrics_refuse_metrics_port(role: str) -> None:
    """A --metrics-port that nothing would serve is an error, not silently ignored."""
    from nettester.module import discover_roles

    options = discover_roles()[role].options()
    with pytest.raises(UsageError, match="--metrics-port: this role serves no metrics"):
        arguments = ["coap://127.0.0.1/test"] if role.startswith("coap") else ["server.jsonl", "client.jsonl"]
        options.parseOptions(["--metrics-port", "9100", *arguments])
