"""The message layer over a reliable transport (RFC 8323): no CON/ACK, no deduplication, in-order notifications."""

from __future__ import annotations

from nettester.protocols.coap.events import ObserveCancelled, RequestFailed, RequestReceived, ResponseReceived
from nettester.protocols.coap.exchanges import ObserveRelation
from nettester.protocols.coap.message import CON, NON, Code, Message, OptionNumber, decode, response
from nettester.protocols.coap.reliable import ReliableCoapLayer
from nettester.protocols.coap.tcp import decode_frame, frame_from_datagram

PEER = "connection-1"


def request(path: str, token: bytes = b"\x01", observe: bool = False) -> Message:
    message = Message(NON, Code.GET, 0, token, [(OptionNumber.URI_PATH, path.encode())])
    if observe:
        message.set_option(OptionNumber.OBSERVE, b"")
    return message


def received(layer: ReliableCoapLayer) -> list[object]:
    found = []
    while (event := layer.next_event()) is not None:
        found.append(event)
    return found


def test_same_message_twice_is_served_twice() -> None:
    layer = ReliableCoapLayer(0.0)
    layer.receive_message(request("test"), PEER, 0.0)
    layer.receive_message(request("test"), PEER, 0.0)
    events = received(layer)
    assert [type(event) for event in events] == [RequestReceived, RequestReceived]
    assert layer.dedup_size == 0


def test_response_carries_the_token_and_frames_without_type() -> None:
    layer = ReliableCoapLayer(0.0)
    layer.receive_message(request("test", b"\x42"), PEER, 0.0)
    (event,) = received(layer)
    assert isinstance(event, RequestReceived)
    layer.respond(event.request, response(Code.CONTENT, b"hi"), 0.0)
    ((data, peer),) = layer.datagrams_to_send()
    frame = frame_from_datagram(data)
    assert frame is not None and peer == PEER
    answer = decode_frame(frame)
    assert (answer.code, answer.token, answer.payload) == (Code.CONTENT, b"\x42", b"hi")


def observed() -> tuple[ReliableCoapLayer, ObserveRelation | None]:
    """A layer whose /obs has one observer (registered by a GET with Observe), and the relation."""
    layer = ReliableCoapLayer(0.0)
    layer.receive_message(request("obs", observe=True), PEER, 0.0)
    (event,) = received(layer)
    answer = response(Code.CONTENT, b"1")
    answer.set_option(OptionNumber.OBSERVE, b"")
    return layer, layer.respond(event.request, answer, 0.0)  # type: ignore[union-attr]

def test_confirmable_notifications_go_non_and_are_never_retransmitted() -> None:
    layer, relation = observed()
    assert relation is not None
    layer.datagrams_to_send()
    for value in (b"2", b"3"):
        layer.notify(relation, response(Code.CONTENT, value), 1.0, confirmable=True)
    sent = [decode(data) for data, _ in layer.datagrams_to_send()]
    assert [message.mtype for message in sent] == [NON, NON]
    observes = [message.observe for message in sent]
    assert observes[0] is not None and observes[1] == (observes[0] + 1) % (1 << 24)
    layer.handle_timer(1000.0)
    assert layer.datagrams_to_send() == []


def test_bert_block2_request_is_served_in_1024_byte_blocks() -> None:
    layer = ReliableCoapLayer(0.0)
    message = request("large")
    message.set_option(OptionNumber.BLOCK2, bytes((7,)))  # NUM 0, SZX 7: BERT
    layer.receive_message(message, PEER, 0.0)
    (event,) = received(layer)
    assert isinstance(event, RequestReceived)
    layer.respond(event.request, response(Code.CONTENT, b"x" * 3000), 0.0)
    ((data, _),) = layer.datagrams_to_send()
    answer = decode(data)
    assert answer.block2 is not None and (answer.block2.szx, answer.block2.more) == (6, True)
    assert len(answer.payload) == 1024


def test_peer_closed_ends_its_observers_and_requests() -> None:
    layer, relation = observed()
    outgoing = layer.request(PEER, Message(CON, Code.GET), 0.0)
    assert outgoing.request.mtype == NON
    layer.peer_closed(PEER, 1.0)
    events = received(layer)
    assert ObserveCancelled(relation, "connection closed") in events  # type: ignore[arg-type]
    assert RequestFailed(outgoing, "connection closed") in events
    assert layer.observer_count == 0


def test_response_is_matched_by_token() -> None:
    layer = ReliableCoapLayer(0.0)
    outgoing = layer.request(PEER, Message(CON, Code.GET, 0, b"", [(OptionNumber.URI_PATH, b"test")]), 10.0)
    layer.datagrams_to_send()
    layer.receive_message(Message(NON, Code.CONTENT, 0, outgoing.token, [], b"ok"), PEER, 10.5)
    (event,) = received(layer)
    assert isinstance(event, ResponseReceived) and event.response.payload == b"ok" and event.rtt == 0.5


def test_bert_block1_upload_is_reassembled() -> None:
    # RFC 8323 section 6: BERT blocks are multiples of 1024 bytes, numbered in 1024-byte units.
    layer = ReliableCoapLayer(0.0)
    body = bytes(range(256)) * 12  # 3072 bytes: one BERT block of 2048, then a last one of 1024
    first = Message(NON, Code.PUT, 0, b"\x01", [(OptionNumber.URI_PATH, b"up"), (OptionNumber.BLOCK1, bytes((0x0F,)))],
                    body[:2048])
    layer.receive_message(first, PEER, 0.0)
    ((data, _),) = layer.datagrams_to_send()
    proceed = decode(data)
    assert proceed.code == Code.CONTINUE and proceed.block1 == (0, True, 7)
    last = Message(NON, Code.PUT, 0, b"\x02", [(OptionNumber.URI_PATH, b"up"), (OptionNumber.BLOCK1, bytes((0x27,)))],
                   body[2048:])
    layer.receive_message(last, PEER, 0.0)
    (event,) = received(layer)
    assert isinstance(event, RequestReceived) and event.request.request.payload == body
    layer.respond(event.request, response(Code.CHANGED), 0.0)
    ((data, _),) = layer.datagrams_to_send()
    answer = decode(data)
    assert answer.code == Code.CHANGED and answer.block1 == (2, False, 7)


def test_bert_block1_with_a_partial_block_is_refused() -> None:
    layer = ReliableCoapLayer(0.0)
    options = [(OptionNumber.URI_PATH, b"up"), (OptionNumber.BLOCK1, bytes((0x0F,)))]
    message = Message(NON, Code.PUT, 0, b"\x01", options, b"x" * 1500)
    layer.receive_message(message, PEER, 0.0)
    ((data, _),) = layer.datagrams_to_send()
    assert decode(data).code == Code.BAD_REQUEST
