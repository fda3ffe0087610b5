"""coap-client: URI parsing, readable output, a run against the server on loopback."""

from __future__ import annotations

import io
from collections.abc import Generator
from typing import Any

import cbor2
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.python import usage

from nettester.protocols.coap.client import (
    CoapClientService,
    build_request,
    format_message,
    format_payload,
    parse_uri,
)
from nettester.protocols.coap.message import NON, Code, ContentFormat, Message, OptionNumber, encode_block
from nettester.protocols.coap.options import CoapClientOptions
from nettester.protocols.coap.server import CoapServerService
from nettester.udplink import UdpLink


def test_parse_uri_defaults_percent_decoding_and_ipv6() -> None:
    uri = parse_uri("coap://example.org/a%2Fb/c?x=1&y%3D2")
    assert (uri.scheme, uri.host, uri.port) == ("coap", "example.org", 5683)
    assert uri.path == ("a/b", "c") and uri.query == ("x=1", "y=2")
    secure = parse_uri("coaps://[::1]:5784/mycontext")
    assert (secure.host, secure.port, secure.path) == ("::1", 5784, ("mycontext",))
    assert parse_uri("coap://h").path == () and parse_uri("coap://h/").path == ()


@pytest.mark.parametrize("text", ["http://h/x", "coap:///x", "coap://h/x#frag", "coap://h:99999/"])
def test_parse_uri_errors(text: str) -> None:
    with pytest.raises(ValueError):
        parse_uri(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_parse_uri_fuzz_only_value_error(text: str) -> None:
    try:
        parse_uri("coap://" + text)
    except ValueError:
        pass


def test_build_request_and_readable_block() -> None:
    uri = parse_uri("coap://h/benchmark?rlen=40")
    request = build_request(uri, "post", b"hi", confirmable=False, content_format=0, accept=50)
    assert request.mtype == NON and request.code == Code.POST
    request.options.append((OptionNumber.BLOCK2, encode_block(2, True, 6)))
    text = format_message("request", request, rtt=0.0123)
    assert "NON POST" in text and "Uri-Path: benchmark" in text and "Uri-Query: rlen=40" in text
    assert "Accept: 50 (application/json)" in text and "Block2: 2/1/1024" in text
    assert "RTT: 12.3 ms" in text and text.endswith("hi")


def test_format_payload_kinds() -> None:
    assert format_payload(b"", None) == "(no payload)"
    assert format_payload(cbor2.dumps({"a": 1}), ContentFormat.CBOR) == '{\n  "a": 1\n}'
    assert format_payload(b'{"b":2}', ContentFormat.JSON) == '{\n  "b": 2\n}'
    assert format_payload(b"\x00\xff", None) == "00 ff"


def test_options() -> None:
    options = CoapClientOptions()
    options.parseOptions(["--accept", "cbor", "--observe", "2", "coap://127.0.0.1/obs"])
    assert options["accept"] == 60 and options["observe"] == 2 and options["dtls"] is None
    with pytest.raises(usage.UsageError):
        CoapClientOptions().parseOptions(["coaps://127.0.0.1/x"])
    with pytest.raises(usage.UsageError):
        CoapClientOptions().parseOptions(["--method", "BREW", "coap://127.0.0.1/x"])


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_client_against_server_request_and_observe() -> Generator[Any, Any, None]:
    server = CoapServerService(reactor, 0, ["127.0.0.1"], notify_interval=0.2)
    server.startService()
    port = next(p for scheme, _, p, name in server.listening if name == "plugtest")
    try:
        out = io.StringIO()
        uri = parse_uri(f"coap://127.0.0.1:{port}/large")
        client = CoapClientService(reactor, uri, build_request(uri, "GET"), UdpLink(), out, timeout=5.0)
        client.startService()
        status = yield client.done
        assert status == 0
        assert "2.05 Content" in out.getvalue() and "Payload (1280 bytes)" in out.getvalue()

        out = io.StringIO()
        uri = parse_uri(f"coap://127.0.0.1:{port}/obs")
        client = CoapClientService(reactor, uri, build_request(uri, "GET"), UdpLink(), out, observe=2, timeout=5.0)
        client.startService()
        status = yield client.done
        text = out.getvalue()
        assert status == 0
        assert "==[ notification 1 ]" in text and "==[ notification 2 ]" in text and "==[ final response ]" in text
        missing = io.StringIO()
        uri = parse_uri(f"coap://127.0.0.1:{port}/nothing")
        client = CoapClientService(reactor, uri, build_request(uri, "GET"), UdpLink(), missing, timeout=5.0)
        client.startService()
        assert (yield client.done) == 1 and "4.04 Not Found" in missing.getvalue()
    finally:
        yield server.stopService()


def test_message_title_padding() -> None:
    assert format_message("x", Message(NON, Code.CONTENT)).startswith("==[ x ]=====")
