"""The NAT emulator on real loopback sockets: echo servers as destinations.

Each echo server answers ``<its port>|<data>`` and remembers the source
ports it saw, so the tests see the NAT's outgoing ports and destinations.
"""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import ClientFactory, DatagramProtocol
from twisted.protocols.basic import LineOnlyReceiver

from nettester.nat.console import NatRoleService
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable, SizeLimit
from tests.loopback import has_ipv6_loopback, wait_until

pytestmark = pytest.mark.integration
TIMEOUT = 5.0


class Echo(DatagramProtocol):
    """Answers ``<port>|<data>``; records each datagram's source port."""

    def __init__(self) -> None:
        self.sources: list[int] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.sources.append(addr[1])
        self.transport.write(b"%d|" % self.transport.getHost().port + data, addr)


class Client(DatagramProtocol):
    def __init__(self) -> None:
        self.answers: DeferredQueue[bytes] = DeferredQueue()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.answers.put(data)


class ConsoleClient(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self) -> None:
        self.lines: DeferredQueue[str] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.put(line.decode())

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


def timed(d: Deferred[Any]) -> Deferred[Any]:
    return d.addTimeout(TIMEOUT, reactor)


class Lab:
    """Echo destinations, a NAT in front of them, clients, all on 127.0.0.1."""

    def __init__(self, destinations: int = 3, policy: DropPolicy | None = None, lb_timeout: float = 15.0) -> None:
        self.echoes = [Echo() for _ in range(destinations + 1)]  # the last one is added later
        self.ports = [reactor.listenUDP(0, echo, interface="127.0.0.1") for echo in self.echoes]
        self.names = [f"127.0.0.1:{port.getHost().port}" for port in self.ports]
        rng = random.Random(5)
        table = NatTable([], nat_timeout=30.0, lb_timeout=lb_timeout, rng=rng)
        self.proxy = NatProxy(reactor, table, policy or DropPolicy(rng=rng), ("127.0.0.1", 0),
                              self.names[:destinations])
        self.service = NatRoleService(reactor, self.proxy, console_port=0)
        self.service.startService()
        self.clients: list[tuple[Client, Any]] = []

    def client(self) -> Client:
        client = Client()
        self.clients.append((client, reactor.listenUDP(0, client, interface="127.0.0.1")))
        return client

    def keys(self) -> list[int | None]:
        """The NAT socket key of each client, in the order they were created."""
        return [self.proxy.table.key_of(("127.0.0.1", port.getHost().port)) for _, port in self.clients]

    def send(self, client: Client, data: bytes) -> None:
        port = next(port for c, port in self.clients if c is client)
        port.write(data, ("127.0.0.1", self.proxy.port))

    @pytest_twisted.inlineCallbacks
    def exchange(self, client: Client, data: bytes) -> Generator[Any, Any, tuple[int, int]]:
        """Send through the NAT; (destination port, NAT source port seen there)."""
        self.send(client, data)
        answer = yield timed(client.answers.get())
        port_text, _, echoed = answer.partition(b"|")
        assert echoed == data
        destination = int(port_text)
        echo = self.echoes[[p.getHost().port for p in self.ports].index(destination)]
        return destination, echo.sources[-1]

    @pytest_twisted.inlineCallbacks
    def exchange_retrying(self, client: Client, data: bytes) -> Generator[Any, Any, int]:
        """Send every 50 ms until answered, as a client with a short retransmission timer; the destination port."""
        for _ in range(int(TIMEOUT / 0.05)):
            self.send(client, data)
            try:
                answer = yield client.answers.get().addTimeout(0.05, reactor)
            except defer.TimeoutError:
                continue
            return int(answer.partition(b"|")[0])
        raise AssertionError("never answered")

    @pytest_twisted.inlineCallbacks
    def exchange_all(self, clients: list[Client], data: bytes) -> Generator[Any, Any, list[tuple[int, int]]]:
        results = []
        for client in clients:
            results.append((yield self.exchange(client, data)))
        return results

    @pytest_twisted.inlineCallbacks
    def command(self, line: str) -> Generator[Any, Any, str]:
        answer = yield self.service.console.execute(line)
        return answer

    @pytest_twisted.inlineCallbacks
    def close(self) -> Generator[Any, Any, None]:
        yield self.service.stopService()
        for _, port in self.clients:
            yield port.stopListening()
        for port in self.ports:
            yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_sticky_entries_clear_reassign_rebalance_add_remove() -> Generator[Any, Any, None]:
    lab = Lab()
    try:
        clients = [lab.client() for _ in range(12)]
        first = yield lab.exchange_all(clients, b"hello")
        # Sticky: the same destination and NAT port for every later datagram.
        for index, client in enumerate(clients):
            assert (yield lab.exchange(client, b"again")) == first[index]
        used = {destination for destination, _ in first}
        assert len(used) == 3, "12 clients over 3 destinations use all of them"
        info = (yield lab.command("")).splitlines()
        assert info[0] == "12 NAT entries, reverse address update disabled."
        assert sorted(info[1:]) == sorted(
            f"Destination: {name}, usage: {sum(1 for d, _ in first if f'127.0.0.1:{d}' == name)}"
            for name in lab.names[:3]
        )

        # clear 1 then clear: the client comes back through a new NAT entry (a new socket;
        # its port number is the OS's pick, which may even be a just-freed one).
        old_keys = lab.keys()
        assert (yield lab.command("clear 1")) == "cleared 1 NAT entries."
        assert (yield lab.command("clear")) == "cleared 11 NAT entries."
        assert len(lab.proxy.table) == 0
        yield lab.exchange(clients[0], b"x")
        assert lab.keys()[0] not in old_keys

        for client in clients[1:]:
            yield lab.exchange(client, b"fill")
        before = yield lab.exchange_all(clients, b"b")

        # rebalance: same NAT port, a new random destination for some.
        answer = yield lab.command("rebalance")
        changed = int(answer.split()[1])
        assert answer == f"reassigned {changed} destinations of 12."
        assert changed > 0
        after = yield lab.exchange_all(clients, b"r")
        assert [port for _, port in after] == [port for _, port in before]
        assert sum(a[0] != b[0] for a, b in zip(after, before, strict=True)) == changed

        # reassign: every entry gets a new NAT port.
        keys_before = lab.keys()
        assert (yield lab.command("reassign")) == "reassigned 12 NAT entries to new outgoing ports."
        reassigned = yield lab.exchange_all(clients, b"n")
        assert not set(lab.keys()) & set(keys_before)
        # New sockets, so new ports, except where the OS happens to hand a freed number back.
        assert sum(new != old for (_, new), (_, old) in zip(reassigned, after, strict=True)) >= len(clients) - 1

        # add a fourth destination, rebalance until it is used; remove the first.
        assert (yield lab.command(f"add {lab.names[3]}")) == f"added destination {lab.names[3]}."
        assert (yield lab.command(f"add {lab.names[3]}")) == f"destination {lab.names[3]} is already there."
        yield lab.command("rebalance")
        fourth = lab.ports[3].getHost().port
        assert fourth in {destination for destination, _ in (yield lab.exchange_all(clients, b"4"))}
        assert (yield lab.command(f"remove {lab.names[0]}")) == f"removed destination {lab.names[0]}."
        removed_port = lab.ports[0].getHost().port
        seen_before = len(lab.echoes[0].sources)
        for client in clients:
            assert (yield lab.exchange(client, b"5"))[0] != removed_port
        assert len(lab.echoes[0].sources) == seen_before
        assert (yield lab.command("remove 127.0.0.1:1")) == "unknown destination 127.0.0.1:1; 'info' lists them."
        assert (yield lab.command("add nohost.invalid:5")).startswith("cannot resolve nohost.invalid")
        assert (yield lab.command("reverse on")) == "reverse address update enabled."
        assert lab.proxy.table.reverse_update is True
        assert lab.proxy.summary()["forwarded"] == lab.proxy.summary()["backwarded"]
    finally:
        yield lab.close()


@pytest_twisted.inlineCallbacks
def test_tcp_console_answers_and_exit_closes_the_session() -> Generator[Any, Any, None]:
    lab = Lab(destinations=2)
    try:
        factory = ClientFactory.forProtocol(ConsoleClient)
        from twisted.internet.endpoints import TCP4ClientEndpoint

        console = yield timed(TCP4ClientEndpoint(reactor, "127.0.0.1", lab.service.console_port).connect(factory))
        console.sendLine(b"info")
        lines = []
        for _ in range(3):
            lines.append((yield timed(console.lines.get())))
        assert lines == [
            "0 NAT entries, reverse address update disabled.",
            f"Destination: {lab.names[0]}, usage: 0",
            f"Destination: {lab.names[1]}, usage: 0",
        ]
        console.sendLine(b"bogus")
        assert (yield timed(console.lines.get())) == "unknown command 'bogus'; type 'help' for the commands."
        console.sendLine(b"?")
        assert (yield timed(console.lines.get())).startswith("help or ?")
        for _ in range(8):
            yield timed(console.lines.get())
        console.sendLine(b"quit")
        assert (yield timed(console.lines.get())) == "bye."
        yield timed(console.closed)
        assert lab.service.running
    finally:
        yield lab.close()


@pytest_twisted.inlineCallbacks
def test_forward_and_backward_drops_follow_the_percentages() -> Generator[Any, Any, None]:
    lab = Lab(destinations=1, policy=DropPolicy(forward_percent=30.0, backward_percent=50.0,
                                                rng=random.Random(11)))
    try:
        client = lab.client()
        echo = lab.echoes[0]
        dropped = lab.proxy.dropped
        for batch in range(1, 21):  # in batches: a burst of 400 could overflow a socket buffer
            for index in range(20):
                lab.send(client, b"%d" % index)
            yield wait_until(lambda total=20 * batch: dropped.get("forward_random") + len(echo.sources) == total)
            yield wait_until(lambda: dropped.get("backward_random") + len(client.answers.pending) == len(echo.sources))
        assert 80 < dropped.get("forward_random") < 160
        assert 0.35 < dropped.get("backward_random") / len(echo.sources) < 0.65
    finally:
        yield lab.close()


@pytest_twisted.inlineCallbacks
def test_size_limit_and_dtls_filter() -> Generator[Any, Any, None]:
    lab = Lab(destinations=1, policy=DropPolicy(size_limit=SizeLimit(20), dtls_only=True, rng=random.Random(1)))
    try:
        client = lab.client()
        record = bytes([23, 254, 253]) + bytes(10)
        lab.send(client, b"\x40\x01\x00\x01")  # CoAP, not DTLS
        lab.send(client, record + bytes(8))  # 21 bytes
        yield wait_until(lambda: lab.proxy.dropped.total == 2)
        assert lab.proxy.dropped.get("not_dtls") == 1 and lab.proxy.dropped.get("size_limit") == 1
        lab.send(client, record + bytes(7))  # 20 bytes: passes; the echo adds "<port>|" and is dropped back
        yield wait_until(lambda: lab.proxy.dropped.total == 3)
        assert len(lab.echoes[0].sources) == 1
        assert lab.proxy.dropped.get("not_dtls") == 2
    finally:
        yield lab.close()


@pytest_twisted.inlineCallbacks
def test_a_silent_destination_goes_stale_and_is_probed_back() -> Generator[Any, Any, None]:
    lab = Lab(destinations=2, lb_timeout=0.2)
    try:
        clients = [lab.client() for _ in range(10)]
        first = yield lab.exchange_all(clients, b"hello")
        dead_port = lab.ports[0].getHost().port
        live_port = lab.ports[1].getHost().port
        assert {destination for destination, _ in first} == {dead_port, live_port}
        yield lab.ports[0].stopListening()
        # Clients of the silent destination are moved once it has been silent for --tlb.
        for client in clients:
            assert (yield lab.exchange_retrying(client, b"again")) == live_port
        assert lab.proxy.table.stale_marked == 1
        info = yield lab.command("info")
        assert f"Destination: {lab.names[0]}, usage: 0" in info.splitlines()
        # It comes back; after another --tlb it is probed with new entries, and answers.
        lab.ports[0] = reactor.listenUDP(dead_port, lab.echoes[0], interface="127.0.0.1")
        stale_since = lab.proxy.table.destinations()[0].stale_since
        assert stale_since is not None
        yield wait_until(lambda: reactor.seconds() - stale_since > 0.2, what="--tlb since it went stale")
        newcomers = [lab.client() for _ in range(10)]
        answered_by = set()
        for client in newcomers:
            answered_by.add((yield lab.exchange_retrying(client, b"new")))
        assert answered_by == {dead_port, live_port}
        assert lab.proxy.table.destinations()[0].stale_since is None
    finally:
        yield lab.close()


class Relay(DatagramProtocol):
    """A destination that lets another one answer: passes each datagram, with its source, to ``other``."""

    def __init__(self, other: tuple[str, int]) -> None:
        self.other = other

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.transport.write(b"R %s %d|" % (addr[0].encode(), addr[1]) + data, self.other)


class AnswerForRelay(Echo):
    """Echoes; for a relayed datagram, answers the original source, from its own address."""

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if data.startswith(b"R "):
            header, _, data = data.partition(b"|")
            _, host, port = header.split()
            addr = (host.decode(), int(port))
        super().datagramReceived(data, addr)


@pytest_twisted.inlineCallbacks
def test_reverse_address_update_moves_the_entry_to_the_answering_destination() -> Generator[Any, Any, None]:
    answering = reactor.listenUDP(0, AnswerForRelay(), interface="127.0.0.1")
    answering_address = ("127.0.0.1", answering.getHost().port)
    relay = reactor.listenUDP(0, Relay(answering_address), interface="127.0.0.1")
    relay_address = ("127.0.0.1", relay.getHost().port)
    lab = Lab(destinations=0)
    try:
        yield lab.command(f"add 127.0.0.1:{relay_address[1]}")
        client = lab.client()
        client_address = ("127.0.0.1", lab.clients[-1][1].getHost().port)
        table = lab.proxy.table
        # An answer from an address that is no destination passes, and counts.
        lab.send(client, b"one")
        assert (yield timed(client.answers.get())) == b"%d|one" % answering_address[1]
        assert table.violations == 1 and table.destination_of(client_address) == relay_address
        # From a known destination, without reverse update: passes, counts, the entry stays.
        yield lab.command(f"add 127.0.0.1:{answering_address[1]}")
        lab.send(client, b"two")
        yield timed(client.answers.get())
        assert table.violations == 2 and table.destination_of(client_address) == relay_address
        # With reverse update the entry moves to the destination that answered ...
        yield lab.command("reverse on")
        lab.send(client, b"three")
        yield timed(client.answers.get())
        assert table.violations == 3 and table.destination_of(client_address) == answering_address
        # ... and talks to it directly from then on.
        lab.send(client, b"four")
        assert (yield timed(client.answers.get())) == b"%d|four" % answering_address[1]
        assert table.violations == 3
    finally:
        yield lab.close()
        yield relay.stopListening()
        yield answering.stopListening()


@pytest_twisted.inlineCallbacks
def test_ipv6_loopback() -> Generator[Any, Any, None]:
    echo = Echo()
    echo_port = reactor.listenUDP(0, echo, interface="::1")
    proxy = NatProxy(reactor, NatTable([], rng=random.Random(1)), DropPolicy(), ("::1", 0),
                     [f"[::1]:{echo_port.getHost().port}"])
    proxy.startService()
    client = Client()
    client_port = reactor.listenUDP(0, client, interface="::1")
    try:
        client_port.write(b"six", ("::1", proxy.port))
        answer = yield timed(client.answers.get())
        assert answer == b"%d|six" % echo_port.getHost().port
        assert echo.sources[0] != client_port.getHost().port
    finally:
        yield proxy.stopService()
        yield client_port.stopListening()
        yield echo_port.stopListening()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
@pytest_twisted.inlineCallbacks
def test_ipv4_and_ipv6_destinations_together_and_rebalance_across_families() -> Generator[Any, Any, None]:
    echoes = [Echo(), Echo()]
    ports = [reactor.listenUDP(0, echoes[0], interface="127.0.0.1"), reactor.listenUDP(0, echoes[1], interface="::1")]
    names = [f"127.0.0.1:{ports[0].getHost().port}", f"[::1]:{ports[1].getHost().port}"]
    proxy = NatProxy(reactor, NatTable([], rng=random.Random(3)), DropPolicy(), ("127.0.0.1", 0), names)
    proxy.startService()
    clients = [(Client(), None) for _ in range(10)]
    clients = [(client, reactor.listenUDP(0, client, interface="127.0.0.1")) for client, _ in clients]
    try:
        yield wait_until(lambda: len(proxy.table.destinations()) == 2)

        @pytest_twisted.inlineCallbacks
        def round_trip(data: bytes) -> Generator[Any, Any, list[int]]:
            destinations = []
            for client, port in clients:
                port.write(data, ("127.0.0.1", proxy.port))
                answer = yield timed(client.answers.get())
                destinations.append(int(answer.partition(b"|")[0]))
            return destinations

        first = yield round_trip(b"a")
        assert set(first) == {port.getHost().port for port in ports}, "both families serve"
        for _ in range(20):  # rebalance until some entry changes family, then it still gets answers
            proxy.rebalance()
            after = yield round_trip(b"b")
            if after != first:
                break
        assert after != first
        assert proxy.summary()["forwarded"] == proxy.summary()["backwarded"]
        assert proxy.summary()["entries"] == len(clients)
    finally:
        yield proxy.stopService()
        for _, port in clients:
            yield port.stopListening()
        for port in ports:
            yield port.stopListening()
