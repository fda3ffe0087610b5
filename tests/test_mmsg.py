"""Batched datagram I/O (``nettester.mmsg``, ``reactor.BatchingPort``) on real loopback sockets, doRead by hand.

The plain read loop's behaviour (order, bounds, empty datagrams, a failing
handler) is tested for both port classes in ``tests/cluster/test_cluster_port.py``;
``tests/test_mmsg_fallback.py`` runs the servers' loopback tests on the plain loop.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactor

from nettester import mmsg
from nettester.reactor import BatchingPort, DrainingPort, datagram_sender, listen_udp, server_port_class

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mmsg.available({}), reason="this C library has no recvmmsg/sendmmsg"),
]

Address = tuple[str, int]


class Echo(DatagramProtocol):
    """Answers each datagram ``copies`` times through the port's fast sender, noting what had arrived meanwhile."""

    def __init__(self, copies: int = 1, answer_size: int | None = None) -> None:
        self.copies = copies
        self.answer_size = answer_size
        self.received: list[tuple[bytes, Address]] = []
        self.failures: list[tuple[int | None, Address]] = []
        self.client: socket.socket | None = None
        self.arrived_while_handling = 0
        self.send: Any = None

    def startProtocol(self) -> None:
        self.send = datagram_sender(self.transport, lambda error, to: self.failures.append((error.errno, to)))

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        self.received.append((datagram, addr))
        answer = datagram if self.answer_size is None else datagram[:1] * self.answer_size
        for _ in range(self.copies):
            self.send(answer, addr)
        if self.client is not None and select.select([self.client], [], [], 0)[0]:
            self.arrived_while_handling += 1


@pytest.fixture(params=["127.0.0.1", "::1"])
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_batching(protocol: DatagramProtocol, host: str, size: int = 8192) -> BatchingPort:
    try:
        port = BatchingPort(0, protocol, interface=host, maxPacketSize=size, reactor=MemoryReactor())
        port.startListening()
    except CannotListenError as error:  # a host without IPv6
        pytest.skip(f"cannot listen on {host}: {error}")
    return port


def bound_client(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(2.0)  # a bound: loopback answers within microseconds
    return sock


@pytest.fixture
def client(host: str) -> Iterator[socket.socket]:
    with bound_client(host) as sock:
        yield sock


def address_of(port: BatchingPort) -> Address:
    return port.getHost().host, port.getHost().port


def receive_all(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(70000) for _ in range(count)]


def exchange(protocol: DatagramProtocol, host: str, client: socket.socket, datagrams: list[bytes], answers: int,
             size: int = 8192) -> list[bytes]:
    """``client`` sends ``datagrams`` to a new batching port of ``protocol``, which handles them in one read;
    the first ``answers`` datagrams ``client`` gets back."""
    port = open_batching(protocol, host, size)
    try:
        for datagram in datagrams:
            client.sendto(datagram, address_of(port))
        port.doRead()
        return receive_all(client, answers)
    finally:
        port.socket.close()


def test_a_batch_is_answered_in_order_once_it_has_been_handled(host: str, client: socket.socket) -> None:
    protocol = Echo()
    protocol.client = client
    datagrams = [b"%d" % n for n in range(10)]
    assert exchange(protocol, host, client, datagrams, 10) == datagrams
    assert [datagram for datagram, _ in protocol.received] == datagrams
    assert {addr for _, addr in protocol.received} == {client.getsockname()[:2]}  # what recvfrom gives
    assert protocol.arrived_while_handling == 0  # queued until the batch ended


def test_a_send_outside_a_batch_goes_at_once(host: str, client: socket.socket) -> None:
    protocol = Echo()
    port = open_batching(protocol, host)
    try:
        protocol.send(b"unprompted", client.getsockname()[:2])
        assert client.recv(100) == b"unprompted"
    finally:
        port.socket.close()


def test_more_answers_than_a_batch_holds_and_long_answers_keep_their_order(host: str, client: socket.socket) -> None:
    datagrams = [b"%02d" % n for n in range(mmsg.BATCH)]
    assert exchange(Echo(copies=3), host, client, datagrams, 3 * mmsg.BATCH) == [
        d for d in datagrams for _ in range(3)]
    long_answers = Echo(answer_size=mmsg.SEND_SLOT + 1)
    assert exchange(long_answers, host, client, [b"a", b"b"], 2) == [b"a" * (mmsg.SEND_SLOT + 1),
                                                                     b"b" * (mmsg.SEND_SLOT + 1)]


@pytest.mark.parametrize("host", ["127.0.0.1"])  # IPv4 broadcast
def test_a_refused_queued_send_goes_to_its_handler_and_the_rest_are_sent(client: socket.socket, host: str) -> None:
    """Broadcast without SO_BROADCAST is refused by the local kernel (EACCES): nothing leaves the host."""
    refused = ("255.255.255.255", 9)

    class ToBroadcastToo(Echo):
        def datagramReceived(self, datagram: bytes, addr: Address) -> None:
            self.send(datagram, refused)
            super().datagramReceived(datagram, addr)

    protocol = ToBroadcastToo()
    assert exchange(protocol, host, client, [b"one", b"two"], 2) == [b"one", b"two"]
    assert protocol.failures == [(errno.EACCES, refused), (errno.EACCES, refused)]


@pytest.mark.parametrize("host", ["127.0.0.1"])
def test_a_host_name_goes_to_sendto_which_resolves_it_after_what_was_queued(client: socket.socket, host: str) -> None:
    """``127.1`` is no address for inet_pton; sendto's resolver takes it (inet_aton: 127.0.0.1), as it takes names."""

    class ByName(Echo):
        def datagramReceived(self, datagram: bytes, addr: Address) -> None:
            super().datagramReceived(datagram, addr)
            self.send(b"by name " + datagram, ("127.1", addr[1]))

    assert exchange(ByName(), host, client, [b"1", b"2"], 4) == [b"1", b"by name 1", b"2", b"by name 2"]


def test_a_destination_that_is_no_address_raises_as_sendto_does(host: str) -> None:
    protocol = Echo()
    port = open_batching(protocol, host)
    try:
        port._handling = True  # as inside a batch
        with pytest.raises(OSError):
            protocol.send(b"x", ("not an address", 1))
    finally:
        port.socket.close()


def test_the_address_caches_are_bounded_and_stay_right(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmsg, "ADDRESS_CACHE_LIMIT", 3)
    protocol = Echo()
    port = open_batching(protocol, host)
    clients = [bound_client(host) for _ in range(7)]
    try:
        for sock in clients:
            sock.sendto(b"from %d" % sock.getsockname()[1], address_of(port))
        port.doRead()
        assert [addr for _, addr in protocol.received] == [sock.getsockname()[:2] for sock in clients]
        assert len(port._batch.sources) <= 3
        for sock in clients:
            assert sock.recv(100) == b"from %d" % sock.getsockname()[1]
    finally:
        for sock in clients:
            sock.close()
        port.socket.close()


def test_a_datagram_longer_than_the_read_size_is_truncated_as_recvfrom_does(host: str, client: socket.socket) -> None:
    protocol = Echo()
    assert exchange(protocol, host, client, [b"0123456789abcdefXYZ"], 1, size=16) == [b"0123456789abcdef"]
    assert protocol.received[0][0] == b"0123456789abcdef"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=3000), min_size=1, max_size=mmsg.BATCH), st.sampled_from(["127.0.0.1", "::1"]))
def test_any_datagrams_come_back_byte_for_byte(datagrams: list[bytes], host: str) -> None:
    protocol = Echo()
    with bound_client(host) as sock:
        assert exchange(protocol, host, sock, datagrams, len(datagrams), size=4096) == datagrams
    assert [datagram for datagram, _ in protocol.received] == datagrams


def test_nettester_mmsg_off_keeps_the_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_port_class() is BatchingPort
    monkeypatch.setenv(mmsg.DISABLE_ENV, "off")
    assert not mmsg.available()
    assert server_port_class() is DrainingPort


def test_listen_udp_opens_a_batching_port_whose_write_keeps_the_order(client: socket.socket, host: str) -> None:
    """``Port.write`` (what a protocol without the fast sender uses) goes after what the batch queued."""
    reactor = EPollReactor()

    class WritesToo(Echo):
        def datagramReceived(self, datagram: bytes, addr: Address) -> None:
            super().datagramReceived(datagram, addr)
            self.transport.write(b"written " + datagram, addr)  # type: ignore[union-attr]

    protocol = WritesToo()
    port = listen_udp(reactor, 0, protocol, host, 2048)
    try:
        assert isinstance(port, BatchingPort)
        client.sendto(b"1", address_of(port))
        client.sendto(b"2", address_of(port))
        port.doRead()
        assert receive_all(client, 4) == [b"1", b"written 1", b"2", b"written 2"]
    finally:
        port.stopListening()
        reactor.waker.connectionLost(None)
        reactor._poller.close()
