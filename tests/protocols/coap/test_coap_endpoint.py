"""The Twisted endpoint over in-memory links and a task.Clock."""

from __future__ import annotations

from typing import Any

import pytest
from coap_testing import SERVER, World, request, results
from twisted.internet import defer
from zope.interface.verify import verifyObject

from nettester.interfaces import IDatagramLink, IDatagramReceiver
from nettester.protocols.coap.endpoint import CoapEndpoint, CoapRequestError
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation
from nettester.protocols.coap.message import NON, Code, Message, decode, response
from nettester.protocols.coap.parameters import TransmissionParameters
from nettester.udplink import UdpLink


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


def handled_world() -> tuple[World, Handler]:
    handler = Handler()
    world = World(handler)
    handler.endpoint = world.server
    return world, handler


def test_interfaces() -> None:
    world = World()
    verifyObject(IDatagramReceiver, world.server)
    verifyObject(IDatagramLink, UdpLink())
    assert world.server_link.receiver is world.server


def test_request_response() -> None:
    world, handler = handled_world()
    got = results(world.client.request(SERVER, request("hello")))
    world.clock.advance(0.1)
    world.exchange()
    (event,) = got
    assert isinstance(event, ResponseReceived) and event.response.payload == b"world"
    assert event.rtt == pytest.approx(0.1)


def test_request_address_uses_link_connect() -> None:
    world, handler = handled_world()
    got = results(world.client.request_address(SERVER, request("hello", mtype=NON)))
    world.exchange()
    assert got[0].response.payload == b"world"


def test_retransmissions_run_on_the_clock_then_fail() -> None:
    world, handler = handled_world()
    world.client_link.drop = True
    got = results(world.client.request(SERVER, request("hello")))
    sent = world.client_link.flush()
    for _ in range(100):
        world.clock.advance(1.0)
        sent += world.client_link.flush()
    assert sent == 5
    assert isinstance(got[0].value, CoapRequestError) and got[0].value.reason == "timeout"
    # One timer at most, however many retransmissions happened.
    assert len(world.clock.getDelayedCalls()) <= 1


def test_deferred_answer_piggybacked_or_separate() -> None:
    world, handler = handled_world()
    quick = results(world.client.request(SERVER, request("slow")))
    world.client_link.flush()
    incoming, later = handler.pending.pop()
    later.callback(response(Code.CONTENT, b"quick"))
    (ack,) = world.server_link.sent
    assert decode(ack[0]).mtype == 2 and decode(ack[0]).payload == b"quick"
    world.exchange()
    assert quick[0].response.payload == b"quick"

    separate = results(world.client.request(SERVER, request("slow")))
    world.client_link.flush()
    incoming, later = handler.pending.pop()
    world.server.accept(incoming)
    world.exchange()
    world.clock.advance(1.0)
    later.callback(response(Code.CONTENT, b"separate"))
    world.exchange()
    assert separate[0].response.payload == b"separate"


def test_handler_error_becomes_5_00() -> None:
    world, handler = handled_world()
    got = results(world.client.request(SERVER, request("other")))
    world.exchange()
    assert got[0].response.code == Code.INTERNAL_SERVER_ERROR


def test_observe_through_endpoints() -> None:
    world, handler = handled_world()
    notes: list[bytes] = []
    observation = world.client.observe(SERVER, request("obs"), lambda event: notes.append(event.response.payload))
    world.exchange()
    (relation,) = handler.relations
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
    assert handler.cancelled == ["reset"] and notes[-1] == b"3"


def test_ping() -> None:
    world, handler = handled_world()
    got = results(world.client.ping(SERVER))
    world.exchange()
    assert isinstance(got[0], ResponseReceived)


def test_block_size_from_parameters() -> None:
    world = World(Handler(), TransmissionParameters(block_szx=0))
    got = results(world.client.request(SERVER, request("large")))
    world.exchange()
    assert got[0].response.payload == bytes(range(40))
    assert world.server.stats.sent == 3  # 16 + 16 + 8 bytes


def test_request_with_observe_option_fires_once_and_forgets() -> None:
    world, handler = handled_world()
    got = results(world.client.request(SERVER, request("obs", options=[(6, b"")])))
    world.exchange()
    assert got[0].response.payload == b"0"
    (relation,) = handler.relations
    world.server.notify(relation, response(Code.CONTENT, b"1"), confirmable=False)
    world.exchange()
    assert handler.cancelled == ["reset"] and len(got) == 1


def test_stopped_endpoint_arms_no_timer() -> None:
    world, _ = handled_world()
    world.client.stop()
    world.client.request(SERVER, request("hello"))
    assert world.clock.getDelayedCalls() == []  # the server has not run yet, the client is stopped


def test_udp_peer_context_unmaps_ipv4_from_dual_stack() -> None:
    link = UdpLink()
    assert link.peer_context(("::ffff:192.0.2.7", 1234)).address == ("192.0.2.7", 1234)
    assert link.peer_context(("2001:db8::1", 5683)).address == ("2001:db8::1", 5683)
    assert link.peer_context(("192.0.2.7", 1)).scheme == "coap"
