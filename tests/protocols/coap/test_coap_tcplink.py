"""CoAP over TCP through the Twisted adapter: the plugtest resources over StringTransport, one loopback run."""

from __future__ import annotations

import io
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from nettester.interfaces import IDatagramLink
from nettester.protocols.coap.bench import BenchConfig, CoapBenchService
from nettester.protocols.coap.client import CoapClientService, make_link
from nettester.protocols.coap.message import Code, Message, OptionNumber, decode_uint, encode_block
from nettester.protocols.coap.options import CoapServerOptions
from nettester.protocols.coap.receivetest import ReceiveTestService
from nettester.protocols.coap.resources import build_site
from nettester.protocols.coap.resources.plugtest import plugtest_resources
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.coap.tcp import SignalCode, decode_frame, encode_frame, parse_frame_header
from nettester.protocols.coap.tcplink import CoapTcpConnection, ReliableCoapEndpoint, TcpLink
from nettester.protocols.coap.uri import build_request, parse_uri
from tests.logcapture import log_events
from tests.loopback import wait_until

CSM = encode_frame(SignalCode.CSM)


def frames(data: bytes) -> list[Message]:
    """Split what a connection wrote into messages."""
    found = []
    while data:
        header = parse_frame_header(data)
        assert header is not None
        end = header[0] + header[1] + header[3]
        found.append(decode_frame(data[:end]))
        data = data[end:]
    return found


class Served:
    """The plugtest tree behind a TcpLink, connections over StringTransport."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.link = TcpLink(self.clock)
        self.endpoint = ReliableCoapEndpoint(self.link, self.clock)
        self.site = build_site(self.clock, plugtest_resources(5.0, lambda: None))
        self.site.attach(self.endpoint)

    def connect(self) -> tuple[CoapTcpConnection, StringTransport]:
        connection = self.link.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40001))
        connection.makeConnection(transport)
        return connection, transport

    @staticmethod
    def read(transport: StringTransport) -> list[Message]:
        data = transport.value()
        transport.clear()
        return frames(data)


def get(path: str, token: bytes, *options: tuple[int, bytes]) -> bytes:
    segments = [(OptionNumber.URI_PATH, part.encode()) for part in path.strip("/").split("/")]
    return encode_frame(Code.GET, token, [*segments, *options])


def test_server_sends_csm_first_and_answers_with_the_token() -> None:
    served = Served()
    connection, transport = served.connect()
    (csm,) = served.read(transport)
    assert csm.code == SignalCode.CSM
    assert decode_uint(csm.option(2) or b"") == served.link.stream_params.max_message_size
    assert csm.has_option(4)  # Block-Wise-Transfer
    connection.dataReceived(CSM + get("/test", b"\x01\x02"))
    (answer,) = served.read(transport)
    assert (answer.code, answer.token) == (Code.CONTENT, b"\x01\x02")
    assert str(connection).endswith("192.0.2.7:40001") and str(connection).startswith("tcp#")


def test_block_wise_over_tcp() -> None:
    served = Served()
    connection, transport = served.connect()
    served.read(transport)
    connection.dataReceived(CSM + get("/large", b"\x01"))
    (first,) = served.read(transport)
    assert first.code == Code.CONTENT and first.block2 is not None and first.block2.more
    body = first.payload
    num = 1
    while True:
        block2 = (OptionNumber.BLOCK2, encode_block(num, False, first.block2.szx))
        connection.dataReceived(get("/large", bytes((num,)), block2))
        (block,) = served.read(transport)
        assert block.block2 is not None and block.block2.num == num
        body += block.payload
        if not block.block2.more:
            break
        num += 1
    assert len(body) > 1024


def test_observe_over_tcp_notifies_in_order_and_ends_with_the_connection() -> None:
    served = Served()
    connection, transport = served.connect()
    served.read(transport)
    connection.dataReceived(CSM + get("/obs", b"\x09", (OptionNumber.OBSERVE, b"")))
    (registered,) = served.read(transport)
    assert registered.code == Code.CONTENT and registered.observe is not None
    served.clock.advance(5.0)
    served.clock.advance(5.0)
    notifications = served.read(transport)
    assert len(notifications) == 2 and all(n.token == b"\x09" for n in notifications)
    values = [n.observe for n in notifications]
    assert values[0] is not None and values[1] == values[0] + 1
    assert served.endpoint.core.observer_count == 1
    connection.connectionLost(Failure(ConnectionError("gone")))
    assert served.endpoint.core.observer_count == 0


def test_peer_without_csm_is_aborted_and_counted() -> None:
    served = Served()
    connection, transport = served.connect()
    served.read(transport)
    served.clock.advance(served.link.stream_params.csm_timeout)
    (abort,) = served.read(transport)
    assert abort.code == SignalCode.ABORT and transport.disconnecting
    assert served.link.closed["no_csm"] == 1 and served.link.refused == 1


def test_two_gigabyte_announcement_is_aborted_without_buffering() -> None:
    served = Served()
    connection, transport = served.connect()
    served.read(transport)
    connection.dataReceived(CSM + bytes((0xF0, 0x7F, 0xFF, 0xFF, 0xFF, Code.PUT)) + b"x" * 4096)
    (abort,) = served.read(transport)
    assert abort.code == SignalCode.ABORT and transport.disconnecting
    assert served.link.closed["too_large"] == 1
    assert connection.stream is not None and len(connection.stream._buffer) == 0


def test_slowloris_is_closed() -> None:
    served = Served()
    connection, transport = served.connect()
    served.read(transport)
    connection.dataReceived(CSM + get("/test", b"\x01")[:3])
    served.clock.advance(served.link.stream_params.message_timeout)
    assert transport.disconnecting and served.link.closed["slowloris"] == 1


def test_server_options_tcp_flag() -> None:
    options = CoapServerOptions()
    options.parseOptions([])
    assert options["tcp"] is False
    options = CoapServerOptions()
    options.parseOptions(["--tcp"])
    assert options["tcp"] is True


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_loopback_server_and_client_over_tcp() -> Generator[Any, Any, None]:
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True)
    service.startService()
    try:
        tcp = [entry for entry in service.listening if entry[0] == "coap+tcp"]
        assert {entry[3] for entry in tcp} == {"plugtest", "extended"}
        port = next(entry[2] for entry in tcp if entry[3] == "plugtest")
        link = TcpLink(reactor)
        client = ReliableCoapEndpoint(link, reactor)
        peer = yield link.connect(("127.0.0.1", port)).addTimeout(5.0, reactor)
        got = yield client.request(peer, Message(0, Code.GET, 0, b"", [(OptionNumber.URI_PATH, b"large")])
                                   ).addTimeout(5.0, reactor)
        assert got.response.code == Code.CONTENT and len(got.response.payload) > 1024
        assert service.summary()["tcp_connections"] == 1
        peer.release("done")
        client.stop()
    finally:
        yield service.stopService()
        yield defer.succeed(None)


def test_coap_tcp_uri_default_port() -> None:
    uri = parse_uri("coap+tcp://example.org/a/b")
    assert (uri.scheme, uri.port, uri.path) == ("coap+tcp", 5683, ("a", "b"))
    assert isinstance(make_link(Clock(), uri), TcpLink)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_loopback_coap_client_over_tcp() -> Generator[Any, Any, None]:
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True)
    service.startService()
    try:
        port = next(entry[2] for entry in service.listening if entry[0] == "coap+tcp" and entry[3] == "plugtest")
        uri = parse_uri(f"coap+tcp://127.0.0.1:{port}/obs")
        out = io.StringIO()
        client = CoapClientService(reactor, uri, build_request(uri, "GET"), make_link(reactor, uri), out,
                                   observe=1, timeout=10.0)
        client.startService()
        status = yield client.done
        assert status == 0, out.getvalue()
        assert "notification 1" in out.getvalue() and "final response" in out.getvalue()
        assert "MID=" not in out.getvalue() and "\n2.05 Content  Token=" in out.getvalue()  # no type, no MID on TCP
        yield wait_until(lambda: not any(link.connections for link in service.tcp_links))
    finally:
        yield service.stopService()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_loopback_bench_over_tcp() -> Generator[Any, Any, None]:
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True, benchmark=True)
    service.startService()
    try:
        port = next(entry[2] for entry in service.listening if entry[0] == "coap+tcp" and entry[3] == "extended")
        uri = parse_uri(f"coap+tcp://127.0.0.1:{port}/benchmark")
        out = io.StringIO()
        config = BenchConfig(uri, clients=4, requests=25, report_interval=0)
        bench = CoapBenchService(reactor, config, lambda: TcpLink(reactor), out)
        bench.startService()
        status = yield bench.done.addTimeout(10.0, reactor)
        assert status == 0, out.getvalue()
        assert bench.stats.responses == 100 and bench.stats.failures == 0
        assert "coap+tcp, reliable GET /benchmark" in out.getvalue()
        assert "lost_forward=0, lost_return=0, lost_unattributed=0" in out.getvalue()
        yield wait_until(lambda: not any(link.connections for link in service.tcp_links))
    finally:
        yield service.stopService()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_loopback_receivetest_over_tcp() -> Generator[Any, Any, None]:
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True)
    service.startService()
    try:
        port = next(entry[2] for entry in service.listening if entry[0] == "coap+tcp" and entry[3] == "extended")
        uri = parse_uri(f"coap+tcp://127.0.0.1:{port}/requests")
        out = io.StringIO()
        receivetest = ReceiveTestService(reactor, uri, "device-1", make_link(reactor, uri), out, timeout=10.0)
        receivetest.startService()
        status = yield receivetest.done
        assert status == 0, out.getvalue()
        assert "1 requests recorded for this device" in out.getvalue()
    finally:
        yield service.stopService()


def test_tcp_link_provides_the_datagram_link_interface() -> None:
    verifyObject(IDatagramLink, TcpLink(Clock()))
    assert TcpLink(Clock()).scheme == "coap+tcp"
    assert TcpLink(Clock(), tls_client=object()).scheme == "coaps+tcp"


def test_ping_is_answered_and_release_closes() -> None:
    served = Served()
    connection, transport = served.connect()
    served.read(transport)
    connection.dataReceived(CSM + encode_frame(SignalCode.PING, b"\x05"))
    (pong,) = served.read(transport)
    assert (pong.code, pong.token) == (SignalCode.PONG, b"\x05")
    connection.dataReceived(encode_frame(SignalCode.RELEASE))
    assert transport.disconnecting and served.link.closed["released"] == 1 and served.link.refused == 0


_fuzz_options = st.lists(st.tuples(st.sampled_from([1, 4, 6, 11, 12, 14, 15, 17, 23, 27, 28, 60, 2049, 65020]),
                                   st.binary(max_size=6)), max_size=5)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 5, 0x45, 0x84, 0xE1, 0xE2, 0xE3, 0xE4, 0xE5, 0xE9]),
                          st.binary(max_size=8), _fuzz_options, st.binary(max_size=300)), max_size=6))
def test_fuzzed_messages_through_the_server_never_raise(messages: list[tuple[int, bytes, Any, bytes]]) -> None:
    # Messages (valid frames, arbitrary codes and options) reach the layer and the resources: answered,
    # refused or the connection closed, never an exception out of the adapter.
    served = Served()
    with log_events() as events:
        connection, transport = served.connect()
        data = CSM + b"".join(encode_frame(code, token, [(number, value) for number, value in options], payload)
                              for code, token, options, payload in messages)
        connection.dataReceived(data)
        served.clock.advance(60.0)
    frames(transport.value())  # whatever went out is well-framed
    assert not [event for event in events if "log_failure" in event]  # no traceback logged either
