"""The lean datagram reactor: datagram readers skip Twisted's per-event wrapping, nothing else changes.

Each test runs its own reactor instance (never the global one) and polls it
once, bounded, on loopback sockets.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.application.reactors import getReactorTypes
from twisted.internet import tcp, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.python import log as legacy_log
from zope.interface import implementer

from nettester.interfaces import IDatagramReadDescriptor
from nettester.nat.proxy import OutgoingSocket
from nettester.protocols.stun.client import ClientSocket
from nettester.reactor import (
    SHORT_NAME,
    DatagramEPollReactor,
    DatagramSocket,
    DrainingPort,
    is_datagram_reader,
    listen_udp,
)
from tests.logcapture import log_events

POLL_SECONDS = 2.0  # an upper bound: the poll returns as soon as the datagram is there


@pytest.fixture
def reactor() -> Iterator[DatagramEPollReactor]:
    instance = DatagramEPollReactor()
    yield instance
    for selectable in instance.removeAll():
        selectable.connectionLost(None)
    instance.waker.connectionLost(None)
    instance._poller.close()


@pytest.fixture
def wrapped_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The selectables Twisted's per-event wrapper (callWithLogger) was called for."""
    calls: list[Any] = []
    original = legacy_log.callWithLogger

    def counting(logger: Any, func: Any, *args: Any, **kw: Any) -> Any:
        calls.append(logger)
        return original(logger, func, *args, **kw)

    monkeypatch.setattr(legacy_log, "callWithLogger", counting)
    return calls


class Collecting(DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.datagrams.append(datagram)


def _send_to(port: int, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(data, ("127.0.0.1", port))


def test_udp_port_is_read_without_the_logging_wrapper(reactor: DatagramEPollReactor, wrapped_calls: list[Any]) -> None:
    protocol = Collecting()
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    _send_to(port.getHost().port, b"one")
    reactor.doPoll(POLL_SECONDS)
    assert protocol.datagrams == [b"one"]
    assert port not in wrapped_calls  # (the reactor's own wakers may be in it: a child process exited earlier)


def test_listen_udp_opens_a_draining_port_read_without_the_wrapper(reactor: DatagramEPollReactor,
                                                                   wrapped_calls: list[Any]) -> None:
    protocol = Collecting()
    port = listen_udp(reactor, 0, protocol, "127.0.0.1", 2048)
    try:
        assert isinstance(port, DrainingPort) and port.maxPacketSize == 2048
        _send_to(port.getHost().port, b"one")
        reactor.doPoll(POLL_SECONDS)
        assert protocol.datagrams == [b"one"]
        assert port not in wrapped_calls
    finally:
        port.stopListening()


class FakeUdpReactor:
    """Not a POSIX reactor: only listenUDP, recorded."""

    def __init__(self) -> None:
        self.listened: list[tuple[int, str, int]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> str:
        self.listened.append((port, interface, maxPacketSize))
        return "its own port"


def test_listen_udp_leaves_a_fake_reactor_its_own_listenudp() -> None:
    fake = FakeUdpReactor()
    assert listen_udp(fake, 5683, Collecting(), "127.0.0.1", 2048) == "its own port"
    assert fake.listened == [(5683, "127.0.0.1", 2048)]


class SocketReader:
    """A bare read descriptor on a bound UDP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.lost: list[Any] = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "raising"

    def doRead(self) -> None:
        self.socket.recv(100)

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


@implementer(IDatagramReadDescriptor)
class RaisingReader(SocketReader):
    """A datagram reader whose doRead fails: it must be logged and closed, not kill the loop."""

    def doRead(self) -> None:
        super().doRead()
        raise RuntimeError("handler bug")


class PlainReader(SocketReader):
    """Not declared a datagram reader: Twisted's own path, wrapper included."""


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def test_a_failing_datagram_reader_is_logged_and_closed(reactor: DatagramEPollReactor) -> None:
    with _bound_socket() as sock:
        reader = RaisingReader(sock)
        reactor.addReader(reader)
        _send_to(sock.getsockname()[1], b"x")
        with log_events() as events:
            reactor.doPoll(POLL_SECONDS)
        assert reader not in reactor.getReaders()
        assert len(reader.lost) == 1
    failures = [event for event in events if event.get("event") == "reader_failed"]
    assert failures and failures[0]["descriptor"] == "RaisingReader"
    assert failures[0]["log_failure"].check(RuntimeError)


def test_other_descriptors_keep_twisteds_path(reactor: DatagramEPollReactor, wrapped_calls: list[Any]) -> None:
    with _bound_socket() as sock:
        reader = PlainReader(sock)
        reactor.addReader(reader)
        _send_to(sock.getsockname()[1], b"x")
        reactor.doPoll(POLL_SECONDS)
        assert reader in wrapped_calls
        reactor.removeReader(reader)


@pytest.mark.parametrize(
    ("cls", "lean"),
    [(udp.Port, True), (DrainingPort, True), (OutgoingSocket, True), (ClientSocket, True), (tcp.Port, False),
     (PlainReader, False)],
)
def test_which_descriptors_are_datagram_readers(cls: type, lean: bool) -> None:
    assert is_datagram_reader(cls) is lean


def test_twistd_can_select_it_by_name() -> None:
    assert SHORT_NAME in {installer.shortName for installer in getReactorTypes()}


def test_the_console_script_installs_it() -> None:
    script = ("from nettester.cli import _install_reactor; _install_reactor(); "
              "from twisted.internet import reactor; print(type(reactor).__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "DatagramEPollReactor"


class RecordingService:
    """What a ``ClientSocket`` reports to its stun-client service."""

    def __init__(self) -> None:
        self.refusals: list[int] = []
        self.errors: list[OSError] = []

    def refused(self, index: int) -> None:
        self.refusals.append(index)

    def socket_error(self, index: int, error: OSError, action: str) -> None:
        self.errors.append(error)

    def received(self, index: int, datagram: bytes) -> None:
        raise AssertionError("nothing listens there: no datagram can arrive")


def _dead_udp_port() -> int:
    """A loopback UDP port nothing listens on (bound, then closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_refusal_on_a_connected_datagram_socket_is_read_not_taken_for_a_disconnect(
    reactor: DatagramEPollReactor,
) -> None:
    """ICMP port unreachable arrives as EPOLLERR alone: the reader must see ECONNREFUSED and stay open.

    Before the fix the event took Twisted's disconnect path: the socket was
    closed under the stun-client, whose next send failed with EBADF.
    """
    service = RecordingService()
    client = ClientSocket(service, 3, "127.0.0.1", ("127.0.0.1", _dead_udp_port()))  # type: ignore[arg-type]
    reactor.addReader(client)
    try:
        for _ in range(3):  # each refusal is reported on the next send or receive
            client.write(b"binding request")
            for _ in range(20):  # bounded: the ICMP error is queued within microseconds on loopback
                refusals = len(service.refusals)
                reactor.doPoll(0.1)
                if len(service.refusals) > refusals:
                    break
        assert service.errors == []
        assert service.refusals and set(service.refusals) == {3}
        assert client in reactor.getReaders()
        assert client.fileno() != -1
    finally:
        reactor.removeReader(client)
        client.close()


class CollectingSocket(DatagramSocket):
    """A ``DatagramSocket`` that keeps what it reads and whether to read on after an error."""

    __slots__ = ("datagrams", "errors", "read_on")

    MAX_READS = 3

    def __init__(self, read_on: bool) -> None:
        super().__init__(socket.AF_INET, "127.0.0.1")
        self.datagrams: list[bytes] = []
        self.errors: list[OSError] = []
        self.read_on = read_on

    def datagram_received(self, datagram: bytes, source: Any) -> None:
        self.datagrams.append(datagram)

    def read_failed(self, error: OSError) -> bool:
        self.errors.append(error)
        return self.read_on


def test_a_datagram_socket_reads_a_bounded_batch_per_wake_up() -> None:
    reader = CollectingSocket(read_on=True)
    try:
        port = reader.socket.getsockname()[1]
        for number in range(5):
            _send_to(port, b"%d" % number)
        reader.doRead()
        assert reader.datagrams == [b"0", b"1", b"2"]  # MAX_READS, the rest at the next wake-up
        reader.doRead()
        assert reader.datagrams == [b"0", b"1", b"2", b"3", b"4"] and reader.errors == []
    finally:
        reader.close()


@pytest.mark.parametrize("read_on", [True, False])
def test_a_refusal_goes_to_read_failed_which_says_whether_to_read_on(read_on: bool) -> None:
    reader = CollectingSocket(read_on)
    try:
        reader.socket.connect(("127.0.0.1", _dead_udp_port()))
        reader.socket.send(b"to nobody")
        wait_for_refusal = 0
        while not reader.errors and wait_for_refusal < 100:  # bounded: loopback queues the ICMP error at once
            select.select([reader.socket], [], [], 0.01)
            reader.doRead()
            wait_for_refusal += 1
        assert isinstance(reader.errors[0], ConnectionRefusedError) and len(reader.errors) == 1
        assert reader.fileno() != -1
    finally:
        reader.close()
