"""What independent clients found (issue 12 section 3), each reproduced against the served tree."""

from __future__ import annotations

import random

import cbor2
from coap_testing import CLIENT, SERVER, Server, World, accept, request, results
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.link import PeerContext
from nettester.protocols.coap.blockwise import Block1Uploads, BlockRefusal, cache_key
from nettester.protocols.coap.endpoint import RequestHandler
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.layer import CoapLayer
from nettester.protocols.coap.linkformat import Link, parse_links
from nettester.protocols.coap.message import (
    CON,
    BlockValue,
    Code,
    ContentFormat,
    Message,
    OptionNumber,
    decode,
    encode_block,
    encode_uint,
)
from nettester.protocols.coap.parameters import TransmissionParameters
from nettester.protocols.coap.resources import Exchange, Resource, build_site
from nettester.protocols.coap.resources.plugtest import LARGE_SIZE
from nettester.protocols.coap.server import PLUGTEST_BLOCK_SZX

TEXT = [(OptionNumber.CONTENT_FORMAT, encode_uint(ContentFormat.TEXT_PLAIN))]
XML = [(OptionNumber.CONTENT_FORMAT, encode_uint(ContentFormat.XML))]


def links(server: Server, query: str = "") -> dict[str, Link]:
    found = parse_links(server.ask(request(".well-known/core" + query)).payload.decode())
    return {link.target: link for link in found}


# -- TD_COAP_LINK_09


def test_path_lists_its_children_and_sub_resources_answer_their_path() -> None:
    server = Server()
    listing = server.ask(request("path"))
    assert listing.code == Code.CONTENT and listing.content_format == ContentFormat.LINK_FORMAT
    assert [link.target for link in parse_links(listing.payload.decode())] == [
        "/path/sub1", "/path/sub2", "/path/sub3"]
    sub = server.ask(request("path/sub1"))
    assert sub.payload == b"/path/sub1" and sub.content_format == ContentFormat.TEXT_PLAIN


# -- TD_COAP_OBS_08, OBS_04


def observe(server: Server, path: str) -> tuple[list[Message], list[object]]:
    notes: list[Message] = []
    observation = server.world.client.observe(SERVER, request(path), lambda e: notes.append(e.response))
    server.world.exchange()
    return notes, results(observation.finished)


def test_put_of_another_content_format_ends_the_observation_with_4_06() -> None:
    server = Server()
    notes, ended = observe(server, "obs")
    assert notes[0].option(OptionNumber.MAX_AGE) == encode_uint(5)  # Californium's Max-Age of notifications
    assert server.ask(request("obs", Code.PUT, payload=b"<a/>", options=XML)).code == Code.CHANGED
    server.world.exchange()
    (final,) = ended
    assert isinstance(final, ResponseReceived)
    assert final.response.code == Code.NOT_ACCEPTABLE and final.response.observe is None
    assert server.site.find("/obs").observers == []  # type: ignore[union-attr]
    assert server.ask(request("obs", Code.PUT, payload=b"x")).code == Code.BAD_REQUEST  # no Content-Format


def test_put_of_the_same_content_format_notifies() -> None:
    server = Server()
    notes, ended = observe(server, "obs")
    server.ask(request("obs", Code.PUT, payload=b"now", options=TEXT))
    server.world.exchange()
    assert notes[-1].payload == b"now" and notes[-1].observe is not None and ended == []


def test_obs_reset_ends_every_observation() -> None:
    server = Server()
    obs_notes, obs_ended = observe(server, "obs")
    non_notes, non_ended = observe(server, "obs-non")
    assert server.ask(request("obs-reset", Code.POST, payload=b"open")).code == Code.FORBIDDEN
    assert server.ask(request("obs-reset", Code.POST, payload=b"sesame")).code == Code.CHANGED
    for path in ("/obs", "/obs-non"):
        assert server.site.find(path).observers == []  # type: ignore[union-attr]
    assert server.world.server.core.observer_count == 0
    # Dropped without a word: the clients re-register when Max-Age (5 s) runs out.
    server.world.advance(11.0, step=0.5)
    assert len(obs_notes) == 1 and len(non_notes) == 1 and obs_ended == [] and non_ended == []


def test_obs_reset_notfound_sends_4_04() -> None:
    server = Server()
    _, ended = observe(server, "obs")
    assert server.ask(request("obs-reset?notfound", Code.POST, payload=b"sesame")).code == Code.CHANGED
    server.world.exchange()
    assert ended[0].response.code == Code.NOT_FOUND  # type: ignore[attr-defined]


# -- unsupported critical options (RFC 7252 section 5.4.1)


def test_unsupported_critical_options_get_4_02() -> None:
    server = Server()
    for number in (OptionNumber.OSCORE, OptionNumber.EDHOC, OptionNumber.Q_BLOCK2):
        value = b"" if number == OptionNumber.EDHOC else b"\x09\xff"
        answer = server.ask(request("test", options=[(number, value)]))
        assert answer.code == Code.BAD_OPTION, number
    assert server.world.server.stats.bad_options == 3
    assert server.ask(request("test")).code == Code.CONTENT


# -- request size (RFC 7959 section 2.9.3)


def test_size1_above_the_limit_gets_4_13_with_the_limit() -> None:
    server = Server()
    announced = request("large-update", Code.PUT, payload=b"x", options=[*TEXT, (OptionNumber.SIZE1,
                                                                                 encode_uint(100000))])
    answer = server.ask(announced)
    assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE and answer.size1 == 8192


def test_oversized_block_wise_put_gets_4_13() -> None:
    server = Server()
    answer = server.ask(request("large-update", Code.PUT, payload=b"y" * 307203, options=TEXT))
    assert answer.code == Code.REQUEST_ENTITY_TOO_LARGE and answer.size1 == 8192
    assert len(server.world.server.core._block1_uploads) == 0
    fitting = server.ask(request("large-update", Code.PUT, payload=b"z" * 8192, options=TEXT))
    assert fitting.code == Code.CHANGED


def test_the_body_limit_is_configurable() -> None:
    layer = CoapLayer(0.0, TransmissionParameters(max_body_size=100))
    put = Message(CON, Code.PUT, 1, b"t", [(OptionNumber.URI_PATH, b"p")], b"x" * 101)
    layer.receive_datagram(put.encode(), CLIENT, 0.0)
    ((data, _),) = layer.datagrams_to_send()
    assert decode(data).code == Code.REQUEST_ENTITY_TOO_LARGE and decode(data).size1 == 100


def block(num: int, more: bool = True, szx: int = 0) -> BlockValue:
    return BlockValue(num, more, szx)


def test_reassembly_is_bounded_per_peer() -> None:
    uploads = Block1Uploads(100.0, max_body_size=1000, max_uploads=100, max_uploads_per_peer=2, max_bytes=10_000)
    keys = [cache_key(Message(CON, Code.PUT, 0, b"", [(OptionNumber.URI_PATH, bytes([n]))])) for n in range(3)]
    for key in keys:
        assert uploads.receive("peer", key, block(0), b"x" * 16, None, 0.0) is None
    assert len(uploads) == 2 and uploads.evicted == 1
    # The evicted first upload cannot continue; the others can, and another peer is not affected.
    assert isinstance(uploads.receive("peer", keys[0], block(1), b"x" * 16, None, 1.0), BlockRefusal)
    assert uploads.receive("other", keys[0], block(0), b"x" * 16, None, 1.0) is None
    assert uploads.receive("peer", keys[2], block(1, more=False), b"end", None, 1.0) == b"x" * 16 + b"end"
    assert uploads.bytes_held == 32


def test_reassembly_is_bounded_in_total() -> None:
    uploads = Block1Uploads(100.0, max_body_size=1000, max_uploads=100, max_uploads_per_peer=4, max_bytes=64)
    key = cache_key(Message(CON, Code.PUT, 0, b"", [(OptionNumber.URI_PATH, b"p")]))
    for peer in range(10):
        assert uploads.receive(peer, key, block(0, szx=1), b"x" * 32, None, float(peer)) is None
        assert uploads.bytes_held <= 64
    assert len(uploads) == 2 and uploads.evicted == 8
    uploads.sweep(200.0)
    assert len(uploads) == 0 and uploads.bytes_held == 0 and uploads.next_sweep == float("inf")


# -- addresses of a dual-stack socket


def test_ipv4_peers_of_a_dual_stack_socket_show_as_ipv4() -> None:
    server = Server()
    server.world.server_link.context = PeerContext(address=("::ffff:127.0.0.1", 40000), scheme="coaps",
                                                   previous_address=("::ffff:127.0.0.2", 1))
    text = server.ask(request("mycontext")).payload.decode().splitlines()
    assert text[:2] == ["ip: 127.0.0.1", "port: 40000"] and "prev-ip: 127.0.0.2" in text
    assert server.ask(request("myip")).payload == b"127.0.0.1:40000"
    history = cbor2.loads(server.ask(request("requests?dev=d&rid=1&ep", Code.POST, options=accept(60))).payload)
    assert history[1]["ep"] == bytes([127, 0, 0, 1])


# -- /benchmark


def test_benchmark_queries_as_californium() -> None:
    server = Server()
    assert server.ask(request("benchmark?rlen=0")).payload == b"hello benchmark"
    assert server.ask(request("benchmark?rlen=8192")).code == Code.CONTENT
    assert server.ask(request("benchmark?rlen=8193")).code == Code.BAD_OPTION
    assert server.ask(request("benchmark?rlen=-1")).code == Code.BAD_OPTION
    assert server.ask(request("benchmark?size=3")).code == Code.BAD_OPTION


# -- link format


def test_link_format_as_californium() -> None:
    server = Server()
    found = links(server)
    for path in ("/test", "/seg1", "/query", "/separate", "/large", "/large-separate", "/obs", "/obs-non"):
        assert found[path].values("ct") == ["0"], path
    assert found["/large-create"].values("ct") == ["40"]
    assert found["/obs"].values("obs") == [None] and found["/test"].values("obs") == []
    assert found["/obs-reset"].attributes == ()
    assert "/shutdown" in found and "/create1" not in found
    assert found["/large-update"].values("title") == ["Large resource that can be updated using PUT method"]
    assert found["/mycontext"].values("title") == ["Communication Context"]
    assert found["/large-update"].values("sz") == [str(LARGE_SIZE)]
    server.ask(request("large-update", Code.PUT, payload=b"u" * 2000, options=XML))
    updated = links(server)["/large-update"]
    assert updated.values("sz") == ["2000"] and updated.values("ct") == ["41"]
    created = request("create1", Code.PUT, payload=b"c", options=TEXT)
    assert server.ask(created).code == Code.CREATED
    assert "/create1" in links(server)


# -- smaller deviations


def test_get_test_has_max_age_30() -> None:
    assert Server().ask(request("test")).option(OptionNumber.MAX_AGE) == encode_uint(30)


def test_create1_clears_on_4_12_and_needs_a_content_format() -> None:
    server = Server()
    assert server.ask(request("create1", Code.PUT, payload=b"c")).code == Code.BAD_REQUEST
    guarded = request("create1", Code.PUT, payload=b"c", options=[(OptionNumber.IF_NONE_MATCH, b""), *TEXT])
    assert server.ask(guarded).code == Code.CREATED
    assert server.ask(guarded).code == Code.PRECONDITION_FAILED
    assert server.ask(request("create1")).code == Code.NOT_FOUND  # the 4.12 reset it
    assert server.ask(guarded).code == Code.CREATED


def test_plugtest_endpoints_send_64_byte_blocks() -> None:
    from coap_testing import UdpClock

    from nettester.protocols.coap.server import CoapServerService

    clock = UdpClock()
    service = CoapServerService(clock, 0, ["127.0.0.1"])
    service.startService()
    by_kind = {name: endpoint for (_, _, _, name), endpoint in zip(service.listening, service.endpoints, strict=True)}
    assert by_kind["plugtest"].core.params.block_szx == PLUGTEST_BLOCK_SZX == 2
    assert by_kind["extended"].core.params.block_szx == 6
    service.stopService()
    world = World(server_params=TransmissionParameters(block_szx=PLUGTEST_BLOCK_SZX))
    site = build_site(world.clock, [])
    from nettester.protocols.coap.resources.plugtest import Large

    site.root.add(Large())
    site.attach(world.server)
    got = results(world.client.request(SERVER, request("large")))
    world.exchange()
    assert len(got[0].response.payload) == LARGE_SIZE  # type: ignore[attr-defined]
    assert world.server.stats.sent == LARGE_SIZE // 64


# -- /reverse-request and /reverse-observe, answered by our own client endpoint


class Feed(Resource):
    """What the client serves the server: counts GETs, notifies on demand."""

    observable = True

    def __init__(self) -> None:
        super().__init__("feed-CON")
        self.gets: list[list[str]] = []

    def get(self, exchange: Exchange) -> Message:
        self.gets.append(exchange.request.uri_query)
        return Message(CON, Code.CONTENT, 0, b"", [(OptionNumber.CONTENT_FORMAT, encode_uint(0))], b"feed")


def client_serving_feed(server: Server) -> Feed:
    feed = Feed()
    client_site = build_site(server.world.clock, [feed])
    client_site.attach(server.world.client)
    handler: RequestHandler | None = server.world.client.handler
    assert handler is not None
    return feed


def test_reverse_request_sends_gets_to_the_client() -> None:
    server = Server()
    feed = client_serving_feed(server)
    assert server.ask(request("reverse-request?req=3&res=feed-CON&rlen=400", Code.POST)).code == Code.CHANGED
    server.world.advance(1.0)
    assert feed.gets == [["rlen=400"]] * 3
    stats = server.ask(request("reverse-request", Code.POST))
    assert stats.code == Code.CONTENT and stats.payload == b"3 reverse-requests, 3 sent, 0 pending."
    assert server.ask(request("reverse-request?req=x&res=feed-CON", Code.POST)).code == Code.BAD_OPTION


def test_reverse_observe_observes_the_client() -> None:
    server = Server()
    feed = client_serving_feed(server)
    answered = results(server.world.client.request(SERVER, request("reverse-observe?obs=2&res=feed-CON",
                                                                   Code.POST)))
    server.world.advance(0.5)
    (event,) = answered
    assert isinstance(event, ResponseReceived) and event.response.code == Code.CHANGED
    token = bytes.fromhex(event.response.payload.decode())
    assert len(feed.observers) == 1 and feed.observers[0].token == token
    for _ in range(3):
        feed.changed()
        server.world.exchange()
    # Re-registered after obs=2 notifications; the forgotten registration was reset by its next notification.
    tokens = {relation.token for relation in feed.observers}
    assert tokens and token not in tokens
    stats = server.ask(request("reverse-observe", Code.POST)).payload
    assert stats.startswith(b"1 active observes, ")
    assert server.ask(request("reverse-observe?obs=0&res=feed-CON", Code.POST)).code == Code.CHANGED
    server.world.advance(0.5)
    feed.changed()  # a registration forgotten at re-registration is reset by its next notification
    server.world.exchange()
    assert feed.observers == [] and server.ask(request("reverse-observe", Code.POST)).payload.startswith(b"0 active")


def test_reverse_observe_of_a_missing_resource_answers_its_error() -> None:
    server = Server()
    client_serving_feed(server)
    answered = results(server.world.client.request(SERVER, request("reverse-observe?obs=1&res=nothing",
                                                                   Code.POST)))
    server.world.advance(0.5)
    assert answered[0].response.code == Code.NOT_FOUND  # type: ignore[attr-defined]


def test_block_helpers_keep_random_bodies() -> None:
    rng = random.Random(5)
    body = bytes(rng.randrange(256) for _ in range(3000))
    uploads = Block1Uploads(100.0, 8192, 10, 2, 1 << 20)
    key = cache_key(Message(CON, Code.PUT, 0, b"", []))
    result: bytes | BlockRefusal | None = None
    for num in range(0, 3000 // 64 + 1):
        chunk = body[num * 64: num * 64 + 64]
        result = uploads.receive("p", key, BlockValue(num, (num + 1) * 64 < 3000, 2), chunk, None, 0.0)
    assert result == body
    assert encode_block(0, True, 2)  # the helper used by clients encodes what the layer decodes


def test_cluster_headers_carry_ipv4_clients_in_4_bytes() -> None:
    from nettester.addresses import mapped_for, unmapped_host
    from nettester.cluster.wire import ManagementCodec

    codec = ManagementCodec()
    header = codec.encode_records(63, ("::ffff:127.0.0.1", 5684), b"\x19")
    assert header[3] == 4 and header[4:8] == bytes([127, 0, 0, 1])  # type, port, length 4, address
    assert codec.decode_records(header)[0] == ("127.0.0.1", 5684)
    assert unmapped_host("::ffff:10.1.2.3") == "10.1.2.3" and unmapped_host("::1") == "::1"
    import socket

    assert mapped_for(socket.AF_INET6, "10.1.2.3") == "::ffff:10.1.2.3"
    assert mapped_for(socket.AF_INET, "10.1.2.3") == "10.1.2.3"


def test_addresses_read_host_port_in_reprs_and_logs() -> None:
    from nettester.addresses import address_text
    from nettester.protocols.coap.exchanges import IncomingRequest

    assert address_text(("::ffff:192.0.2.9", 5683)) == "192.0.2.9:5683"
    assert address_text(("2001:db8::1", 5684)) == "[2001:db8::1]:5684"
    assert address_text("dtls-peer") == "dtls-peer"
    incoming = IncomingRequest(("::ffff:192.0.2.9", 40000), request("test"))
    assert repr(incoming).endswith("from 192.0.2.9:40000>")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 6), st.booleans(),
                          st.integers(0, 7), st.integers(0, 300), st.floats(0, 50)), max_size=60))
def test_reassembly_bounds_hold_for_any_block_sequence(
        blocks: list[tuple[int, int, int, bool, int, int, float]]) -> None:
    uploads = Block1Uploads(100.0, max_body_size=1200, max_uploads=6, max_uploads_per_peer=2, max_bytes=900)
    keys = [cache_key(Message(CON, Code.PUT, 0, b"", [(OptionNumber.URI_PATH, bytes([n]))])) for n in range(4)]
    now = 0.0
    for peer, key, num, more, szx, length, step in blocks:
        now += step
        uploads.sweep(now)
        result = uploads.receive(peer, keys[key], BlockValue(num, more, szx), b"x" * length, None, now)
        assert result is None or isinstance(result, (bytes, BlockRefusal))
        if isinstance(result, bytes):
            assert len(result) <= 900
        assert uploads.bytes_held <= 900 and len(uploads) <= 6
        assert uploads.bytes_held == sum(len(upload.body) for upload in uploads._uploads.values())
        assert all(count <= 2 for count in uploads._per_peer.values())
