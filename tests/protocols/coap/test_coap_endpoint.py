"""The Twisted endpoint over in-memory links and a task.Clock."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nettester.interfaces import IDatagramLink, IDatagramReceiver
from nettester.link import PeerContext
from nettester.protocols.coap.endpoint import CoapEndpoint, CoapRequestError
from nettester.protocols.coap.layer import (
    IncomingRequest,
    ObserveRelation,
    ResponseReceived,
    TransmissionParameters,
    response,
)
from nettester.protocols.coap.message import CON, NON, Code, Message, OptionNumber, decode
from nettester.udplink import UdpLink

SERVER, CLIENT = ("192.0.2.1", 5683), ("192.0.2.2", 40000)


@implementer(IDatagramLink)
class MemoryLink:
    """Queues what is sent; ``flush`` hands it to the other side."""

    scheme = "coap"

    def __init__(self, me: tuple[str, int]) -> None:
        self.me = me
        self.receiver: Any = None
        self.sent: list[tuple[bytes, Any]] = []
        self.other: MemoryLink | None = None
        self.drop = False

    def sendDatagram(self, data: bytes, peer: Any) -> None:
        self.sent.append((data, peer))

    def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
        return defer.succeed(address)

    def peerContext(self, peer: Any) -> PeerContext:
        return PeerContext(address=peer)

    def flush(self) -> int:
        sent, self.sent = self.sent, []
        if not self.drop:
            assert self.other is not None
            for data, _ in sent:
                self.other.receiver.datagramReceived(data, self.me)
        return len(sent)


class Handler:
    """Answers ``hello``; ``slow`` with a Deferred; ``boom`` raises; ``obs`` registers."""

    def __init__(self) -> None:
        self.endpoint: CoapEndpoint | None = None
        self.pending: list[tuple[IncomingRequest, defer.Deferred[Message]]] = []
        self.relations: list[ObserveRelation] = []
        self.cancelled: list[str] = []

    def handle_request(self, incoming: IncomingRequest) -> Any:
        path = incoming.request.uri_path
        if path == ["hello"]:
            return response(Code.CONTENT, b"world")
        if path == ["large"]:
            return response(Code.CONTENT, bytes(range(40)))
        if path == ["slow"]:
            later: defer.Deferred[Message] = defer.Deferred()
            self.pending.append((incoming, later))
            return later
        if path == ["obs"]:
            assert self.endpoint is not None
            relation = self.endpoint.respond(incoming, response(Code.CONTENT, b"0", options=[(6, b"")]))
            assert relation is not None
            self.relations.append(relation)
            return None
        raise RuntimeError("boom")

    def observe_cancelled(self, relation: ObserveRelation, reason: str) -> None:
        self.cancelled.append(reason)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.server_link, self.client_link = MemoryLink(SERVER), MemoryLink(CLIENT)
        self.server_link.other, self.client_link.other = self.client_link, self.server_link
        self.handler = Handler()
        self.server = CoapEndpoint(self.server_link, self.clock, self.handler, rng=random.Random(1))
        self.handler.endpoint = self.server
        self.client = CoapEndpoint(self.client_link, self.clock, rng=random.Random(2))

    def exchange(self) -> None:
        while self.client_link.flush() + self.server_link.flush():
            pass


def get(path: str, mtype: int = CON) -> Message:
    return Message(mtype, Code.GET, 0, b"", [(OptionNumber.URI_PATH, path.encode())])


def results(d: defer.Deferred[Any]) -> list[Any]:
    found: list[Any] = []
    d.addBoth(found.append)
    return found


def test_interfaces() -> None:
    world = World()
    verifyObject(IDatagramReceiver, world.server)
    verifyObject(IDatagramLink, UdpLink())
    assert world.server_link.receiver is world.server


def test_request_response() -> None:
    world = World()
    got = results(world.client.request(SERVER, get("hello")))
    world.clock.advance(0.1)
    world.exchange()
    (event,) = got
    assert isinstance(event, ResponseReceived) and event.response.payload == b"world"
    assert event.rtt == pytest.approx(0.1)


def test_request_address_uses_link_connect() -> None:
    world = World()
    got = results(world.client.request_address(SERVER, get("hello", NON)))
    world.exchange()
    assert got[0].response.payload == b"world"


def test_retransmissions_run_on_the_clock_then_fail() -> None:
    world = World()
    world.client_link.drop = True
    got = results(world.client.request(SERVER, get("hello")))
    sent = world.client_link.flush()
    for _ in range(100):
        world.clock.advance(1.0)
        sent += world.client_link.flush()
    assert sent == 5
    assert isinstance(got[0].value, CoapRequestError) and got[0].value.reason == "timeout"
    # One timer at most, however many retransmissions happened.
    assert len(world.clock.getDelayedCalls()) <= 1


def test_deferred_answer_piggybacked_or_separate() -> None:
    world = World()
    quick = results(world.client.request(SERVER, get("slow")))
    world.client_link.flush()
    incoming, later = world.handler.pending.pop()
    later.callback(response(Code.CONTENT, b"quick"))
    (ack,) = world.server_link.sent
    assert decode(ack[0]).mtype == 2 and decode(ack[0]).payload == b"quick"
    world.exchange()
    assert quick[0].response.payload == b"quick"

    separate = results(world.client.request(SERVER, get("slow")))
    world.client_link.flush()
    incoming, later = world.handler.pending.pop()
    world.server.accept(incoming)
    world.exchange()
    world.clock.advance(1.0)
    later.callback(response(Code.CONTENT, b"separate"))
    world.exchange()
    assert separate[0].response.payload == b"separate"


def test_handler_error_becomes_5_00() -> None:
    world = World()
    got = results(world.client.request(SERVER, get("other")))
    world.exchange()
    assert got[0].response.code == Code.INTERNAL_SERVER_ERROR


def test_observe_through_endpoints() -> None:
    world = World()
    notes: list[bytes] = []
    observation = world.client.observe(SERVER, get("obs"), lambda event: notes.append(event.response.payload))
    world.exchange()
    (relation,) = world.handler.relations
    for index in range(1, 4):
        world.clock.advance(5)
        world.server.notify(relation, response(Code.CONTENT, str(index).encode()), confirmable=index % 2 == 0)
        world.exchange()
    assert notes == [b"0", b"1", b"2", b"3"]
    ended = results(observation.finished)
    observation.cancel(deregister=False)
    assert isinstance(ended[0].value, CoapRequestError)
    world.server.notify(relation, response(Code.CONTENT, b"4"), confirmable=False)
    world.exchange()
    assert world.handler.cancelled == ["reset"] and notes[-1] == b"3"


def test_ping() -> None:
    world = World()
    got = results(world.client.ping(SERVER))
    world.exchange()
    assert isinstance(got[0], ResponseReceived)


def test_block_size_from_parameters() -> None:
    world = World()
    world.server = CoapEndpoint(world.server_link, world.clock, world.handler,
                                TransmissionParameters(block_szx=0), random.Random(3))
    got = results(world.client.request(SERVER, get("large")))
    world.exchange()
    assert got[0].response.payload == bytes(range(40))
    assert world.server.stats.sent == 3  # 16 + 16 + 8 bytes
