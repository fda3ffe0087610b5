"""Sans-IO layer tests: two CoapLayer instances exchange datagrams under a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.protocols.coap.events import (
    MessageRejected,
    ObserveCancelled,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
)
from nettester.protocols.coap.exchanges import IncomingRequest, OutgoingRequest
from nettester.protocols.coap.layer import CoapLayer
from nettester.protocols.coap.message import (
    ACK,
    CON,
    NON,
    RST,
    Code,
    Message,
    OptionNumber,
    decode,
    encode_block,
    encode_empty,
    encode_uint,
    response,
)
from nettester.protocols.coap.parameters import TransmissionParameters

CLIENT, SERVER = ("10.0.0.1", 40000), ("10.0.0.2", 5683)


class Pair:
    """A client layer and a server layer joined by a lossless (or lossy) wire."""

    def __init__(self, server_params: TransmissionParameters | None = None,
                 client_params: TransmissionParameters | None = None) -> None:
        self.now = 1000.0
        self.client = CoapLayer(self.now, client_params, random.Random(1))
        self.server = CoapLayer(self.now, server_params, random.Random(2))

    def to_server(self) -> list[bytes]:
        """Deliver what the client wrote; returns those datagrams."""
        sent = [data for data, peer in self.client.datagrams_to_send() if peer == SERVER]
        for data in sent:
            self.server.receive_datagram(data, CLIENT, self.now)
        return sent

    def to_client(self) -> list[bytes]:
        sent = [data for data, peer in self.server.datagrams_to_send() if peer == CLIENT]
        for data in sent:
            self.client.receive_datagram(data, SERVER, self.now)
        return sent

    def events(self, layer: CoapLayer) -> list[object]:
        found = []
        while (event := layer.next_event()) is not None:
            found.append(event)
        return found

    def serve(self, answer: Message) -> IncomingRequest:
        """Deliver the client's datagrams and answer the one request they carry."""
        self.to_server()
        (event,) = self.events(self.server)
        assert isinstance(event, RequestReceived)
        self.server.respond(event.request, answer, self.now)
        return event.request

    def run_until_quiet(self, handler: object = None, limit: int = 200) -> None:
        """Shuttle datagrams both ways, answering requests with ``handler``."""
        for _ in range(limit):
            moved = self.to_server() + self.to_client()
            for event in self.events(self.server):
                if isinstance(event, RequestReceived) and handler is not None:
                    self.server.respond(event.request, handler(event.request.request), self.now)
                    moved.append(b"x")
            if not moved:
                return
        raise AssertionError("no quiescence")


def get(path: str, mtype: int = CON, *extra: tuple[int, bytes]) -> Message:
    options = [(OptionNumber.URI_PATH, segment.encode()) for segment in path.split("/")]
    return Message(mtype, Code.GET, 0, b"", options + list(extra))


def test_piggybacked_response_and_rtt() -> None:
    pair = Pair()
    outgoing = pair.client.request(SERVER, get("hello"), pair.now)
    pair.now += 0.25
    incoming = pair.serve(response(Code.CONTENT, b"world", content_format=0))
    assert incoming.request.uri_path == ["hello"]
    (ack,) = pair.to_client()
    assert decode(ack).mtype == ACK and decode(ack).mid == incoming.request.mid
    (event,) = pair.events(pair.client)
    assert isinstance(event, ResponseReceived) and event.request is outgoing
    assert event.response.payload == b"world" and event.response.content_format == 0
    assert event.rtt == pytest.approx(0.25)
    assert outgoing.done


def test_duplicate_con_gets_the_cached_ack_without_new_event() -> None:
    pair = Pair()
    pair.client.request(SERVER, get("x"), pair.now)
    (original,) = pair.client.datagrams_to_send()
    pair.server.receive_datagram(original[0], CLIENT, pair.now)
    (event,) = pair.events(pair.server)
    # Duplicate while the application works: ignored.
    pair.server.receive_datagram(original[0], CLIENT, pair.now)
    assert pair.server.datagrams_to_send() == []
    pair.server.respond(event.request, response(Code.CONTENT, b"1"), pair.now)
    (first_ack,) = pair.server.datagrams_to_send()
    # The dedup decision reads only the header: a mangled body is still a duplicate.
    pair.server.receive_datagram(original[0][:4] + b"\xf0garbage", CLIENT, pair.now + 200)
    assert pair.server.datagrams_to_send() == [first_ack]
    assert pair.events(pair.server) == []
    assert pair.server.stats.duplicates == 2
    # After EXCHANGE_LIFETIME (247 s) the MID may be reused: a new request.
    pair.server.handle_timer(pair.now + 400)
    pair.server.receive_datagram(original[0], CLIENT, pair.now + 400)
    assert len(pair.events(pair.server)) == 1


def test_non_request_gets_non_response_and_duplicates_are_ignored() -> None:
    pair = Pair()
    pair.client.request(SERVER, get("x", NON), pair.now)
    (datagram,) = pair.client.datagrams_to_send()
    pair.server.receive_datagram(datagram[0], CLIENT, pair.now)
    (event,) = pair.events(pair.server)
    pair.server.respond(event.request, response(Code.CONTENT, b"n"), pair.now)
    (answer,) = pair.server.datagrams_to_send()
    assert decode(answer[0]).mtype == NON
    pair.server.receive_datagram(datagram[0], CLIENT, pair.now + 1)
    assert pair.server.datagrams_to_send() == [] and pair.events(pair.server) == []
    pair.client.receive_datagram(answer[0], SERVER, pair.now)
    (got,) = pair.events(pair.client)
    assert isinstance(got, ResponseReceived) and got.response.payload == b"n"


def test_retransmission_back_off_and_give_up() -> None:
    pair = Pair()
    pair.client.request(SERVER, get("lost"), pair.now)
    start = pair.now
    sends = [start]
    pair.client.datagrams_to_send()
    failure = None
    while failure is None:
        deadline = pair.client.get_timer()
        pair.client.handle_timer(deadline)
        if pair.client.datagrams_to_send():
            sends.append(deadline)
        for event in pair.events(pair.client):
            failure = event
            end = deadline
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert len(sends) == 5  # the original and MAX_RETRANSMIT = 4 retransmissions
    assert 2.0 <= gaps[0] <= 3.0
    assert gaps[1:] == pytest.approx([gaps[0] * 2, gaps[0] * 4, gaps[0] * 8])
    assert isinstance(failure, RequestFailed) and failure.reason == "timeout"
    assert end - start == pytest.approx(gaps[0] * 31)
    assert pair.client.stats.retransmissions == 4 and pair.client.stats.transmission_failures == 1


def test_configurable_retransmission_parameters() -> None:
    params = TransmissionParameters(ack_timeout=0.5, ack_random_factor=1.0, max_retransmit=1)
    pair = Pair(client_params=params)
    pair.client.request(SERVER, get("lost"), pair.now)
    assert pair.client.get_timer() == pytest.approx(pair.now + 0.5)
    pair.client.handle_timer(pair.now + 0.5)
    pair.client.handle_timer(pair.now + 1.5)
    assert len(pair.client.datagrams_to_send()) == 2
    assert isinstance(pair.client.next_event(), RequestFailed)


def test_separate_response() -> None:
    pair = Pair()
    outgoing = pair.client.request(SERVER, get("separate"), pair.now)
    pair.to_server()
    (event,) = pair.events(pair.server)
    pair.server.accept(event.request)
    (empty_ack,) = pair.to_client()
    assert empty_ack == encode_empty(ACK, event.request.request.mid)
    # The client no longer retransmits.
    pair.client.handle_timer(pair.now + 10)
    assert pair.client.datagrams_to_send() == []
    pair.now += 1.0
    pair.server.respond(event.request, response(Code.CONTENT, b"late"), pair.now)
    (separate,) = pair.to_client()
    assert decode(separate).mtype == CON
    (got,) = pair.events(pair.client)
    assert got.response.payload == b"late" and got.request is outgoing
    (ack,) = pair.to_server()
    assert ack == encode_empty(ACK, decode(separate).mid)
    # Acknowledged: no retransmission of the separate response.
    pair.server.handle_timer(pair.now + 100)
    assert pair.server.datagrams_to_send() == []
    # A duplicate of the separate response is acknowledged again, not redelivered.
    pair.client.receive_datagram(separate, SERVER, pair.now + 2)
    assert pair.client.datagrams_to_send() == [(ack, SERVER)]
    assert pair.events(pair.client) == []


def test_separate_response_timeout() -> None:
    params = TransmissionParameters()
    pair = Pair()
    pair.client.request(SERVER, get("never"), pair.now, response_timeout=30.0)
    pair.to_server()
    (event,) = pair.events(pair.server)
    pair.server.accept(event.request)
    pair.to_client()
    assert pair.client.get_timer() == pytest.approx(pair.now + 30.0)
    pair.client.handle_timer(pair.now + 30.0)
    (failed,) = pair.events(pair.client)
    assert isinstance(failed, RequestFailed) and failed.reason == "timeout"
    assert params.exchange_lifetime == pytest.approx(247.0)
    assert params.non_lifetime == pytest.approx(145.0)


def test_ping_is_answered_by_reset() -> None:
    pair = Pair()
    outgoing = pair.client.ping(SERVER, pair.now)
    (ping,) = pair.to_server()
    assert ping[1] == 0 and len(ping) == 4
    (rst,) = pair.to_client()
    assert decode(rst).mtype == RST
    (event,) = pair.events(pair.client)
    assert isinstance(event, ResponseReceived) and event.request is outgoing
    assert pair.server.stats.pings == 1


def test_malformed_messages_are_answered_per_rfc() -> None:
    server = CoapLayer(0.0)
    bad_option = Message(CON, Code.GET, 7, b"tk", [(9999, b"x")]).encode()
    server.receive_datagram(bad_option, CLIENT, 0.0)
    ((answer, peer),) = server.datagrams_to_send()
    reply = decode(answer)
    assert (reply.mtype, reply.code, reply.mid, reply.token) == (ACK, Code.BAD_OPTION, 7, b"tk")
    # A CON response with a bad critical option is rejected with RST.
    server.receive_datagram(Message(CON, Code.CONTENT, 8, b"", [(9999, b"")]).encode(), CLIENT, 0.0)
    assert server.datagrams_to_send() == [(encode_empty(RST, 8), CLIENT)]
    # Format error in a CON: RST; in a NON: silence; garbage: silence.
    server.receive_datagram(b"\x40\x01\x00\x09\xf0", CLIENT, 0.0)
    assert server.datagrams_to_send() == [(encode_empty(RST, 9), CLIENT)]
    server.receive_datagram(b"\x50\x01\x00\x0a\xf0", CLIENT, 0.0)
    server.receive_datagram(b"\x00junk", CLIENT, 0.0)
    assert server.datagrams_to_send() == []
    assert (server.stats.bad_options, server.stats.format_errors, server.stats.garbage) == (2, 2, 1)
    rejected = []
    while (event := server.next_event()) is not None:
        assert isinstance(event, MessageRejected) and event.peer == CLIENT
        rejected.append((event.mid, event.answer))
    assert rejected == [(7, "4.02"), (8, "RST"), (9, "RST"), (10, None), (None, None)]


def test_nstart_queues_requests_per_peer() -> None:
    pair = Pair()
    first = pair.client.request(SERVER, get("a"), pair.now)
    second = pair.client.request(SERVER, get("b"), pair.now)
    other_peer = pair.client.request(("10.9.9.9", 5683), get("c"), pair.now)
    sent = pair.client.datagrams_to_send()
    assert [peer for _, peer in sent] == [SERVER, ("10.9.9.9", 5683)]
    pair.server.receive_datagram(sent[0][0], CLIENT, pair.now)
    (event,) = pair.events(pair.server)
    pair.server.respond(event.request, response(Code.CONTENT), pair.now)
    pair.to_client()
    assert first.done and not second.done and second.sent_at == pair.now
    (next_request,) = pair.client.datagrams_to_send()
    assert decode(next_request[0]).uri_path == ["b"]
    assert not other_peer.done


def test_block2_response_is_reassembled() -> None:
    pair = Pair()
    body = bytes(range(256)) * 11  # 2816 bytes: 3 blocks of 1024
    calls = []

    def handler(request: Message) -> Message:
        calls.append(request)
        return response(Code.CONTENT, body)

    outgoing = pair.client.request(SERVER, get("large"), pair.now)
    pair.run_until_quiet(handler)
    (event,) = pair.events(pair.client)
    assert isinstance(event, ResponseReceived) and event.request is outgoing
    assert event.response.payload == body
    assert event.response.block2 is None
    assert len(calls) == 1  # later blocks were served from the stored body
    assert pair.server.stats.sent == 3


def test_block2_early_negotiation_and_size2() -> None:
    server = CoapLayer(0.0)
    request = get("large", CON, (OptionNumber.BLOCK2, encode_block(0, False, 2)))
    request.mid, request.token = 1, b"t"
    server.receive_datagram(request.encode(), CLIENT, 0.0)
    (event,) = [server.next_event()]
    server.respond(event.request, response(Code.CONTENT, b"z" * 100), 0.0)
    ((data, _),) = server.datagrams_to_send()
    first = decode(data)
    assert first.block2 == (0, True, 2) and first.size2 == 100 and first.payload == b"z" * 64
    later = get("large", CON, (OptionNumber.BLOCK2, encode_block(1, False, 2)))
    later.mid, later.token = 2, b"u"
    server.receive_datagram(later.encode(), CLIENT, 0.0)
    ((data, _),) = server.datagrams_to_send()
    second = decode(data)
    assert second.block2 == (1, False, 2) and second.payload == b"z" * 36 and second.token == b"u"
    assert server.next_event() is None


def test_block1_upload_with_server_asking_for_smaller_blocks() -> None:
    pair = Pair(server_params=TransmissionParameters(block_szx=4))
    body = bytes(random.Random(5).getrandbits(8) for _ in range(3000))
    request = Message(CON, Code.POST, 0, b"", [(OptionNumber.URI_PATH, b"large-post")], body)
    seen = []

    def handler(received: Message) -> Message:
        seen.append(received)
        return response(Code.CHANGED, b"ok")

    outgoing = pair.client.request(SERVER, request, pair.now)
    pair.run_until_quiet(handler)
    (only,) = seen
    assert only.payload == body and only.block1 is None
    (event,) = pair.events(pair.client)
    assert event.request is outgoing and event.response.code == Code.CHANGED
    assert event.response.block1 is not None and not event.response.block1.more
    # 1024 first, then 256-byte blocks: 1 + ceil(1976 / 256) = 9 exchanges.
    assert pair.server.stats.sent == 9


def test_block1_out_of_order_and_too_large() -> None:
    server = CoapLayer(0.0, TransmissionParameters(max_body_size=2048))
    orphan = Message(CON, Code.PUT, 1, b"a", [(11, b"p"), (OptionNumber.BLOCK1, encode_block(3, True, 2))], b"x" * 64)
    server.receive_datagram(orphan.encode(), CLIENT, 0.0)
    ((data, _),) = server.datagrams_to_send()
    assert decode(data).code == Code.REQUEST_ENTITY_INCOMPLETE
    huge = Message(CON, Code.PUT, 2, b"b", [(11, b"p"), (OptionNumber.BLOCK1, encode_block(0, True, 6)),
                                          (OptionNumber.SIZE1, encode_uint(99999))], b"x" * 1024)
    server.receive_datagram(huge.encode(), CLIENT, 0.0)
    ((data, _),) = server.datagrams_to_send()
    reply = decode(data)
    assert reply.code == Code.REQUEST_ENTITY_TOO_LARGE and reply.size1 == 2048
    assert server.next_event() is None


def observe_pair() -> tuple[Pair, OutgoingRequest, object]:
    pair = Pair()
    outgoing = pair.client.request(SERVER, get("obs", CON, (OptionNumber.OBSERVE, b"")), pair.now)
    pair.to_server()
    (event,) = pair.events(pair.server)
    relation = pair.server.respond(
        event.request, response(Code.CONTENT, b"t0", options=[(OptionNumber.OBSERVE, b"")]), pair.now
    )
    assert relation is not None and pair.server.observer_count == 1
    pair.to_client()
    (first,) = pair.events(pair.client)
    assert first.response.payload == b"t0" and first.rtt == 0.0
    return pair, outgoing, relation


def test_observe_notifications_con_and_non_in_order() -> None:
    pair, outgoing, relation = observe_pair()
    for index, confirmable in enumerate([False, True, False], start=1):
        pair.now += 5
        pair.server.notify(relation, response(Code.CONTENT, f"t{index}".encode()), pair.now, confirmable)
        (data,) = pair.to_client()
        assert decode(data).mtype == (CON if confirmable else NON)
        (event,) = pair.events(pair.client)
        assert event.response.payload == f"t{index}".encode() and event.request is outgoing
        assert event.rtt is None
        pair.to_server()  # the ACK of a CON notification
    assert not outgoing.done
    pair.server.handle_timer(pair.now + 100)
    assert pair.server.datagrams_to_send() == []  # acknowledged: no retransmission


def test_stale_notification_is_dropped() -> None:
    pair, outgoing, relation = observe_pair()
    pair.server.notify(relation, response(Code.CONTENT, b"new"), pair.now, False)
    newer = pair.server.datagrams_to_send()[0][0]
    pair.server.notify(relation, response(Code.CONTENT, b"newer"), pair.now, False)
    newest = pair.server.datagrams_to_send()[0][0]
    pair.client.receive_datagram(newest, SERVER, pair.now)
    pair.client.receive_datagram(newer, SERVER, pair.now + 1)  # reordered on the way
    assert [e.response.payload for e in pair.events(pair.client)] == [b"newer"]
    assert pair.client.stats.stale_notifications == 1
    # RFC 7641 section 3.4: after 128 s anything is fresh again (new MID: not a duplicate).
    pair.client.receive_datagram(newer[:2] + b"\x00\x01" + newer[4:], SERVER, pair.now + 200)
    assert [e.response.payload for e in pair.events(pair.client)] == [b"new"]


@pytest.mark.parametrize(
    ("last", "value", "fresh"),
    [(5, 6, True), (6, 5, False), ((1 << 24) - 2, 3, True), (3, (1 << 24) - 2, False), (0, 1 << 23, False)],
)
def test_observe_sequence_wraparound(last: int, value: int, fresh: bool) -> None:
    outgoing = OutgoingRequest(SERVER, get("o"), b"t", None)
    outgoing._last_observe = (last, 10.0)
    assert outgoing.observe_is_fresh(value, 20.0) is fresh


def test_reactive_cancel_resets_next_notification_and_server_forgets() -> None:
    pair, outgoing, relation = observe_pair()
    pair.client.cancel(outgoing, pair.now, deregister=False)
    assert outgoing.done
    pair.server.notify(relation, response(Code.CONTENT, b"x"), pair.now, False)
    pair.to_client()
    (rst,) = pair.to_server()
    assert decode(rst).mtype == RST
    (event,) = pair.events(pair.server)
    assert isinstance(event, ObserveCancelled) and event.reason == "reset"
    assert not relation.active and pair.server.observer_count == 0
    assert pair.events(pair.client) == []


def test_proactive_deregistration() -> None:
    pair, outgoing, relation = observe_pair()
    pair.client.cancel(outgoing, pair.now)
    (data,) = pair.to_server()
    assert decode(data).observe == 1 and decode(data).token == outgoing.token
    cancelled, request = pair.events(pair.server)
    assert isinstance(cancelled, ObserveCancelled) and cancelled.reason == "deregistered"
    assert isinstance(request, RequestReceived)
    pair.server.respond(request.request, response(Code.CONTENT, b"final"), pair.now)
    pair.to_client()
    (event,) = pair.events(pair.client)
    assert event.response.payload == b"final" and outgoing.done


def test_unacknowledged_con_notification_cancels_relation() -> None:
    pair, outgoing, relation = observe_pair()
    pair.server.notify(relation, response(Code.CONTENT, b"1"), pair.now, True)
    pair.now = pair.server.get_timer()
    pair.server.handle_timer(pair.now)
    assert [decode(d).payload for d, _ in pair.server.datagrams_to_send()] == [b"1", b"1"]
    # A newer notification takes over the retransmission state (RFC 7641 4.5.2):
    # one retransmission is used up, three remain.
    pair.server.notify(relation, response(Code.CONTENT, b"2"), pair.now, True)
    while relation.active:
        pair.server.handle_timer(pair.server.get_timer())
    sent = pair.server.datagrams_to_send()
    assert [decode(d).payload for d, _ in sent] == [b"2"] * 4
    (event,) = pair.events(pair.server)
    assert isinstance(event, ObserveCancelled) and event.reason == "timeout"


def test_large_notification_is_fetched_block_wise() -> None:
    pair, outgoing, relation = observe_pair()
    body = b"n" * 2500
    pair.server.notify(relation, response(Code.CONTENT, body), pair.now, False)
    pair.run_until_quiet()
    (event,) = pair.events(pair.client)
    assert event.response.payload == body and event.request is outgoing


def test_unexpected_con_response_is_reset() -> None:
    client = CoapLayer(0.0)
    stray = Message(CON, Code.CONTENT, 77, b"nobody", [], b"?").encode()
    client.receive_datagram(stray, SERVER, 0.0)
    assert client.datagrams_to_send() == [(encode_empty(RST, 77), SERVER)]
    assert client.next_event() is None and client.stats.unmatched == 1


def test_dedup_memory_stays_bounded_as_clients_come_and_go() -> None:
    server = CoapLayer(0.0)
    now = 0.0
    sizes = []
    for second in range(2000):
        now = float(second)
        server.handle_timer(now)
        for client in range(5):
            peer = ("10.1.0.1", 10000 + second * 5 + client)
            data = Message(CON, Code.GET, second & 0xFFFF, b"", [(11, b"x")]).encode()
            server.receive_datagram(data, peer, now)
            event = server.next_event()
            server.respond(event.request, response(Code.CONTENT), now)
        server.datagrams_to_send()
        sizes.append(len(server._dedup))
    lifetime = server.params.exchange_lifetime
    # Never more than lifetime * 4/3 seconds' worth of entries.
    assert max(sizes) <= 5 * (lifetime * 4 / 3 + 1)
    assert sizes[-1] >= 5 * lifetime


version_one = st.builds(lambda first, rest: bytes([first]) + rest, st.integers(0x40, 0x7F), st.binary(max_size=40))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), version_one), max_size=8))
def test_fuzzed_datagrams_only_count_or_answer(datagrams: list[bytes]) -> None:
    layer = CoapLayer(0.0, rng=random.Random(0))
    for data in datagrams:
        layer.receive_datagram(data, CLIENT, 0.0)
    while (event := layer.next_event()) is not None:
        if isinstance(event, MessageRejected):
            continue
        assert isinstance(event, RequestReceived)
        layer.respond(event.request, response(Code.CONTENT, b"ok"), 0.0)
    for data, peer in layer.datagrams_to_send():
        decode(data)  # whatever we send is well-formed
        assert peer == CLIENT
    layer.handle_timer(layer.get_timer())


def test_error_notification_ends_the_relation_on_both_sides() -> None:
    pair, outgoing, relation = observe_pair()
    pair.server.notify(relation, response(Code.NOT_FOUND), pair.now, True)
    (data,) = pair.to_client()
    assert decode(data).observe is None and decode(data).code == Code.NOT_FOUND
    (cancelled,) = pair.events(pair.server)
    assert isinstance(cancelled, ObserveCancelled) and cancelled.reason == "final notification 4.04"
    (final,) = pair.events(pair.client)
    assert final.response.code == Code.NOT_FOUND and outgoing.done
    # The final CON is still retransmitted until acknowledged, then nothing more.
    pair.server.handle_timer(pair.server.get_timer())
    assert len(pair.server.datagrams_to_send()) == 1
    pair.to_server()
    assert pair.server.observer_count == 0


def test_non_notifications_turn_con_to_find_vanished_observers() -> None:
    pair, outgoing, relation = observe_pair()
    pair.server.params = TransmissionParameters(notification_check_count=3, notification_check_interval=60.0)
    types = []
    for _ in range(4):
        pair.server.notify(relation, response(Code.CONTENT, b"n"), pair.now, confirmable=False)
        types += [decode(data).mtype for data, _ in pair.server.datagrams_to_send()]
    assert types == [NON, NON, CON, NON]  # every third, RFC 7641 section 4.5
    pair.now += 61  # and whenever the last CON is older than the check interval
    pair.server.notify(relation, response(Code.CONTENT, b"n"), pair.now, confirmable=False)
    assert [decode(data).mtype for data, _ in pair.server.datagrams_to_send()] == [CON]
    # The client vanished: nobody acknowledges the CON, the relation ends.
    while relation.active:
        pair.server.handle_timer(pair.server.get_timer())
    assert any(isinstance(e, ObserveCancelled) and e.reason == "timeout" for e in pair.events(pair.server))


def test_block_wise_state_is_bounded() -> None:
    server = CoapLayer(0.0, TransmissionParameters(max_block_transfers=8))
    for index in range(50):
        upload = Message(CON, Code.PUT, index, b"t", [(11, b"p"), (OptionNumber.BLOCK1, encode_block(0, True, 0))],
                         b"x" * 16)
        server.receive_datagram(upload.encode(), ("10.2.0.1", 1000 + index), 0.0)
    assert len(server._block1_uploads) <= 8
    assert all(decode(data).code == Code.CONTINUE for data, _ in server.datagrams_to_send())


def test_outgoing_request_remembers_its_latest_mid() -> None:
    pair = Pair()
    outgoing = pair.client.request(SERVER, get("x"), pair.now)
    (data,) = pair.to_server()
    assert outgoing.mid == decode(data).mid
    assert f"MID={outgoing.mid}" in repr(outgoing) and outgoing.token.hex() in repr(outgoing)


def test_overall_timeout_cuts_retransmissions_short() -> None:
    pair = Pair()
    outgoing = pair.client.request(SERVER, get("lost"), pair.now, timeout=5.0)
    pair.client.datagrams_to_send()
    while not outgoing.done:
        pair.client.handle_timer(pair.client.get_timer())
    (failed,) = pair.events(pair.client)
    assert isinstance(failed, RequestFailed) and failed.reason == "timeout"
    assert pair.client.get_timer() > pair.now + 5.0  # nothing left but the store sweeps
    sent = pair.client.datagrams_to_send()
    assert 1 <= len(sent) <= 2  # at most one retransmission fitted into 5 s


def test_layer_follows_the_datagram_core_contract() -> None:
    from nettester.interfaces import DatagramCore

    layer: DatagramCore = CoapLayer(0.0)  # checked by mypy
    assert all(callable(getattr(layer, name)) for name in (
        "receive_datagram", "datagrams_to_send", "get_timer", "handle_timer", "next_event"))
    layer.receive_datagram(encode_empty(CON, 7), CLIENT, 0.0)  # a ping
    assert layer.datagrams_to_send() == [(encode_empty(RST, 7), CLIENT)]
    assert layer.next_event() is None and layer.get_timer() > 0.0
    layer.handle_timer(layer.get_timer())
