"""The servers' UDP read loops (``DrainingPort`` and its batching twin ``BatchingPort``): real loopback
sockets, doRead driven by hand (no reactor loop)."""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactor

from nettester import mmsg
from nettester.reactor import MAX_DATAGRAMS_PER_READ, PROBED_READS, BatchingPort, DrainingPort
from tests.logcapture import log_events

pytestmark = pytest.mark.integration


class Recorder(DatagramProtocol):
    def __init__(self, fail_on: bytes | None = None) -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.fail_on = fail_on

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        if datagram == self.fail_on:
            raise RuntimeError("handler bug")


PORT_CLASSES = [DrainingPort, pytest.param(BatchingPort, marks=pytest.mark.skipif(
    not mmsg.available({}), reason="this C library has no recvmmsg/sendmmsg"))]


def open_port(protocol: Recorder, host: str = "127.0.0.1",
              cls: type[DrainingPort] = DrainingPort) -> Generator[tuple[DrainingPort, socket.socket], None, None]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        port = cls(0, protocol, interface=host, reactor=MemoryReactor())
        port.startListening()
    except CannotListenError as error:  # a host without IPv6
        pytest.skip(f"cannot listen on {host}: {error}")
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.bind((host, 0))
    try:
        yield port, sender
    finally:
        sender.close()
        port.socket.close()


@pytest.fixture(params=PORT_CLASSES)
def port_class(request: pytest.FixtureRequest) -> type[DrainingPort]:
    cls: type[DrainingPort] = request.param
    return cls


@pytest.fixture(params=["127.0.0.1", "::1"])
def lab(request: pytest.FixtureRequest,
        port_class: type[DrainingPort]) -> Generator[tuple[DrainingPort, socket.socket, Recorder], None, None]:
    protocol = Recorder()
    for port, sender in open_port(protocol, request.param, port_class):
        yield port, sender, protocol


def send(port: DrainingPort, sender: socket.socket, *datagrams: bytes) -> None:
    """Loopback delivery is done when sendto returns: the datagrams are queued on the port's socket."""
    for datagram in datagrams:
        sender.sendto(datagram, (port.getHost().host, port.getHost().port))


def test_one_read_takes_every_queued_datagram_in_order_with_host_port_addresses(lab: Any) -> None:
    port, sender, protocol = lab
    send(port, sender, b"a", b"bb", b"ccc")
    port.doRead()
    source = sender.getsockname()[:2]
    assert protocol.received == [(b"a", source), (b"bb", source), (b"ccc", source)]
    port.doRead()  # nothing left: a spurious wake-up is quiet
    assert len(protocol.received) == 3


def test_a_read_stops_after_the_bound_and_the_rest_waits(lab: Any) -> None:
    port, sender, protocol = lab
    send(port, sender, *[b"%d" % i for i in range(MAX_DATAGRAMS_PER_READ + 3)])
    port.doRead()
    assert len(protocol.received) == MAX_DATAGRAMS_PER_READ
    port.doRead()
    assert [datagram for datagram, _ in protocol.received] == [b"%d" % i for i in range(MAX_DATAGRAMS_PER_READ + 3)]


def test_an_empty_datagram_is_read_by_the_next_call(lab: Any) -> None:
    """FIONREAD says 0 for a pending empty datagram: the reactor reports the socket again and nothing is lost."""
    port, sender, protocol = lab
    send(port, sender, b"x", b"", b"y")
    port.doRead()
    port.doRead()
    assert [datagram for datagram, _ in protocol.received] == [b"x", b"", b"y"]


def test_a_failing_handler_is_logged_and_the_next_datagram_still_read(port_class: type[DrainingPort]) -> None:
    protocol = Recorder(fail_on=b"bad")
    with log_events() as events:
        for port, sender in open_port(protocol, cls=port_class):
            send(port, sender, b"bad", b"good")
            port.doRead()
    assert [datagram for datagram, _ in protocol.received] == [b"bad", b"good"]
    (failure,) = [e for e in events if e.get("event") == "datagram_handler_failed"]
    assert failure["log_failure"].check(RuntimeError)


class CountingSocket:
    """A fake socket: a queue of datagrams, counting the reads that failed with EAGAIN."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.queue = list(datagrams)
        self.failed_reads = 0
        self.probes = 0

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.queue:
            self.failed_reads += 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return self.queue.pop(0), ("192.0.2.1", 4000)

    def fileno(self) -> int:
        return -1


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A DrainingPort over a CountingSocket; FIONREAD answers from the fake queue."""
    import nettester.reactor as module

    def ioctl(fileno: int, request: int, buffer: bytearray) -> None:
        assert request == module.termios.FIONREAD
        sock.probes += 1
        buffer[:] = len(sock.queue[0]).to_bytes(4, "little") if sock.queue else b"\0\0\0\0"

    monkeypatch.setattr(module.fcntl, "ioctl", ioctl)
    protocol = Recorder()
    port = DrainingPort(0, protocol, interface="127.0.0.1", reactor=MemoryReactor())
    sock = CountingSocket([])
    port.socket = sock  # type: ignore[assignment]
    return port, sock, protocol


def test_a_wake_up_with_few_datagrams_ends_on_fionread_without_a_failing_read(fake: Any) -> None:
    port, sock, protocol = fake
    for count in range(1, PROBED_READS + 1):
        sock.queue[:] = [b"d"] * count
        port.doRead()
        assert sock.queue == [] and sock.failed_reads == 0
    assert len(protocol.received) == sum(range(1, PROBED_READS + 1))


def test_a_loaded_wake_up_reads_on_without_a_probe_per_datagram(fake: Any) -> None:
    port, sock, protocol = fake
    sock.queue[:] = [b"d"] * 10
    port.doRead()
    assert len(protocol.received) == 10
    assert sock.probes == PROBED_READS  # then one EAGAIN for the whole batch
    assert sock.failed_reads == 1
