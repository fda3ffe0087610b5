"""CoAP endpoints over real UDP sockets on loopback (IPv4 and IPv6)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation
from nettester.protocols.coap.message import CON, NON, Code, Message, OptionNumber, response
from nettester.udplink import UdpLink
from tests.loopback import has_ipv6_loopback

pytestmark = pytest.mark.integration
TIMEOUT = 5.0


class Echo:
    """Answers the request payload back, or 1500 bytes for ``large``."""

    def handle_request(self, incoming: IncomingRequest) -> Message:
        if incoming.request.uri_path == ["large"]:
            return response(Code.CONTENT, b"L" * 1500)
        return response(Code.CONTENT, incoming.request.payload or b"empty")

    def observe_cancelled(self, relation: ObserveRelation, reason: str) -> None:
        pass


@defer.inlineCallbacks
def exchange(host: str) -> Generator[Any, Any, None]:
    server_link = UdpLink(receive_buffer=1 << 20)
    server = CoapEndpoint(server_link, reactor, Echo())
    server_port = reactor.listenUDP(0, server_link, interface=host)
    client_link = UdpLink()
    client = CoapEndpoint(client_link, reactor)
    client_port = reactor.listenUDP(0, client_link, interface=host)
    address = (host, server_port.getHost().port)
    try:
        post = Message(CON, Code.POST, 0, b"", [(OptionNumber.URI_PATH, b"echo")], b"x" * 3000)
        echoed = yield client.request_address(address, post).addTimeout(TIMEOUT, reactor)
        assert echoed.response.payload == b"x" * 3000
        large = Message(NON, Code.GET, 0, b"", [(OptionNumber.URI_PATH, b"large")])
        got = yield client.request(address, large).addTimeout(TIMEOUT, reactor)
        assert got.response.payload == b"L" * 1500 and got.rtt is not None
        assert server.stats.duplicates == 0 and server_link.send_errors == 0
    finally:
        server.stop()
        client.stop()
        yield server_port.stopListening()
        yield client_port.stopListening()


@pytest_twisted.inlineCallbacks
def test_ipv4_loopback() -> Generator[Any, Any, None]:
    yield exchange("127.0.0.1")


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")
@pytest_twisted.inlineCallbacks
def test_ipv6_loopback() -> Generator[Any, Any, None]:
    yield exchange("::1")
