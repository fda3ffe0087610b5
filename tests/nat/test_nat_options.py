"""``nettester nat`` options: cf-nat's argument order, env vars, clear errors; the built service."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError

from nettester.interfaces import IReportingService
from nettester.nat.options import NatOptions
from nettester.nat.roles import build_nat
from nettester.nat.table import SizeLimit
from nettester.plugins.nat import nat


def parse(argv: list[str]) -> NatOptions:
    options = NatOptions()
    options.parseOptions(argv)
    return options


def test_options_after_the_positional_arguments_as_in_cf_nat() -> None:
    options = parse([":5784", "localhost:5684", "[::1]:5685", "-r", "-x", "--tnat", "1000", "--tlb", "500",
                     "-n", "7", "-f", "10", "-b", "20", "-s", "100:50", "--seed", "3"])
    assert options["listen"] == ("", 5784)
    assert options["destinations"] == ["localhost:5684", "[::1]:5685"]
    assert options["reverse"] and options["dtls-only"]
    assert (options["tnat"], options["tlb"], options["max-entries"]) == (1000, 500, 7)
    assert (options["forward-drop"], options["backward-drop"]) == (10.0, 20.0)
    assert options["size-limit"] == SizeLimit(100, 50.0)
    assert options["seed"] == 3


def test_drop_sets_both_directions_and_excludes_f_and_b() -> None:
    options = parse(["-d", "15", "127.0.0.1:5784", "h:1"])
    assert (options["forward-drop"], options["backward-drop"]) == (15.0, 15.0)
    with pytest.raises(UsageError, match="either -d"):
        parse([":5784", "h:1", "-d", "5", "-b", "3"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "listening address and at least one destination"),
        ([":5784"], "give at least one destination after ':5784'"),
        (["x", "h:1"], "--listen: expected host:port \\(port 0-65535\\)"),
        ([":5784", "h:0"], "destination: expected host:port \\(port 1-65535\\)"),
        ([":5784", "h"], "destination: expected host:port"),
        ([":5784", "h:1", "-d", "120"], "--drop: expected a percentage 0-100"),
        ([":5784", "h:1", "-s", "a"], "--size-limit: expected SIZE"),
        ([":5784", "h:1", "--tnat", "0"], "--tnat: expected a whole number of at least 1"),
        ([":5784", "h:1", "--nope"], "option --nope not recognized"),
    ],
)
def test_bad_arguments_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(argv)


def test_listen_and_destinations_options() -> None:
    options = parse(["--listen", "[::1]:5784", "--destinations", "a:1, b:2"])
    assert options["listen"] == ("::1", 5784) and options["destinations"] == ["a:1", "b:2"]
    options = parse(["--listen", ":1", "--destinations", "a:1", ":9", "c:3"])
    assert options["listen"] == ("", 9) and options["destinations"] == ["c:3"]
    with pytest.raises(UsageError, match="--destinations: expected host:port"):
        parse(["--listen", ":1", "--destinations", "a:1,b"])


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAT_LISTEN", ":5784")
    monkeypatch.setenv("NAT_DESTINATIONS", "node-0.coap:5684, node-1.coap:5684")
    monkeypatch.setenv("NAT_TIMEOUT_MS", "2000")
    monkeypatch.setenv("NAT_REVERSE", "true")
    monkeypatch.setenv("NAT_CONSOLE_PORT", "5799")
    options = parse([])
    assert options["destinations"] == ["node-0.coap:5684", "node-1.coap:5684"]
    assert options["tnat"] == 2000 and options["reverse"] and options["console-port"] == 5799
    assert parse([":1", "a:2", "--tnat", "9"])["tnat"] == 9  # the command line wins
    monkeypatch.setenv("NAT_DROP_PERCENT", "x")
    with pytest.raises(UsageError, match="NAT_DROP_PERCENT"):
        parse([])


def test_factory_builds_a_reporting_service_with_the_options() -> None:
    options = parse([":0", "127.0.0.1:5684", "127.0.0.1:5685", "--tnat", "2000", "--tlb", "1000", "-r",
                     "--no-stdin-console"])
    service = build_nat(MemoryReactorClock(), options)
    assert IReportingService.providedBy(service)
    table = service.proxy.table
    assert (table.nat_timeout, table.lb_timeout, table.reverse_update) == (2.0, 1.0, True)
    assert set(service.summary()) >= {"entries", "forwarded", "backwarded", "dropped"}
    assert [role.name for role in nat.roles] == ["nat"]
