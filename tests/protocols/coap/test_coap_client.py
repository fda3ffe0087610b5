"""coap-client: URI parsing, readable output, a run against the server on loopback."""

from __future__ import annotations

import errno
import io
from collections.abc import Generator
from typing import Any

import cbor2
import pytest
import pytest_twisted
from coap_testing import FakeUdpTransport, MemoryLink, UdpClock
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.error import DNSLookupError
from twisted.python import usage
from zope.interface.verify import verifyObject

from nettester.interfaces import IDatagramLink
from nettester.protocols.coap.client import (
    EXIT_ERROR_RESPONSE,
    EXIT_NO_RESPONSE,
    CoapClientService,
    SendTap,
    ServerDtlsLink,
    ServerUdpLink,
    build_request,
    format_message,
    format_payload,
    make_link,
    parse_uri,
)
from nettester.protocols.coap.message import (
    ACK,
    NON,
    RST,
    Code,
    ContentFormat,
    Message,
    OptionNumber,
    decode,
    encode_block,
    encode_empty,
    encode_message,
)
from nettester.protocols.coap.options import CoapBenchOptions, CoapClientOptions
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.dtls.endpoint import DtlsConnectError
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


# ------------------------------------------------------------ failures a newcomer meets

SERVER = ("192.0.2.1", 5683)


def client_on_clock(link: Any, timeout: float = 5.0, path: str = "test") -> tuple[CoapClientService, UdpClock,
                                                                                  io.StringIO]:
    clock = UdpClock()
    out = io.StringIO()
    uri = parse_uri(f"coap://{SERVER[0]}:{SERVER[1]}/{path}")
    service = CoapClientService(clock, uri, build_request(uri, "GET"), link, out, timeout=timeout)
    return service, clock, out


def outcome(service: CoapClientService) -> list[int]:
    statuses: list[int] = []
    service.done.addCallback(statuses.append)
    return statuses


def test_request_block_shows_the_random_mid_and_token_that_went_out() -> None:
    blocks = []
    for _ in range(2):
        link = MemoryLink(("198.51.100.1", 40000))
        service, clock, out = client_on_clock(link)
        service.startService()
        ((data, peer),) = link.sent
        sent = decode(data)
        assert peer == SERVER
        header = out.getvalue().splitlines()[1]
        assert header == f"CON GET  MID={sent.mid}  Token={sent.token.hex()}"
        assert len(sent.token) == 8  # RFC 7252 section 5.3.1: random tokens
        blocks.append((sent.mid, sent.token))
        assert clock.listening[0][2] == 65535  # whole datagrams (a DTLS flight may be one large one)
    assert blocks[0] != blocks[1]  # RFC 7252 section 4.4: a random initial MID per client


def test_no_answer_ends_after_timeout_with_status_3() -> None:
    link = MemoryLink(("198.51.100.1", 40000))
    service, clock, out = client_on_clock(link, timeout=5.0)
    statuses = outcome(service)
    service.startService()
    clock.advance(4.9)
    assert statuses == []
    clock.advance(0.1)
    assert statuses == [EXIT_NO_RESPONSE] and service.exit_status == EXIT_NO_RESPONSE
    last = out.getvalue().splitlines()[-1]
    transmissions = len(link.sent)
    assert transmissions >= 2  # retransmitted before giving up
    assert last == (f"==[ no response ]== no answer from 192.0.2.1:5683 within 5.0 s ({transmissions} "
                    "transmissions): is a CoAP server listening on 192.0.2.1:5683, and does the path let UDP "
                    "through? (--timeout waits longer)")
    assert clock.getDelayedCalls() == []  # nothing left running


def test_the_coap_exchange_timeout_ends_a_request_without_timeout_option() -> None:
    link = MemoryLink(("198.51.100.1", 40000))
    service, clock, out = client_on_clock(link, timeout=1000.0)
    statuses = outcome(service)
    service.startService()
    for _ in range(100):
        clock.advance(1.0)
    # RFC 7252 section 4.8.2: the CON is sent 1 + MAX_RETRANSMIT times, then the layer gives up (<= 93 s).
    assert statuses == [EXIT_NO_RESPONSE] and len(link.sent) == 5
    assert "no answer from 192.0.2.1:5683 within" in out.getvalue() and "(5 transmissions)" in out.getvalue()


def test_reset_is_explained() -> None:
    link = MemoryLink(("198.51.100.1", 40000))
    service, _, out = client_on_clock(link)
    statuses = outcome(service)
    service.startService()
    sent = decode(link.sent[0][0])
    link.receiver.datagramReceived(encode_empty(RST, sent.mid), SERVER)
    assert statuses == [EXIT_NO_RESPONSE]
    assert "192.0.2.1:5683 answered with a Reset" in out.getvalue()


def test_error_response_gives_status_1() -> None:
    link = MemoryLink(("198.51.100.1", 40000))
    service, _, out = client_on_clock(link, path="nothing")
    statuses = outcome(service)
    service.startService()
    sent = decode(link.sent[0][0])
    link.receiver.datagramReceived(encode_message(ACK, Code.NOT_FOUND, sent.mid, sent.token), SERVER)
    assert statuses == [EXIT_ERROR_RESPONSE] and "4.04 Not Found" in out.getvalue()


def test_connected_link_reports_refusal_and_the_client_ends_at_once() -> None:
    link = ServerUdpLink()
    transport = FakeUdpTransport()
    link.makeConnection(transport)  # type: ignore[arg-type]
    service, clock, out = client_on_clock(link)
    statuses = outcome(service)
    service.startService()
    assert transport.connected == SERVER  # so the kernel reports ICMP errors to this socket
    assert len(transport.socket.sent) == 1
    link.connectionRefused()  # Twisted's select/poll reactors
    assert statuses == [EXIT_NO_RESPONSE]
    assert out.getvalue().splitlines()[-1] == (
        "==[ no response ]== 192.0.2.1:5683 refused the request (ICMP port unreachable): is a CoAP server "
        "listening on 192.0.2.1:5683? Check the host and port of the URI")
    assert clock.getDelayedCalls() == []


def test_connected_link_reads_a_refusal_left_on_the_closed_socket() -> None:
    """The epoll reactor closes the port on EPOLLERR: the pending SO_ERROR still tells."""
    refused: list[Any] = []
    link = ServerUdpLink()
    transport = FakeUdpTransport()
    link.makeConnection(transport)  # type: ignore[arg-type]
    link.on_refused = refused.append
    link.connect(SERVER)
    transport.socket.error = errno.ECONNREFUSED
    link.doStop()
    assert refused == [SERVER]
    quiet = ServerUdpLink()
    quiet.makeConnection(FakeUdpTransport())  # type: ignore[arg-type]
    quiet.on_refused = refused.append
    quiet.connect(SERVER)
    quiet.doStop()  # an ordinary stop: no error pending
    assert refused == [SERVER]


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_client_against_a_closed_port_fails_at_once() -> Generator[Any, Any, None]:
    probe = reactor.listenUDP(0, UdpLink(), interface="127.0.0.1")
    closed = probe.getHost().port
    yield probe.stopListening()
    out = io.StringIO()
    uri = parse_uri(f"coap://127.0.0.1:{closed}/test")
    client = CoapClientService(reactor, uri, build_request(uri, "GET"), make_link(reactor, uri), out, timeout=30.0)
    client.startService()
    status = yield client.done.addTimeout(5.0, reactor)  # the refusal, not the 30 s timeout
    assert status == EXIT_NO_RESPONSE
    assert f"is a CoAP server listening on 127.0.0.1:{closed}?" in out.getvalue()


def test_uri_argument_messages() -> None:
    with pytest.raises(usage.UsageError, match=r"^give the URI, e\.g\. coap://127\.0\.0\.1:5683/test$"):
        CoapClientOptions().parseOptions([])
    with pytest.raises(usage.UsageError, match="expected one URI, got 2 arguments"):
        CoapClientOptions().parseOptions(["coap://127.0.0.1/test", "coap://127.0.0.1/other"])
    after = CoapClientOptions()
    after.parseOptions(["coap://127.0.0.1/test", "--method", "POST"])  # options after the URI (GNU style)
    assert after["method"] == "POST"
    with pytest.raises(usage.UsageError, match="benchmark"):
        CoapBenchOptions().parseOptions([])
    options = CoapClientOptions()
    options.parseOptions(["coap://127.0.0.1/test"])
    assert options["timeout"] == 93.0 and options["log-level"] == "warn"
    assert "Exit status: 0 a 2.xx response" in str(options)


def test_links_provide_idatagramlink() -> None:
    link = ServerUdpLink()
    assert verifyObject(IDatagramLink, link)
    assert verifyObject(IDatagramLink, SendTap(link, lambda data: None))


class _FailingConnect(MemoryLink):
    def __init__(self, error: Exception) -> None:
        super().__init__(("198.51.100.1", 40000))
        self.error = error

    def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
        return defer.fail(self.error)


@pytest.mark.parametrize(("error", "expected"), [
    (DtlsConnectError("handshake_timeout"), "DTLS handshake with 192.0.2.1:5683 failed: handshake_timeout; check "
     "--identity/--secret or --cert/--key/--trust, and that a coaps server listens there"),
    (DNSLookupError("nope"), "cannot resolve '192.0.2.1': check the host of the URI"),
])
def test_connect_failures_are_explained(error: Exception, expected: str) -> None:
    service, _, out = client_on_clock(_FailingConnect(error))
    statuses = outcome(service)
    service.startService()
    assert statuses == [EXIT_NO_RESPONSE]
    assert out.getvalue().splitlines()[-1] == f"==[ no response ]== {expected}"


def test_no_dtls_handshake_within_timeout() -> None:
    class Silent(MemoryLink):
        def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
            return defer.Deferred()  # a handshake nobody answers

    clock = UdpClock()
    out = io.StringIO()
    uri = parse_uri("coaps://192.0.2.1/test")
    service = CoapClientService(clock, uri, build_request(uri, "GET"), Silent(("198.51.100.1", 1)), out, timeout=7)
    statuses = outcome(service)
    service.startService()
    clock.advance(7)
    assert statuses == [EXIT_NO_RESPONSE]
    assert "no DTLS handshake with 192.0.2.1:5684 within 7 s: is a coaps server listening on 192.0.2.1:5684?" in (
        out.getvalue())


def sandbox_client_configuration() -> Any:
    options = CoapClientOptions()
    options.parseOptions(["--psk-sandbox", "coaps://127.0.0.1/test"])
    return options["dtls"]


def test_coaps_link_is_connected_before_the_handshake_and_hears_a_refusal() -> None:
    clock = UdpClock()
    link = make_link(clock, parse_uri("coaps://192.0.2.1/test"), sandbox_client_configuration())
    assert isinstance(link, ServerDtlsLink)
    transport = FakeUdpTransport()
    link.makeConnection(transport)  # type: ignore[arg-type]
    refused: list[Any] = []
    link.on_refused = refused.append
    link.connect(("192.0.2.1", 5684))
    assert transport.connected == ("192.0.2.1", 5684) and len(transport.socket.sent) == 1  # the ClientHello
    link.connectionRefused()
    assert refused == [("192.0.2.1", 5684)]
    long_running = make_link(clock, parse_uri("coaps://192.0.2.1/test"), sandbox_client_configuration(),
                             one_shot=False)
    assert not isinstance(long_running, ServerDtlsLink)  # coap-bench keeps an unconnected socket


def test_a_retransmitting_handshake_prints_progress() -> None:
    class Silent(MemoryLink):
        client_configuration = sandbox_client_configuration()

        def connect(self, address: tuple[str, int]) -> defer.Deferred[Any]:
            return defer.Deferred()  # a handshake nobody answers

    clock = UdpClock()
    out = io.StringIO()
    uri = parse_uri("coaps://192.0.2.1/test")
    service = CoapClientService(clock, uri, build_request(uri, "GET"), Silent(("198.51.100.1", 1)), out, timeout=20)
    service.startService()
    for _ in range(20):
        clock.advance(1)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("==[ DTLS handshake ]==")]
    assert lines == [f"==[ DTLS handshake ]== no answer from 192.0.2.1:5684 after {waited:.1f} s, retransmitting "
                     "(gives up after 20 s)" for waited in (1.0, 3.0, 7.0, 15.0)]
    assert clock.getDelayedCalls() == []  # the timeout ended it and the progress timer with it


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_coaps_client_against_a_closed_port_fails_at_once() -> Generator[Any, Any, None]:
    """issue 16: coaps reports a refusal as fast as coap:// does, not after --timeout."""
    probe = reactor.listenUDP(0, UdpLink(), interface="127.0.0.1")
    closed = probe.getHost().port
    yield probe.stopListening()
    out = io.StringIO()
    uri = parse_uri(f"coaps://127.0.0.1:{closed}/test")
    link = make_link(reactor, uri, sandbox_client_configuration())
    client = CoapClientService(reactor, uri, build_request(uri, "GET"), link, out, timeout=30.0)
    client.startService()
    status = yield client.done.addTimeout(5.0, reactor)  # the refusal, not the 30 s timeout
    assert status == EXIT_NO_RESPONSE
    assert f"127.0.0.1:{closed} refused the request (ICMP port unreachable)" in out.getvalue()
