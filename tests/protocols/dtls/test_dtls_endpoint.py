"""DtlsEndpoint over fake transports and a task.Clock: no sockets, no reactor."""

from __future__ import annotations

from typing import Any

import pytest
from dtls_pair import psk_configs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nettester import logs
from nettester.interfaces import IConnectionIdGenerator, IDatagramLink, IDatagramReceiver
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import DtlsConnection
from nettester.protocols.dtls.endpoint import DtlsConnectError, DtlsEndpoint, format_address
from tests.logcapture import log_events

SERVER = ("10.0.0.1", 5684)
CLIENT = ("10.0.0.2", 40000)


@implementer(IDatagramReceiver)
class Collector:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, Any]] = []

    def datagramReceived(self, data: bytes, peer: Any) -> None:
        self.received.append((data, peer))


class Wire:
    """A fake network: transports append, deliver() hands datagrams over."""

    def __init__(self) -> None:
        self.endpoints: dict[tuple[str, int], DtlsEndpoint] = {}
        self.queue: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
        self.lose: set[int] = set()
        self.sent = 0

    def attach(self, endpoint: DtlsEndpoint, address: tuple[str, int]) -> None:
        wire = self

        class Transport:
            def write(self, data: bytes, destination: tuple[str, int]) -> None:
                wire.sent += 1
                if wire.sent not in wire.lose:
                    wire.queue.append((data, address, destination))

        endpoint.transport = Transport()  # type: ignore[assignment]
        self.endpoints[address] = endpoint

    def move(self, old: tuple[str, int], new: tuple[str, int]) -> None:
        endpoint = self.endpoints.pop(old)
        self.attach(endpoint, new)

    def deliver(self) -> None:
        for _ in range(100):
            if not self.queue:
                return
            queue, self.queue = self.queue, []
            for data, source, destination in queue:
                endpoint = self.endpoints.get(destination)
                if endpoint is not None:
                    endpoint.datagramReceived(data, source)


def make(clock: Clock, **server_options: Any) -> tuple[DtlsEndpoint, DtlsEndpoint, Collector, Collector, Wire]:
    server_receiver, client_receiver = Collector(), Collector()
    client_configuration, server_configuration = psk_configs(node_id=7)
    server = DtlsEndpoint(clock, server_configuration=server_configuration, receiver=server_receiver, **server_options)
    client = DtlsEndpoint(clock, client_configuration=client_configuration, receiver=client_receiver)
    wire = Wire()
    wire.attach(server, SERVER)
    wire.attach(client, CLIENT)
    return server, client, server_receiver, client_receiver, wire


def test_interfaces() -> None:
    server, _, _, _, _ = make(Clock())
    assert verifyObject(IDatagramLink, server)
    assert server.scheme == "coaps"
    assert verifyObject(IConnectionIdGenerator, NodeConnectionIdGenerator())


def test_connect_exchange_and_peer_context() -> None:
    clock = Clock()
    server, client, server_receiver, client_receiver, wire = make(clock)
    connected = client.connect(SERVER)
    wire.deliver()
    peers: list[Any] = []
    connected.addCallback(peers.append)
    (peer,) = peers
    client.send_datagram(b"GET /", peer)
    wire.deliver()
    ((data, server_peer),) = server_receiver.received
    assert data == b"GET /"
    server.send_datagram(b"2.05", server_peer)
    wire.deliver()
    assert client_receiver.received == [(b"2.05", peer)]
    context = server.peer_context(server_peer)
    assert context.address == CLIENT and context.scheme == "coaps"
    assert context.identity == "Client_identity"
    assert context.cipher_suite == "TLS_PSK_WITH_AES_128_CCM_8"
    assert context.node_id == 7 and context.read_cid[0] == 7
    assert client.peer_context(peer).write_cid == context.read_cid
    assert server.counters.handshakes.value == 1 and server.counters.hello_verify.value == 1
    assert server.summary()["dtls_connections"] == 1 and server.summary()["dtls_handshakes"] == 1
    exported = {family.name: family for family in server.metrics.collect()}
    assert exported["nettester_dtls_handshakes"].samples[0].value == 1
    assert server.peer_by_connection_id(context.read_cid) is server_peer


def test_client_hello_flood_without_cookie_creates_no_state() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    client.connect(SERVER)
    ((hello, _, _),) = wire.queue
    wire.queue.clear()
    for port in range(1000):
        server.datagramReceived(hello, ("10.9.9.9", 10000 + port))
    assert server.connections == []
    assert server.counters.hello_verify.value == 1000
    assert all(len(reply) <= len(hello) for reply, _, _ in wire.queue)  # no amplification


def test_address_change_by_cid() -> None:
    clock = Clock()
    server, client, server_receiver, client_receiver, wire = make(clock)
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    (peer,) = peers
    moved = ("10.0.0.3", 40001)
    wire.move(CLIENT, moved)  # a NAT rebinding: same client, new source address
    client.send_datagram(b"after move", peer)
    wire.deliver()
    ((data, server_peer),) = server_receiver.received
    assert data == b"after move"
    context = server.peer_context(server_peer)
    assert context.address == moved and context.previous_address == CLIENT
    server.send_datagram(b"reply", server_peer)
    wire.deliver()
    assert client_receiver.received == [(b"reply", peer)]
    assert server.counters.address_changes.value == 1


def test_unknown_cid_is_dropped_and_counted() -> None:
    clock = Clock()
    server, _, _, _, _ = make(clock)
    server.datagramReceived(b"\x19\xfe\xfd" + bytes(8) + b"\x07abcde" + b"\x00\x10" + bytes(16), CLIENT)
    assert server.counters.dropped.get("unknown_cid") == 1


def test_handshake_retransmission_on_loss() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    wire.lose = {3}  # the ClientHello carrying the cookie
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    assert not peers
    clock.advance(1.0)
    wire.deliver()
    assert len(peers) == 1


def test_a_cancelled_wait_stops_waiting_and_the_handshake_goes_on() -> None:
    """A caller's timeout cancels its wait only; the handshake completes for the next connect."""
    clock = Clock()
    server, client, _, _, wire = make(clock)
    wire.lose = {1}  # the first ClientHello: nothing happens until the retransmission
    first = client.connect(SERVER)
    failures: list[Any] = []
    first.addErrback(failures.append)
    first.cancel()
    assert failures and failures[0].check(defer.CancelledError)
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)  # the same handshake, a new waiter
    clock.advance(1.0)
    wire.deliver()
    assert len(peers) == 1 and len(failures) == 1  # no second outcome for the cancelled wait


def test_connect_failure_fires_errback() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    client.client_configuration.psk_identity = b"stranger"
    failures: list[Any] = []
    client.connect(SERVER).addErrback(failures.append)
    wire.deliver()
    (failure,) = failures
    assert failure.check(DtlsConnectError)
    assert server.counters.failures.get("unknown_psk_identity") == 1
    assert server.connections == [] and client.connections == []


def test_unknown_identity_is_named_by_its_alert_on_the_client() -> None:
    """Issue 13: the client says the server rejected it, with the alert's name."""
    clock = Clock()
    server, client, _, _, wire = make(clock)
    client.client_configuration.psk_identity = b"stranger"
    failures: list[Any] = []
    client.connect(SERVER).addErrback(failures.append)
    wire.deliver()
    assert failures[0].getErrorMessage() == "the server rejected the handshake: unknown_psk_identity"
    assert client.counters.failures.get("unknown_psk_identity") == 1


def test_wrong_psk_fails_at_once_on_both_sides_with_the_identity_logged() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    client.client_configuration.psk = b"not the secret"
    failures: list[Any] = []
    threshold = logs._threshold[0]
    logs.set_level(LogLevel.info)  # whatever an earlier test left
    try:
        with log_events() as events:
            client.connect(SERVER).addErrback(failures.append)
            wire.deliver()
    finally:
        logs._threshold[0] = threshold
    assert clock.seconds() == 0.0 and failures
    assert failures[0].getErrorMessage() == "the server rejected the handshake: bad_record_mac"
    assert server.counters.failures.get("bad_record_mac") == 1
    lines = [formatEvent(event) for event in events]
    assert any(
        line == 'DTLS handshake with 10.0.0.2:40000 failed: wrong key for PSK identity "Client_identity"'
        for line in lines
    ), lines


def test_peer_repr_and_log_addresses_are_host_port() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    assert repr(peers[0]) == "<DtlsPeer 10.0.0.1:5684>"
    assert format_address(("::1", 5684)) == "[::1]:5684"


def test_max_connections_with_stale_eviction() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock, max_connections=1, stale_after=60.0)
    client.connect(SERVER)
    wire.deliver()
    second = DtlsEndpoint(clock, client_configuration=client.client_configuration)
    wire.attach(second, ("10.0.0.4", 1))
    results: list[Any] = []
    second.connect(SERVER).addBoth(results.append)
    wire.deliver()
    assert server.counters.dropped.get("max_connections") >= 1 and len(server.connections) == 1
    clock.advance(61.0)
    second.connect(SERVER)  # still in progress: retransmits on its timer
    wire.deliver()
    for _ in range(5):
        clock.advance(4.0)
        wire.deliver()
    assert server.counters.evictions.value == 1
    assert [p.address for p in server.connections] == [("10.0.0.4", 1)]


class Route:
    name = "dtls-cid-router"

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((data, address))


def test_routed_records_are_answered_through_the_route() -> None:
    clock = Clock()
    server, client, server_receiver, _, wire = make(clock)
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    client.send_datagram(b"via router", peers[0])
    ((data, _, _),) = wire.queue
    wire.queue.clear()
    route = Route()
    server.routed_datagram_received(data, CLIENT, route)
    ((payload, server_peer),) = server_receiver.received
    assert server.peer_context(server_peer).via == "dtls-cid-router"
    server.send_datagram(b"answer", server_peer)
    assert len(route.sent) == 1 and route.sent[0][1] == CLIENT and not wire.queue


@pytest.mark.parametrize("count", [3])
def test_several_clients_get_distinct_cids(count: int) -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    for index in range(count):
        other = DtlsEndpoint(clock, client_configuration=client.client_configuration)
        wire.attach(other, ("10.0.1.%d" % index, 2000))
        other.connect(SERVER)
    wire.deliver()
    cids = {server.peer_context(p).read_cid for p in server.connections}
    assert len(cids) == count and all(cid[0] == 7 for cid in cids)


def test_restarted_client_replaces_its_half_open_connection_only_with_a_cookie() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    wire.lose = {4}  # the server's flight after the cookie: the handshake stays half open
    client.connect(SERVER)
    wire.deliver()
    (half_open,) = server.connections
    assert not half_open.connection.is_established
    restarted = DtlsEndpoint(clock, client_configuration=client.client_configuration)
    wire.attach(restarted, CLIENT)  # same address, new process
    peers: list[Any] = []
    restarted.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    assert len(peers) == 1 and clock.seconds() == 0  # no waiting for the old handshake to time out
    (replacement,) = server.connections
    assert replacement is not half_open and replacement.connection.is_established


def test_spoofed_client_hello_does_not_end_a_session() -> None:
    clock = Clock()
    server, client, _, _, wire = make(clock)
    client.connect(SERVER)
    wire.deliver()
    (session,) = server.connections
    stranger = DtlsConnection(client.client_configuration, SERVER)
    stranger.connect(0.0)
    (hello,) = [d for d, _ in stranger.datagrams_to_send()]
    server.datagramReceived(hello, CLIENT)  # spoofed source: the client's address, no cookie
    assert server.connections == [session] and session.connection.is_established
    assert server.counters.hello_verify.value == 2


def test_client_reconnect_resumes_the_session() -> None:
    from nettester.protocols.dtls.connection import SessionCache

    clock = Clock()
    server, client, _, _, wire = make(clock)
    server.server_configuration.session_cache = SessionCache()
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    client.close_all()
    wire.deliver()
    assert server.connections == [] and client.connections == []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    assert len(peers) == 2 and peers[0] is not peers[1]
    assert server.counters.resumptions.value == 1 and client.counters.resumptions.value == 1
    assert client.peer_context(peers[1]).identity == "Client_identity"


def test_a_spoofed_client_hello_fragment_does_not_cut_off_an_established_peer() -> None:
    """A first ClientHello fragment forged from a peer's address starts a
    partial hello in the reassembly area; the peer's own records still reach
    its connection (only ClientHello fragments go to the area)."""
    from nettester.protocols.dtls import handshake as hs
    from nettester.protocols.dtls import record

    clock = Clock()
    client_configuration, server_configuration = psk_configs(node_id=7, cid_length=None)
    server_receiver = Collector()
    server = DtlsEndpoint(clock, server_configuration=server_configuration, receiver=server_receiver)
    client = DtlsEndpoint(clock, client_configuration=client_configuration)
    wire = Wire()
    wire.attach(server, SERVER)
    wire.attach(client, CLIENT)
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    forged = record.encode_plaintext_record(
        record.HANDSHAKE, record.DTLS_1_2, 0, 5, hs.encode_header(hs.CLIENT_HELLO, 500, 0, 0, 40) + bytes(40)
    )
    server.datagramReceived(forged, CLIENT)
    assert server.admission.fragments.assembling(CLIENT)
    client.send_datagram(b"still mine", peers[0])
    wire.deliver()
    assert [data for data, _ in server_receiver.received] == [b"still mine"]
