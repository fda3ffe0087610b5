"""The NAT proxy's socket handling on a fake reactor: sockets per entry, expiry, reassign, drops."""

from __future__ import annotations

import random
import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock

from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable, SizeLimit
from tests.logcapture import log_events

A = ("10.0.0.1", 5684)
B = ("10.0.0.2", 5684)


class FakePort:
    """The public port (a DatagramProtocol's transport) or an outgoing socket (a receive callback)."""

    def __init__(self, number: int, protocol: Any = None, receive: Any = None, family: int = socket.AF_INET) -> None:
        self.number = number
        self.family = family
        self.protocol = protocol
        self.receive = receive
        self.written: list[tuple[bytes, Any]] = []
        self.open = True
        self.refuse = False

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", self.number)

    def write(self, datagram: bytes, address: Any) -> None:
        if self.refuse:
            raise OSError(105, "No buffer space available")
        self.written.append((datagram, address))

    def stopListening(self) -> None:
        self.open = False


class FakeUdpReactor(Clock):
    def __init__(self, socket_limit: int = 1000) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self._limit = socket_limit

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakePort:
        fake = FakePort(port, protocol)
        self.ports.append(fake)
        protocol.transport = fake
        return fake

    def open_socket(self, family: int, receive: Any) -> FakePort:
        """NatProxy's open_socket: an outgoing socket, or EMFILE past the limit."""
        if len(self.open_ports()) >= self._limit:
            raise OSError(24, "Too many open files")
        fake = FakePort(40000 + len(self.ports), receive=receive, family=family)
        self.ports.append(fake)
        return fake

    def open_ports(self) -> list[FakePort]:
        return [p for p in self.ports if p.open]


def proxy(reactor: FakeUdpReactor, *destinations: tuple[str, int], policy: DropPolicy | None = None,
          **table: Any) -> NatProxy:
    nat = NatTable([(f"{h}:{p}", (h, p)) for h, p in destinations], rng=random.Random(2), **table)
    service = NatProxy(reactor, nat, policy or DropPolicy(), ("127.0.0.1", 5784), open_socket=reactor.open_socket)
    service.startService()
    return service


def public(reactor: FakeUdpReactor) -> FakePort:
    return reactor.ports[0]


def test_one_outgoing_socket_per_client_and_answers_go_back_through_the_public_socket() -> None:
    reactor = FakeUdpReactor()
    nat = proxy(reactor, A)
    for port in (1000, 1001, 1000):
        public(reactor).protocol.datagramReceived(b"hi", ("192.0.2.1", port))
    outgoing = reactor.ports[1:]
    assert len(outgoing) == 2
    assert outgoing[0].written == [(b"hi", A), (b"hi", A)] and outgoing[1].written == [(b"hi", A)]
    outgoing[1].receive(b"answer", A)
    assert public(reactor).written == [(b"answer", ("192.0.2.1", 1001))]
    assert nat.summary()["forwarded"] == 3 and nat.summary()["backwarded"] == 1


def test_expired_entries_close_their_sockets_on_the_timer() -> None:
    reactor = FakeUdpReactor()
    nat = proxy(reactor, A, nat_timeout=30.0)
    public(reactor).protocol.datagramReceived(b"hi", ("192.0.2.1", 1000))
    reactor.advance(20.0)
    public(reactor).protocol.datagramReceived(b"hi", ("192.0.2.2", 1000))
    reactor.advance(10.0)
    assert [p.number for p in reactor.open_ports()] == [5784, 40002]
    reactor.advance(20.0)
    assert [p.number for p in reactor.open_ports()] == [5784]
    assert nat.summary()["expired"] == 2 and reactor.getDelayedCalls() == []


def test_reassign_and_clear_close_sockets_and_new_ones_open_on_demand() -> None:
    reactor = FakeUdpReactor()
    nat = proxy(reactor, A, B)
    for port in range(5):
        public(reactor).protocol.datagramReceived(b"x", ("192.0.2.1", port))
    assert nat.reassign() == 5
    assert len(reactor.open_ports()) == 1
    public(reactor).protocol.datagramReceived(b"x", ("192.0.2.1", 0))
    assert len(reactor.open_ports()) == 2
    assert nat.clear(None) == 1 and len(reactor.open_ports()) == 1
    assert nat.table.backward(2, A, reactor.seconds()) is None


def test_drops_are_counted_by_reason() -> None:
    reactor = FakeUdpReactor(socket_limit=2)
    nat = proxy(reactor, A, policy=DropPolicy(size_limit=SizeLimit(4)))
    public(reactor).protocol.datagramReceived(b"12345", ("192.0.2.1", 1))
    public(reactor).protocol.datagramReceived(b"1234", ("192.0.2.1", 1))
    public(reactor).protocol.datagramReceived(b"1234", ("192.0.2.1", 2))  # no socket left
    reactor.ports[1].receive(b"123456", A)
    reactor.ports[1].receive(b"x", A)
    nat.backward_datagram(999, b"x", A)
    assert nat.dropped.values == {"size_limit": 2, "no_socket": 1, "unknown_entry": 1}
    assert public(reactor).written == [(b"x", ("192.0.2.1", 1))]
    nat.table.remove_destination(A)
    public(reactor).protocol.datagramReceived(b"1", ("192.0.2.9", 1))
    assert nat.dropped.get("no_destination") == 1


def test_stop_closes_every_socket() -> None:
    reactor = FakeUdpReactor()
    nat = proxy(reactor, A)
    public(reactor).protocol.datagramReceived(b"x", ("192.0.2.1", 1))
    nat.stopService()
    assert reactor.open_ports() == [] and reactor.getDelayedCalls() == []


def test_a_refused_send_is_a_counted_drop() -> None:
    reactor = FakeUdpReactor()
    nat = proxy(reactor, A)
    public(reactor).protocol.datagramReceived(b"x", ("192.0.2.1", 1))
    reactor.ports[1].refuse = True
    public(reactor).protocol.datagramReceived(b"y", ("192.0.2.1", 1))
    assert nat.dropped.values == {"send_error": 1} and nat.summary()["forwarded"] == 1
    public(reactor).refuse = True
    reactor.ports[1].receive(b"answer", A)
    assert nat.dropped.values == {"send_error": 2} and nat.summary()["backwarded"] == 0


def test_the_entry_evicted_for_a_new_client_loses_its_socket() -> None:
    reactor = FakeUdpReactor()
    nat = proxy(reactor, A, max_entries=2)
    for port in (1, 2, 3):
        public(reactor).protocol.datagramReceived(b"x", ("192.0.2.1", port))
    assert [p.number for p in reactor.open_ports()] == [5784, 40002, 40003]
    assert len(nat.table) == 2 and nat.table.evicted == 1


def test_destinations_of_both_families_an_entry_moved_across_gets_a_socket_per_family() -> None:
    reactor = FakeUdpReactor()
    six = ("::1", 5684)
    nat = proxy(reactor, A, six)
    clients = [("192.0.2.1", port) for port in range(8)]
    for client in clients:
        public(reactor).protocol.datagramReceived(b"x", client)
    outgoing = reactor.ports[1:]
    assert {port.family for port in outgoing} == {socket.AF_INET, socket.AF_INET6}
    assert all((port.family == socket.AF_INET6) == (port.written[0][1] == six) for port in outgoing)
    # Removing the IPv6 destination moves its entries to IPv4: each opens its second socket.
    moved = [client for client in clients if nat.table.destination_of(client) == six]
    assert 0 < len(moved) < len(clients)
    nat.table.remove_destination(six)
    for client in moved:
        public(reactor).protocol.datagramReceived(b"y", client)
    assert len(reactor.ports) == 1 + len(clients) + len(moved)
    for port in reactor.ports[1 + len(clients):]:
        assert port.family == socket.AF_INET and port.written == [(b"y", A)]
    # Answers on either socket of an entry go back to its client (a late IPv6 one too).
    reactor.ports[-1].receive(b"v4", A)
    next(port for port in outgoing if port.family == socket.AF_INET6).receive(b"v6", six)
    assert public(reactor).written == [(b"v4", moved[-1]), (b"v6", moved[0])]
    assert nat.summary()["backwarded"] == 2 and nat.summary()["entries"] == len(clients)
    assert nat.clear(None) == len(clients) and reactor.open_ports() == [public(reactor)]


class BusyPortReactor(FakeUdpReactor):
    """Every port is taken."""

    def __init__(self) -> None:
        super().__init__()
        self.when_running: list[Any] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakePort:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    def callWhenRunning(self, call: Any, *args: Any) -> None:
        self.when_running.append(call)

    def stop(self) -> None:
        pass


def test_a_busy_port_is_a_clear_critical_line_and_exit_status_1() -> None:

    from nettester.nat.console import NatRoleService
    from nettester.service import exit_status_of

    reactor = BusyPortReactor()
    service = NatRoleService(reactor, NatProxy(reactor, NatTable([]), DropPolicy(), ("", 5784)))
    with log_events() as events:
        service.startService()
        status = exit_status_of(service)
    assert status == 1 and reactor.when_running == [reactor.stop]
    (failed,) = [event for event in events if event.get("event") == "listen_failed"]
    assert "Address already in use" in failed["reason"] and service.failed
    service.stopService()
