"""The NAT console: command parsing and answers, on a StringTransport, no sockets."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from nettester.addresses import parse_host_port
from nettester.nat.console import EXIT, HELP, ConsoleProtocol, NatConsole
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable


class ResolvingClock(Clock):
    """A Clock whose resolver knows only 'known.test'."""

    def resolve(self, name: str, timeout: Any = None) -> Deferred[str]:
        if name == "known.test":
            return succeed("10.9.9.9")
        return fail(DNSLookupError(name))


def make_console() -> tuple[NatConsole, NatProxy]:
    table = NatTable([("10.0.0.1:5684", ("10.0.0.1", 5684))], rng=random.Random(1))
    proxy = NatProxy(ResolvingClock(), table, DropPolicy(), ("127.0.0.1", 0))
    return NatConsole(proxy), proxy


def run(console: NatConsole, line: str) -> Any:
    results: list[Any] = []
    console.execute(line).addBoth(results.append)
    (result,) = results
    return result


def test_commands_and_answers() -> None:
    console, proxy = make_console()
    for port in range(5):
        proxy.table.forward(("192.0.2.1", port), 0.0)
    assert run(console, "") == "5 NAT entries, reverse address update disabled.\nDestination: 10.0.0.1:5684, usage: 5"
    assert run(console, "info") == run(console, "   ")
    assert run(console, "help") == HELP == run(console, "?")
    assert run(console, "clear 2") == "cleared 0 NAT entries."  # no socket was ever opened
    assert len(proxy.table) == 3
    assert run(console, "clear x") == "usage: clear [n] (n a whole number)"
    assert run(console, "rebalance") == "reassigned 0 destinations of 3."
    assert run(console, "add known.test:5684") == "added destination known.test:5684."
    assert proxy.table.destinations()[1].address == ("10.9.9.9", 5684)
    assert run(console, "add known.test:5684") == "destination known.test:5684 is already there."
    assert run(console, "add unknown.test:5684").startswith("cannot resolve unknown.test")
    assert run(console, "add [::1]:5684") == "added destination [::1]:5684."  # both families are served
    assert run(console, "add nonsense") == "expected host:port (port 1-65535), got 'nonsense'"
    assert run(console, "add :5684") == "expected host:port with a host, got ':5684'"
    assert run(console, "add") == "usage: add <host:port>"
    assert run(console, "remove 10.0.0.1:5684") == "removed destination 10.0.0.1:5684."
    assert run(console, "remove 10.0.0.1:5684") == "unknown destination 10.0.0.1:5684; 'info' lists them."
    assert run(console, "reverse on") == "reverse address update enabled." and proxy.table.reverse_update
    assert run(console, "REVERSE off") == "reverse address update disabled." and not proxy.table.reverse_update
    assert run(console, "reverse maybe") == "usage: reverse on|off"
    assert run(console, "reassign") == "reassigned 0 NAT entries to new outgoing ports."
    assert run(console, "exit") is EXIT and run(console, "quit") is EXIT
    assert run(console, "frobnicate 3") == "unknown command 'frobnicate'; type 'help' for the commands."


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80) | st.builds(lambda c, a: f"{c} {a}", st.sampled_from(
    ["clear", "add", "remove", "reverse", "info", "rebalance", "reassign", "help"]), st.text(max_size=40)))
@example("clear ¹")  # a digit to str.isdigit, not to int()
@example("add x:²")
def test_any_line_gets_an_answer_never_an_exception(line: str) -> None:
    console, _ = make_console()
    answer = run(console, line)
    assert answer is EXIT or isinstance(answer, str)


def test_protocol_answers_in_order_and_exit_closes_then_calls_on_exit() -> None:
    console, _ = make_console()
    exits: list[bool] = []
    protocol = ConsoleProtocol(console, on_exit=lambda: exits.append(True))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"reverse on\r\ninfo\nexit\n")
    assert transport.value().decode().splitlines() == [
        "reverse address update enabled.",
        "0 NAT entries, reverse address update enabled.",
        "Destination: 10.0.0.1:5684, usage: 0",
        "bye.",
    ]
    assert transport.disconnecting and exits == []
    protocol.connectionLost(None)
    assert exits == [True]


def test_end_of_stdin_keeps_running_but_a_tcp_session_closes() -> None:
    console, _ = make_console()
    stdin = ConsoleProtocol(console, on_exit=lambda: None)
    stdin.makeConnection(StringTransport())
    stdin.readConnectionLost()
    assert not stdin.transport.disconnecting
    tcp = ConsoleProtocol(console)
    tcp.makeConnection(StringTransport())
    tcp.dataReceived(b"info\n")
    tcp.readConnectionLost()
    assert tcp.transport.disconnecting


def test_overlong_line_closes_the_session() -> None:
    console, _ = make_console()
    protocol = ConsoleProtocol(console)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(b"x" * 5000)
    assert protocol.transport.disconnecting


def test_parse_host_port() -> None:
    assert parse_host_port("localhost:5684") == ("localhost", 5684)
    assert parse_host_port("[::1]:5684") == ("::1", 5684)
    assert parse_host_port(":5784", default_host="") == ("", 5784)
    for bad in ("", "x", ":0", "a:65536", "a:-1", "a:b", ":5784"):
        try:
            parse_host_port(bad)
        except ValueError as error:
            assert "expected host:port" in str(error)
        else:
            raise AssertionError(bad)


class FakeUdpPort:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def getHost(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("UDP", "127.0.0.1", 40000)

    def write(self, datagram: bytes, address: Any) -> None:
        self.written.append((datagram, address))

    def stopListening(self) -> None:
        pass


class FlakyDnsClock(Clock):
    """Resolves 'late.test' only from the third attempt on; UDP ports are fakes."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakeUdpPort:
        return FakeUdpPort()

    def resolve(self, name: str, timeout: Any = None) -> Deferred[str]:
        self.attempts += 1
        return succeed("10.7.7.7") if self.attempts >= 3 else fail(DNSLookupError(name))


def test_command_line_destinations_are_retried_until_they_resolve() -> None:
    from nettester.nat.proxy import RESOLVE_RETRY

    clock = FlakyDnsClock()
    proxy = NatProxy(clock, NatTable([]), DropPolicy(), ("127.0.0.1", 0), ["late.test:5684"])
    proxy.startService()
    assert proxy.table.destinations() == [] and clock.attempts == 1
    clock.advance(RESOLVE_RETRY)
    assert proxy.table.destinations() == [] and clock.attempts == 2
    clock.advance(RESOLVE_RETRY)
    assert [d.address for d in proxy.table.destinations()] == [("10.7.7.7", 5684)]
    assert clock.getDelayedCalls() == []
    proxy.stopService()


def test_stopping_cancels_pending_retries() -> None:
    clock = FlakyDnsClock()
    proxy = NatProxy(clock, NatTable([]), DropPolicy(), ("127.0.0.1", 0), ["late.test:5684"])
    proxy.startService()
    assert len(clock.getDelayedCalls()) == 1
    proxy.stopService()
    assert clock.getDelayedCalls() == []


def test_answers_can_go_to_another_output_than_the_transport() -> None:
    console, _ = make_console()
    written: list[bytes] = []
    protocol = ConsoleProtocol(console, output=written.append)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"reverse on\n")
    assert written == [b"reverse address update enabled.\n"] and transport.value() == b""
