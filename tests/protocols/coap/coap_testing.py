"""Shared test fixtures for the CoAP Twisted layers: in-memory links, a clock."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from zope.interface import implementer

from nettester.interfaces import IDatagramLink
from nettester.link import PeerContext
from nettester.protocols.coap.endpoint import CoapEndpoint, RequestHandler
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.message import CON, Code, Message, OptionNumber, encode_uint
from nettester.protocols.coap.parameters import TransmissionParameters
from nettester.protocols.coap.resources import build_site
from nettester.protocols.coap.resources.extended import extended_resources
from nettester.protocols.coap.resources.plugtest import plugtest_resources

SERVER, CLIENT = ("192.0.2.1", 5683), ("192.0.2.2", 40000)


@implementer(IDatagramLink)
class MemoryLink:
    """Queues what is sent; ``flush`` hands it to the other side (or drops it)."""

    scheme = "coap"

    def __init__(self, me: tuple[str, int]) -> None:
        self.me = me
        self.receiver: Any = None
        self.sent: list[tuple[bytes, Any]] = []
        self.other: MemoryLink | None = None
        self.drop = False
        self.context: PeerContext | None = None

    def send_datagram(self, data: bytes, peer: Any) -> None:
        self.sent.append((data, peer))

    def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
        return defer.succeed(address)

    def peer_context(self, peer: Any) -> PeerContext:
        return self.context or PeerContext(address=peer)

    def flush(self) -> int:
        sent, self.sent = self.sent, []
        if not self.drop:
            assert self.other is not None
            for data, _ in sent:
                self.other.receiver.datagramReceived(data, self.me)
        return len(sent)


class World:
    """A client endpoint and a server endpoint joined by memory links, on one Clock."""

    def __init__(self, handler: RequestHandler | None = None,
                 server_params: TransmissionParameters | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.server_link, self.client_link = MemoryLink(SERVER), MemoryLink(CLIENT)
        self.server_link.other, self.client_link.other = self.client_link, self.server_link
        self.server = CoapEndpoint(self.server_link, self.clock, handler, server_params, random.Random(1))
        self.client = CoapEndpoint(self.client_link, self.clock, rng=random.Random(2))

    def exchange(self) -> None:
        """Deliver datagrams both ways until both links are quiet."""
        while self.client_link.flush() + self.server_link.flush():
            pass

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Let time pass in small steps, delivering datagrams as they appear."""
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.exchange()


def request(path: str, code: int = Code.GET, mtype: int = CON, payload: bytes = b"",
            options: list[tuple[int, bytes]] | None = None) -> Message:
    """A request for ``a/b?x=1&y`` with extra options."""
    path, _, query = path.partition("?")
    built = [(OptionNumber.URI_PATH, segment.encode()) for segment in path.split("/") if segment]
    built += [(OptionNumber.URI_QUERY, argument.encode()) for argument in query.split("&") if argument]
    return Message(mtype, code, 0, b"", built + list(options or ()), payload)


def results(d: defer.Deferred[Any]) -> list[Any]:
    """A list that receives the Deferred's result or failure."""
    found: list[Any] = []
    d.addBoth(found.append)
    return found


class FakeUdpPort:
    """What ``listenUDP`` returns in these tests: a host address and a no-op stop."""

    def __init__(self, interface: str, port: int) -> None:
        self._host = IPv4Address("UDP", interface or "0.0.0.0", port)
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return self._host

    def stopListening(self) -> None:
        self.stopped = True


class UdpClock(Clock):
    """A Clock whose ``listenUDP`` records the protocol and opens no socket."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: list[tuple[Any, str, int]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> FakeUdpPort:
        self.listening.append((protocol, interface, maxPacketSize))
        return FakeUdpPort(interface, port or 40000 + len(self.listening))


class FakeSocket:
    """A connected datagram socket's handle: records sends; ``error`` is its pending SO_ERROR."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.error = 0

    def sendto(self, data: bytes, address: Any) -> int:
        self.sent.append((data, address))
        return len(data)

    def getsockopt(self, level: int, option: int) -> int:
        error, self.error = self.error, 0
        return error


class FakeUdpTransport:
    """A udp.Port stand-in for a protocol: its socket, and the address it was connected to."""

    def __init__(self) -> None:
        self.socket = FakeSocket()
        self.connected: tuple[str, int] | None = None

    def getHandle(self) -> FakeSocket:
        return self.socket

    def connect(self, host: str, port: int) -> None:
        self.connected = (host, port)


class Server:
    """A plugtest + extended site on a World; ``ask`` runs one request to completion."""

    def __init__(self, benchmark: bool = True, notify_interval: float = 5.0) -> None:
        self.world = World()
        self.shutdowns: list[bool] = []
        resources = plugtest_resources(notify_interval, lambda: self.shutdowns.append(True))
        resources += extended_resources(benchmark, "test-server", self.world.clock.seconds, 1000.0)
        self.site = build_site(self.world.clock, resources)
        self.site.attach(self.world.server)

    def ask(self, message: Message, wait: float = 0.0) -> Message:
        got = results(self.world.client.request(SERVER, message))
        self.world.exchange()
        if wait:
            self.world.advance(wait)
        (event,) = got
        assert isinstance(event, ResponseReceived), event
        return event.response


def accept(content_format: int) -> list[tuple[int, bytes]]:
    """An Accept option."""
    return [(OptionNumber.ACCEPT, encode_uint(content_format))]
