"""Two DtlsEndpoints on real loopback sockets and the real reactor."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from dtls_pair import PSK, PSK_IDENTITY
from twisted.internet import reactor
from twisted.internet.defer import DeferredQueue
from zope.interface import implementer

from nettester.interfaces import IDatagramReceiver
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.endpoint import MAX_DATAGRAM, DtlsEndpoint
from tests.loopback import wait_until

pytestmark = pytest.mark.integration
TIMEOUT = 10.0


@implementer(IDatagramReceiver)
class Queue:
    def __init__(self) -> None:
        self.queue: DeferredQueue[tuple[bytes, Any]] = DeferredQueue()

    def datagramReceived(self, data: bytes, peer: Any) -> None:
        self.queue.put((data, peer))


@pytest_twisted.inlineCallbacks
def test_client_and_server_endpoints_on_loopback() -> Generator[Any, Any, None]:
    server_queue, client_queue = Queue(), Queue()
    server = DtlsEndpoint(
        reactor,
        server_configuration=DtlsConfiguration(
            is_client=False, psk_store=PskStore({PSK_IDENTITY: PSK}), cid_generator=NodeConnectionIdGenerator(6, 2)
        ),
        receiver=server_queue,
    )
    client = DtlsEndpoint(
        reactor,
        client_configuration=DtlsConfiguration(is_client=True, psk_identity=PSK_IDENTITY, psk=PSK),
        receiver=client_queue,
    )
    server_port = reactor.listenUDP(0, server, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
    client_port = reactor.listenUDP(0, client, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)
    try:
        connecting = client.connect(("127.0.0.1", server_port.getHost().port))
        peer = yield connecting.addTimeout(TIMEOUT, reactor)
        for index in range(20):
            client.send_datagram(b"request %d" % index, peer)
        received = []
        for _ in range(20):
            data, server_peer = yield server_queue.queue.get().addTimeout(TIMEOUT, reactor)
            received.append(data)
            server.send_datagram(b"re: " + data, server_peer)
        assert sorted(received) == sorted(b"request %d" % index for index in range(20))
        for _ in range(20):
            data, client_peer = yield client_queue.queue.get().addTimeout(TIMEOUT, reactor)
            assert client_peer is peer and data.startswith(b"re: request")
        context = server.peer_context(server_peer)
        assert context.identity == "Client_identity" and context.node_id == 2
        assert context.address == ("127.0.0.1", client_port.getHost().port)
        client.close_all()
        # close_notify reaches the server, which forgets the peer
        yield wait_until(lambda: not server.connections, timeout=5.0)
        assert server.connections == [] and client.connections == []
    finally:
        yield client_port.stopListening()
        yield server_port.stopListening()
