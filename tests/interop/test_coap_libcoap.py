"""Interop with libcoap 4.3 (Debian libcoap3-bin): its clients against our
endpoints, our client against its servers, over coap (notls) and coaps
(OpenSSL, PSK)."""

from __future__ import annotations

import io
import os
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.utils import getProcessOutputAndValue

from nettester.protocols.coap.bench import BenchConfig, CoapBenchService
from nettester.protocols.coap.client import parse_uri
from nettester.protocols.coap.endpoint import CoapEndpoint, CoapRequestError
from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation
from nettester.protocols.coap.linkformat import parse_links
from nettester.protocols.coap.message import CON, Code, ContentFormat, Message, OptionNumber, response
from nettester.protocols.coap.resources.plugtest import large_body
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.endpoint import DtlsConnectError, DtlsEndpoint
from nettester.udplink import UdpLink
from tests.interop.peers import installed
from tests.loopback import free_ports, wait_until

pytestmark = pytest.mark.interop
TIMEOUT = 10.0
LARGE = bytes(ord("a") + i % 26 for i in range(1280))


def require(tool: str) -> str:
    """The tool's path; skip without it, fail without it on CI."""
    return installed(tool, "Debian package libcoap3-bin")


class TinyResources:
    """``hello``, ``large`` (block-wise) and ``obs`` (notified every 0.2 s)."""

    def __init__(self) -> None:
        self.endpoint: CoapEndpoint | None = None
        self.relations: list[ObserveRelation] = []
        self.counter = 0

    def handle_request(self, incoming: IncomingRequest) -> Message | None:
        path = incoming.request.uri_path
        if path == ["hello"]:
            return response(Code.CONTENT, b"world", ContentFormat.TEXT_PLAIN)
        if path == ["large"]:
            return response(Code.CONTENT, LARGE, ContentFormat.TEXT_PLAIN)
        if path == ["obs"] and self.endpoint is not None:
            answer = response(Code.CONTENT, b"tick-0", ContentFormat.TEXT_PLAIN, [(OptionNumber.OBSERVE, b"")])
            relation = self.endpoint.respond(incoming, answer)
            if relation is not None:
                self.relations.append(relation)
            return None
        return response(Code.NOT_FOUND)

    def observe_cancelled(self, relation: ObserveRelation, reason: str) -> None:
        if relation in self.relations:
            self.relations.remove(relation)

    def tick(self) -> None:
        self.counter += 1
        assert self.endpoint is not None
        for relation in list(self.relations):
            payload = f"tick-{self.counter}".encode()
            self.endpoint.notify(relation, response(Code.CONTENT, payload, ContentFormat.TEXT_PLAIN),
                                 confirmable=self.counter % 2 == 0)


@pytest_twisted.inlineCallbacks
def test_libcoap_client_against_our_endpoint() -> Generator[Any, Any, None]:
    client = require("coap-client-notls")
    resources = TinyResources()
    link = UdpLink()
    endpoint = CoapEndpoint(link, reactor, resources)
    resources.endpoint = endpoint
    port = reactor.listenUDP(0, link, interface="127.0.0.1")
    ticker = LoopingCall(resources.tick)
    ticker.clock = reactor
    ticker.start(0.2, now=False)
    base = f"coap://127.0.0.1:{port.getHost().port}"
    try:
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{base}/hello"], env=os.environ)
        assert code == 0, err
        assert out.strip() == b"world"
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{base}/large"], env=os.environ)
        assert code == 0, err
        assert out.strip() == LARGE
        assert endpoint.stats.sent >= 2  # block-wise: several responses
        out, err, code = yield getProcessOutputAndValue(client, ["-s", "2", f"{base}/obs"], env=os.environ)
        assert code == 0, err
        ticks = out.split(b"tick-")
        assert len(ticks) >= 5, out  # the registration answer and several notifications
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{base}/missing"], env=os.environ)
        assert b"4.04" in out + err
    finally:
        ticker.stop()
        endpoint.stop()
        yield port.stopListening()


class LibcoapServer(ProcessProtocol):
    """A libcoap server process on 127.0.0.1 (coap on ``port``, coaps on ``port + 1``)."""

    def __init__(self, binary: str, *extra: str) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()
        (self.port,) = free_ports()
        self.transport = reactor.spawnProcess(self, binary, [binary, "-A", "127.0.0.1", "-p", str(self.port), *extra],
                                              env=os.environ)

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def stop(self) -> defer.Deferred[None]:
        self.transport.signalProcess("TERM")
        return self.ended


def get(path: str, mtype: int = CON, payload: bytes = b"", code: int = Code.GET) -> Message:
    options = [(OptionNumber.URI_PATH, segment.encode()) for segment in path.split("/") if segment]
    return Message(mtype, code, 0, b"", options, payload)


@defer.inlineCallbacks
def first_answer(endpoint: CoapEndpoint, address: tuple[str, int], message: Message) -> Generator[Any, Any, Any]:
    """The answer to ``message``, retried while the freshly started server binds."""
    for _ in range(20):
        try:
            answer = yield endpoint.request_address(address, message, response_timeout=1.0).addTimeout(2.0, reactor)
            return answer
        except (CoapRequestError, defer.TimeoutError, DtlsConnectError):
            yield deferLater(reactor, 0.2, lambda: None)
    raise AssertionError(f"no answer from {address}")


@defer.inlineCallbacks
def block_wise_round_trip(endpoint: CoapEndpoint, address: tuple[str, int]) -> Generator[Any, Any, None]:
    """PUT a 3000-byte body to libcoap's example_data (Block1) and GET it back (Block2)."""
    body = bytes(ord("A") + i % 26 for i in range(3000))
    put = yield endpoint.request_address(address, get("example_data", payload=body, code=Code.PUT)).addTimeout(
        TIMEOUT, reactor)
    assert put.response.code in (Code.CREATED, Code.CHANGED)
    back = yield endpoint.request_address(address, get("example_data")).addTimeout(TIMEOUT, reactor)
    assert back.response.payload == body


@pytest_twisted.inlineCallbacks
def test_our_client_against_libcoap_server() -> Generator[Any, Any, None]:
    server = LibcoapServer(require("coap-server-notls"))
    link = UdpLink()
    endpoint = CoapEndpoint(link, reactor)
    port = reactor.listenUDP(0, link, interface="127.0.0.1")
    address = ("127.0.0.1", server.port)
    try:
        got = yield first_answer(endpoint, address, get(".well-known/core"))
        assert got.response.code == Code.CONTENT
        targets = {link.target: link for link in parse_links(got.response.payload.decode())}
        assert "/time" in targets and targets["/time"].values("obs") == [None]

        root = yield endpoint.request(address, get("/")).addTimeout(TIMEOUT, reactor)
        assert b"libcoap" in root.response.payload
        yield block_wise_round_trip(endpoint, address)

        notifications: list[bytes] = []
        observation = endpoint.observe(address, get("time"), lambda event: notifications.append(event.response.payload))
        yield wait_until(lambda: len(notifications) >= 3, timeout=TIMEOUT)  # /time notifies once a second
        assert len(notifications) >= 3, notifications
        finished = observation.finished
        observation.cancel()  # proactive: GET with Observe: 1
        final = yield finished.addTimeout(TIMEOUT, reactor)
        assert final.response.code == Code.CONTENT and final.response.observe is None
    finally:
        endpoint.stop()
        yield port.stopListening()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_our_bench_against_libcoap_server() -> Generator[Any, Any, None]:
    server = LibcoapServer(require("coap-server-notls"))
    probe_link = UdpLink()
    probe = CoapEndpoint(probe_link, reactor)
    probe_port = reactor.listenUDP(0, probe_link, interface="127.0.0.1")
    out = io.StringIO()
    config = BenchConfig(parse_uri(f"coap://127.0.0.1:{server.port}/"), clients=10, requests=20, report_interval=0)
    bench = CoapBenchService(reactor, config, UdpLink, out)
    try:
        yield first_answer(probe, ("127.0.0.1", server.port), get("/"))
        bench.startService()
        status = yield bench.done.addTimeout(TIMEOUT, reactor)
        assert status == 0 and bench.stats.responses == 200 and bench.stats.failures == 0
        assert "  20: 10" in out.getvalue()
    finally:
        probe.stop()
        yield probe_port.stopListening()
        yield server.stop()


PSK_IDENTITY, PSK_SECRET = b"client-1", b"secretPSK"


@pytest_twisted.inlineCallbacks
def test_libcoap_openssl_client_against_our_coaps_server() -> Generator[Any, Any, None]:
    client = require("coap-client-openssl")
    store = PskStore({PSK_IDENTITY: PSK_SECRET})
    service = CoapServerService(
        reactor, 0, ["127.0.0.1"], dtls_only=True,
        dtls_link_factory=lambda: DtlsEndpoint(reactor, server_configuration=DtlsConfiguration(
            is_client=False, psk_store=store)),
    )
    service.startService()
    ports = {name: port for _, _, port, name in service.listening}
    credentials = ["-u", PSK_IDENTITY.decode(), "-k", PSK_SECRET.decode()]
    try:
        out, err, code = yield getProcessOutputAndValue(
            client, credentials + ["-m", "get", f"coaps://127.0.0.1:{ports['extended']}/mycontext"], env=os.environ)
        assert code == 0, err
        lines = out.decode().splitlines()
        assert "peer: client-1" in lines and "cipher-suite: TLS_PSK_WITH_AES_128_CCM_8" in lines
        out, err, code = yield getProcessOutputAndValue(
            client, credentials + ["-m", "get", f"coaps://127.0.0.1:{ports['plugtest']}/large"], env=os.environ)
        assert code == 0, err
        assert out == large_body() + b"\n"  # coap-client adds a newline
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_our_coaps_client_against_libcoap_openssl_server() -> Generator[Any, Any, None]:
    server = LibcoapServer(require("coap-server-openssl"), "-k", PSK_SECRET.decode())
    link = DtlsEndpoint(reactor, client_configuration=DtlsConfiguration(
        is_client=True, psk_identity=b"anyone", psk=PSK_SECRET))
    endpoint = CoapEndpoint(link, reactor)
    port = reactor.listenUDP(0, link, interface="127.0.0.1")
    address = ("127.0.0.1", server.port + 1)  # libcoap listens for coaps on port + 1
    try:
        got = yield first_answer(endpoint, address, get("/"))
        assert b"libcoap" in got.response.payload
        yield block_wise_round_trip(endpoint, address)
    finally:
        endpoint.stop()
        yield port.stopListening()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_libcoap_client_sees_the_californium_behaviour() -> Generator[Any, Any, None]:
    """issue 12 section 3 through an independent client: LINK_09, OSCORE garbage, Size1, benchmark, ct."""
    client = require("coap-client-notls")
    service = CoapServerService(reactor, 0, ["127.0.0.1"], benchmark=True)
    service.startService()
    ports = {name: port for _, _, port, name in service.listening}
    plugtest, extended = f"coap://127.0.0.1:{ports['plugtest']}", f"coap://127.0.0.1:{ports['extended']}"

    def run(*arguments: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        return getProcessOutputAndValue(client, ["-v", "5", *arguments], env=os.environ)

    try:
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{plugtest}/path"], env=os.environ)
        assert code == 0 and [link.target for link in parse_links(out.decode().strip())] == [
            "/path/sub1", "/path/sub2", "/path/sub3"]
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{plugtest}/path/sub1"],
                                                        env=os.environ)
        assert out.strip() == b"/path/sub1"
        # libcoap prints the response code of an error response on stderr/stdout ("4.02 ...").
        out, err, code = yield run("-m", "get", "-O", "9,0x09ff", f"{plugtest}/test")
        assert b"4.02" in out + err
        out, err, code = yield run("-m", "put", "-O", "60,0x0186a0", "-e", "x", f"{plugtest}/large-update")
        assert b"4.13" in out + err
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{extended}/benchmark?rlen=0"],
                                                        env=os.environ)
        assert out.strip() == b"hello benchmark"
        out, err, code = yield run("-m", "get", f"{extended}/benchmark?rlen=99999")
        assert b"4.02" in out + err
    finally:
        yield service.stopService()
