"""One command line across every installed role: short flags, numeric values, help text."""

import re
from typing import Any

import pytest
from twisted.python import reflect
from twisted.python.usage import UsageError

from nettester.module import discover_roles

ROLES = discover_roles()


def _parameters(options: type) -> list[list[Any]]:
    parameters: list[list[Any]] = []
    reflect.accumulateClassList(options, "optParameters", parameters)
    return parameters


def test_a_short_flag_means_the_same_long_option_in_every_role() -> None:
    meanings: dict[str, set[str]] = {}
    for role in ROLES.values():
        for short, name in role.options().short_flags().items():
            meanings.setdefault(short, set()).add(name)
    clashes = {short: sorted(names) for short, names in meanings.items() if len(names) > 1}
    assert not clashes, f"short flags with more than one meaning: {clashes}"


NUMERIC = sorted(
    (name, parameter[0])
    for name, role in ROLES.items()
    for parameter in _parameters(role.options)
    if isinstance(parameter[2], (int, float)) and not isinstance(parameter[2], bool) and len(parameter) > 4
)


@pytest.mark.parametrize(("role", "option"), NUMERIC)
def test_every_numeric_option_says_what_it_expects(role: str, option: str) -> None:
    with pytest.raises(UsageError) as raised:
        ROLES[role].options().parseOptions([f"--{option}", "abc"])
    assert re.fullmatch(rf"--{option}: expected .+, got 'abc'.*; see --help", str(raised.value)), str(raised.value)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_help_has_no_python_reprs(role: str) -> None:
    usage_text = ROLES[role].options().getUsage(width=80)
    assert not re.search(r"\[default: (\(|\[|\]|$)", usage_text, re.MULTILINE), usage_text
    assert "Do not:" not in usage_text


BINDING = sorted(name for name, role in ROLES.items() if {"interface", "interfaces"} & set(role.options().docs))


def test_the_roles_that_bind_addresses_are_all_checked() -> None:
    assert {"keepalive-server", "stun-server", "coap-server"} <= set(BINDING)


@pytest.mark.parametrize("role", BINDING)
@pytest.mark.parametrize("spelling", ["--interface", "--interfaces"])
def test_both_interface_spellings_are_accepted(role: str, spelling: str) -> None:
    options = ROLES[role].options()
    options.parseOptions([spelling, "127.0.0.1", *(["--server", "h"] if "server" in options.docs else [])])
    value = options.get("interface", options.get("interfaces"))
    assert value in ("127.0.0.1", ("127.0.0.1",))


def test_options_after_the_uri_of_a_coap_client_role() -> None:
    options = ROLES["coap-bench"].options()
    options.parseOptions(["coap://127.0.0.1:5683/benchmark", "--clients", "5"])
    assert options["clients"] == 5
