"""Plugtest and extended resources served by a Site through a CoapEndpoint."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from coap_testing import SERVER, Server, accept, request, results
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nettester.link import PeerContext
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.linkformat import parse_links
from nettester.protocols.coap.message import (
    ACK,
    CON,
    NON,
    Code,
    ContentFormat,
    Message,
    OptionNumber,
    decode,
    encode_uint,
)
from nettester.protocols.coap.resources.plugtest import LARGE_SIZE

TEXT_FORMAT = [(OptionNumber.CONTENT_FORMAT, encode_uint(ContentFormat.TEXT_PLAIN))]


def test_default_test_resource_methods() -> None:
    server = Server()
    got = server.ask(request("test"))
    assert got.code == Code.CONTENT and b"Code: 1 (GET)" in got.payload
    created = server.ask(request("test", Code.POST, payload=b"x"))
    assert created.code == Code.CREATED
    assert created.option_values(OptionNumber.LOCATION_PATH) == [b"location1", b"location2", b"location3"]
    assert server.ask(request("test", Code.PUT, payload=b"x")).code == Code.CHANGED
    guarded = request("test", Code.PUT, payload=b"x", options=[(OptionNumber.IF_NONE_MATCH, b"")])
    assert server.ask(guarded).code == Code.PRECONDITION_FAILED
    assert server.ask(request("test", Code.DELETE)).code == Code.DELETED
    assert server.ask(request("nothing-here")).code == Code.NOT_FOUND
    assert server.ask(request("seg1/seg2", Code.POST)).code == Code.METHOD_NOT_ALLOWED


def test_segments_query_location_query() -> None:
    server = Server()
    assert server.ask(request("seg1/seg2/seg3")).payload == b"Long path resource seg3"
    assert b"Query: first=1&second=2" in server.ask(request("query?first=1&second=2")).payload
    located = server.ask(request("location-query", Code.POST))
    assert located.option_values(OptionNumber.LOCATION_QUERY) == [b"first=1", b"second=2"]


def test_separate_answers_after_one_second_with_empty_ack_first() -> None:
    server = Server()
    got = results(server.world.client.request(SERVER, request("separate")))
    server.world.client_link.flush()
    (empty_ack,) = server.world.server_link.sent
    assert decode(empty_ack[0]).mtype == ACK and decode(empty_ack[0]).code == 0
    server.world.exchange()
    server.world.advance(0.9)
    assert got == []
    server.world.advance(0.2)
    assert got[0].response.code == Code.CONTENT


def test_large_is_block_wise_and_large_update_round_trip() -> None:
    server = Server()
    large = server.ask(request("large"))
    assert len(large.payload) == LARGE_SIZE
    assert server.world.server.stats.sent == 2  # 1024 + 256
    body = bytes(range(256)) * 8
    put = request("large-update", Code.PUT, payload=body,
                  options=[(OptionNumber.CONTENT_FORMAT, encode_uint(ContentFormat.OCTET_STREAM))])
    assert server.ask(put).code == Code.CHANGED
    back = server.ask(request("large-update"))
    assert back.payload == body and back.content_format == ContentFormat.OCTET_STREAM
    text = (b"hello block-wise " * 100)[:1500]
    upper = server.ask(request("large-post", Code.POST, payload=text, options=TEXT_FORMAT))
    assert upper.code == Code.CHANGED and upper.payload == text.upper()  # as Californium: upper-cased
    assert server.ask(request("large-post", Code.POST, payload=text)).code == Code.BAD_REQUEST  # no Content-Format
    assert server.ask(request("large-update", Code.PUT, payload=b"x")).code == Code.BAD_REQUEST


def test_large_create_and_link_listing() -> None:
    server = Server()
    created = server.ask(request("large-create", Code.POST, payload=b"c" * 2000))
    location = [v.decode() for v in created.option_values(OptionNumber.LOCATION_PATH)]
    assert created.code == Code.CREATED and location == ["large-create", "1"]
    assert server.ask(request("large-create/1")).payload == b"c" * 2000
    listing = parse_links(server.ask(request("large-create")).payload.decode())
    assert [link.target for link in listing] == ["/large-create/1"]
    assert server.ask(request("large-create/1", Code.DELETE)).code == Code.DELETED
    assert server.ask(request("large-create/1")).code == Code.NOT_FOUND


def test_well_known_core_with_filters() -> None:
    server = Server()
    everything = parse_links(server.ask(request(".well-known/core")).payload.decode())
    targets = {link.target for link in everything}
    assert {"/obs", "/large", "/path/sub2", "/benchmark", "/mycontext"} <= targets
    assert "/shutdown" in targets and "/create1" not in targets  # as Californium: create1 hidden until created
    obs = next(link for link in everything if link.target == "/obs")
    assert obs.values("obs") == [None]
    filtered = parse_links(server.ask(request(".well-known/core?rt=Type2")).payload.decode())
    assert [link.target for link in filtered] == ["/link1", "/link2"]
    by_href = parse_links(server.ask(request(".well-known/core?href=/path*")).payload.decode())
    assert [link.target for link in by_href] == ["/path", "/path/sub1", "/path/sub2", "/path/sub3"]


@pytest.mark.parametrize(
    ("content_format", "decoder"),
    [
        (ContentFormat.TEXT_PLAIN, lambda b: b.decode()),
        (ContentFormat.XML, lambda b: b.decode()),
        (ContentFormat.JSON, json.loads),
        (ContentFormat.CBOR, cbor2.loads),
    ],
)
def test_multi_format(content_format: int, decoder: Any) -> None:
    server = Server()
    got = server.ask(request("multi-format", options=accept(content_format)))
    assert got.code == Code.CONTENT and got.content_format == content_format
    assert "GET" in str(decoder(got.payload))


def test_multi_format_not_acceptable() -> None:
    assert Server().ask(request("multi-format", options=accept(ContentFormat.EXI))).code == Code.NOT_ACCEPTABLE


def test_validate_etag_and_create1() -> None:
    server = Server()
    first = server.ask(request("validate"))
    etag = first.option(OptionNumber.ETAG)
    assert etag is not None and first.code == Code.CONTENT
    valid = server.ask(request("validate", options=[(OptionNumber.ETAG, etag)]))
    assert valid.code == Code.VALID and valid.payload == b""
    wrong = request("validate", Code.PUT, payload=b"new", options=[(OptionNumber.IF_MATCH, b"nope")])
    assert server.ask(wrong).code == Code.PRECONDITION_FAILED
    changed = server.ask(request("validate", Code.PUT, payload=b"new", options=[(OptionNumber.IF_MATCH, etag)]))
    assert changed.code == Code.CHANGED and changed.option(OptionNumber.ETAG) != etag
    create = request("create1", Code.PUT, payload=b"once", options=[(OptionNumber.IF_NONE_MATCH, b""), *TEXT_FORMAT])
    assert server.ask(create).code == Code.CREATED
    assert server.ask(create).code == Code.PRECONDITION_FAILED


def test_shutdown_needs_the_password() -> None:
    server = Server()
    assert server.ask(request("shutdown", Code.POST, payload=b"please")).code == Code.FORBIDDEN
    assert server.ask(request("shutdown", Code.POST, payload=b"sesame")).code == Code.CHANGED
    server.world.advance(1.0)
    assert server.shutdowns == [True]


@pytest.mark.parametrize(("path", "mtype"), [("obs", CON), ("obs-non", NON)])
def test_observe_clock_notifies_every_interval(path: str, mtype: int) -> None:
    server = Server(notify_interval=5.0)
    notes: list[Message] = []
    observation = server.world.client.observe(SERVER, request(path), lambda e: notes.append(e.response))
    server.world.exchange()
    server.world.advance(16.0, step=0.5)
    assert len(notes) == 4  # the registration answer and three ticks
    assert all(note.mtype == mtype for note in notes[1:])  # CON for obs, NON for obs-non
    assert notes[1].payload != notes[0].payload  # the time changed
    resource = server.site.find("/" + path)
    assert resource is not None and len(resource.observers) == 1
    observation.cancel()
    server.world.exchange()
    assert resource.observers == []
    server.world.advance(6.0, step=0.5)
    assert len(notes) == 4


def test_observe_delete_sends_4_04_and_ends() -> None:
    server = Server()
    notes: list[Message] = []
    observation = server.world.client.observe(SERVER, request("obs"), lambda e: notes.append(e.response))
    server.world.exchange()
    ended = results(observation.finished)
    assert server.ask(request("obs", Code.DELETE)).code == Code.DELETED
    server.world.exchange()
    assert ended[0].response.code == Code.NOT_FOUND


def test_obs_large_notifications_are_block_wise() -> None:
    server = Server(notify_interval=1.0)
    notes: list[Message] = []
    server.world.client.observe(SERVER, request("obs-large"), lambda e: notes.append(e.response))
    server.world.exchange()
    server.world.advance(1.0)
    assert len(notes) == 2 and all(len(note.payload) == LARGE_SIZE for note in notes)


def test_benchmark_disabled_enabled_rlen_and_ack() -> None:
    assert Server(benchmark=False).ask(request("benchmark")).code == Code.NOT_IMPLEMENTED
    server = Server()
    assert server.ask(request("benchmark", Code.POST)).payload == b"hello benchmark"
    assert server.ask(request("benchmark", Code.POST)).code == Code.CHANGED
    assert server.ask(request("benchmark?rlen=40")).payload == b"hello benchmark" + b"*" * 25
    assert server.ask(request("benchmark?rlen=5")).payload == b"hello"
    assert server.ask(request("benchmark?rlen=x")).code == Code.BAD_OPTION
    separate = results(server.world.client.request(SERVER, request("benchmark?ack")))
    server.world.client_link.flush()
    empty_ack, separate_response = (decode(data) for data, _ in server.world.server_link.sent)
    assert (empty_ack.mtype, empty_ack.code) == (ACK, 0)
    assert separate_response.mtype == 0 and separate_response.code == Code.CONTENT
    server.world.exchange()
    assert separate[0].response.payload == b"hello benchmark"


def test_requests_receive_test_history_and_formats() -> None:
    """The shapes Californium's ReceivetestClient reads (RequestStatistic)."""
    server = Server()
    assert server.ask(request("requests?dev=abc", Code.POST)).code == Code.BAD_OPTION
    assert server.ask(request("requests?dev=abc&rid=a:b", Code.POST)).code == Code.BAD_OPTION
    assert server.ask(request("requests?dev=abc&rid=1&what", Code.POST)).code == Code.BAD_OPTION
    assert server.ask(request("requests?dev=abc&rid=1&rlen=0", Code.POST)).code == Code.BAD_OPTION
    assert server.ask(request("requests?dev=abc&rid=1&rlen=1024", Code.POST)).code == Code.BAD_OPTION
    server.site.find("/requests").devices.clear()  # type: ignore[union-attr]
    for rid in range(30):
        server.world.clock.advance(1)
        got = server.ask(request(f"requests?dev=abc&rid=r{rid}&ep&rlen=1023", Code.POST))
    assert got.code == Code.CHANGED and got.content_format == ContentFormat.TEXT_PLAIN
    lines = got.payload.decode().split("\n")
    assert lines[0] == "systemstart:1000000" and lines[-1] == ""
    assert len(lines) == 26 and lines[1] == "r29:1030000" and lines[24] == "r6:1007000"  # 24 kept
    short = server.ask(request("requests?dev=abc&rid=r30&rlen=60", Code.POST)).payload
    assert short == b"systemstart:1000000\nr30:1030000\nr29:1030000\nr28:1029000\n"  # 56 of rlen=60 bytes
    as_json = json.loads(server.ask(request("requests?dev=other&rid=r1&ep", Code.POST, options=accept(50))).payload)
    assert as_json == [{"systemstart": 1000000}, {"rid": "r1", "time": 1030000, "ep": "192.0.2.2", "port": 40000}]
    as_cbor = cbor2.loads(server.ask(request("requests?dev=other&rid=r2", Code.POST, options=accept(60))).payload)
    assert as_cbor[0] == {"systemstart": 1000000}
    assert as_cbor[1] == {"rid": "r2", "time": 1030000}
    assert as_cbor[2] == {"rid": "r1", "time": 1030000, "ep": bytes([192, 0, 2, 2]), "port": 40000}


def test_requests_evicts_least_recently_updated_device() -> None:
    server = Server()
    requests = server.site.find("/requests")
    assert requests is not None
    requests.max_devices = 2  # type: ignore[attr-defined]
    for device in ("a", "b", "a", "c"):
        server.ask(request(f"requests?dev={device}&rid=1", Code.POST))
    assert list(requests.devices) == ["a", "c"]  # type: ignore[attr-defined]


def test_mycontext_and_myip() -> None:
    server = Server()
    assert server.ask(request("myip")).payload == b"192.0.2.2:40000"
    text = server.ask(request("mycontext")).payload.decode()
    assert text.splitlines() == ["ip: 192.0.2.2", "port: 40000", "server: test-server"]
    xml = server.ask(request("mycontext", options=accept(ContentFormat.XML)))
    assert xml.content_format == ContentFormat.XML
    assert xml.payload == b'<context ip="192.0.2.2" port="40000" server="test-server" />'
    server.world.server_link.context = PeerContext(
        address=("192.0.2.2", 40000), scheme="coaps", identity="psk-id", cipher_suite="TLS_PSK_WITH_AES_128_CCM_8",
        read_cid=b"\x01\x02", write_cid=b"", node_id=3, via="dtls-cid-router", previous_address=("192.0.2.9", 1),
    )
    context = cbor2.loads(server.ask(request("mycontext", options=accept(60))).payload)
    assert context["peer"] == "psk-id" and context["read-cid"] == "0102" and context["write-cid"] == ""
    assert context["node-id"] == 3 and context["prev-ip"] == "192.0.2.9" and context["prev-port"] == 1
    assert server.ask(request("mycontext", options=accept(ContentFormat.EXI))).code == Code.NOT_ACCEPTABLE


def test_echo() -> None:
    server = Server()
    echoed = server.ask(request("echo", Code.POST, payload=b"ping",
                                options=[(OptionNumber.CONTENT_FORMAT, encode_uint(42))]))
    assert echoed.payload == b"ping" and echoed.content_format == 42


RESOURCE_PATHS = [
    "test", "seg1/seg2/seg3", "query", "separate", "large", "large-update", "large-create", "large-post",
    "large-separate", "obs", "obs-non", "obs-large", "obs-reset", "location-query", "multi-format", "link1",
    "path/sub2", "validate", "create1", "benchmark", "requests", "mycontext", "myip", "echo",
    ".well-known/core", "missing", "path", "path/sub1", "reverse-request", "reverse-observe", "shutdown",
]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(RESOURCE_PATHS),
    code=st.sampled_from([Code.GET, Code.POST, Code.PUT, Code.DELETE, Code.FETCH, 9]),
    query=st.lists(st.sampled_from(["rlen=3", "rlen=x", "rlen=0", "ack", "dev=d", "rid=1", "ep", "rt=Type1", "a=",
                                    "req=2", "res=feed", "obs=1", "obs=0", "timeout=x", "notfound"]), max_size=4),
    extra=st.lists(st.sampled_from([
        (OptionNumber.ACCEPT, b"\x3c"), (OptionNumber.ACCEPT, b"\x2f"), (OptionNumber.CONTENT_FORMAT, b"\x32"),
        (OptionNumber.ETAG, b"e"), (OptionNumber.IF_MATCH, b""), (OptionNumber.IF_NONE_MATCH, b""),
        (OptionNumber.OBSERVE, b""), (OptionNumber.OBSERVE, b"\x01"), (OptionNumber.OSCORE, b"\x09"),
        (OptionNumber.SIZE1, b"\x01\x86\xa0"), (OptionNumber.CONTENT_FORMAT, b""),
    ]), max_size=3),
    payload=st.binary(max_size=40),
)
def test_any_request_gets_a_deliberate_answer(path: str, code: int, query: list[str],
                                              extra: list[tuple[int, bytes]], payload: bytes) -> None:
    """Whatever a client sends, every resource answers 2.xx or 4.xx: none raises (5.00)."""
    server = Server()
    target = path + ("?" + "&".join(query) if query else "")
    got = results(server.world.client.request(SERVER, request(target, code, payload=payload, options=extra)))
    server.world.exchange()
    server.world.advance(1.2)
    (event,) = got
    assert isinstance(event, ResponseReceived)
    assert event.response.code >> 5 in (2, 4), event.response  # 5.00 would mean a handler raised


def test_proxy_requests_get_5_05() -> None:
    server = Server()
    proxied = request("", options=[(OptionNumber.PROXY_URI, b"coap://example.org/x")])
    assert server.ask(proxied).code == Code.PROXYING_NOT_SUPPORTED
    scheme = request("test", options=[(OptionNumber.PROXY_SCHEME, b"http")])
    assert server.ask(scheme).code == Code.PROXYING_NOT_SUPPORTED
    sized = request("test", Code.PUT, payload=b"x", options=[(OptionNumber.SIZE1, b"\x01")])
    assert server.ask(sized).code == Code.CHANGED


def test_accept_that_cannot_be_met_gets_4_06() -> None:
    server = Server()
    assert server.ask(request("test", options=accept(ContentFormat.JSON))).code == Code.NOT_ACCEPTABLE
    assert server.ask(request("test", options=accept(ContentFormat.TEXT_PLAIN))).code == Code.CONTENT
    assert server.ask(request("benchmark", options=accept(ContentFormat.CBOR))).code == Code.NOT_ACCEPTABLE
    # No payload, nothing to format: the Accept does not matter.
    assert server.ask(request("test", Code.PUT, options=accept(ContentFormat.JSON))).code == Code.CHANGED


def test_large_create_keeps_a_bounded_number_of_children() -> None:
    from nettester.protocols.coap.resources.plugtest import MAX_CREATED

    server = Server()
    for _ in range(MAX_CREATED + 5):
        server.ask(request("large-create", Code.POST, payload=b"c"))
    creator = server.site.find("/large-create")
    assert creator is not None and len(creator.children) == MAX_CREATED
    assert server.ask(request("large-create/1")).code == Code.NOT_FOUND
    assert server.ask(request(f"large-create/{MAX_CREATED + 5}")).code == Code.CONTENT


def test_closing_the_site_stops_periodic_sources() -> None:
    server = Server(notify_interval=1.0)
    server.world.client.observe(SERVER, request("obs"), lambda event: None)
    server.world.exchange()
    assert len(server.world.clock.getDelayedCalls()) >= 1
    obs = server.site.find("/obs")
    assert obs is not None and obs.observers
    server.site.close()
    assert obs.observers == []
    ticker_calls = [call for call in server.world.clock.getDelayedCalls() if "LoopingCall" in repr(call.func)]
    assert ticker_calls == []
