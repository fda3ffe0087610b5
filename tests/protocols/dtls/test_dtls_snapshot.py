"""Snapshot and restore of established DTLS connections (cluster fail-over):
engine to engine, then through DtlsEndpoint; no sockets, a task.Clock."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import pytest
from dtls_pair import CLIENT_ADDRESS, Pair, psk_configs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dtls_endpoint import CLIENT, SERVER, Collector, make
from test_dtls_engine import ecdsa_configs
from twisted.internet.task import Clock

from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import (
    ApplicationData,
    DtlsConfiguration,
    DtlsConnection,
    SessionCache,
)
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from nettester.protocols.dtls.record import RecordError
from nettester.protocols.dtls.snapshot import SnapshotError, restore_connection, snapshot_connection

GAP = 1000
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def established(suite: str = "TLS_PSK_WITH_AES_128_CCM_8", session_cache: SessionCache | None = None) -> Pair:
    """A client and a server connection after a PSK or ECDHE-ECDSA handshake with CIDs."""
    if suites.SUITES_BY_NAME[suite].key_exchange is suites.KeyExchange.ECDHE_ECDSA:
        client_config, server_config = ecdsa_configs(suite=suite)
    else:
        client_config, server_config = psk_configs(cipher_suites=(suite,))
    server_config.session_cache = session_cache
    pair = Pair(client_config, server_config)
    pair.start()
    pair.run()
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    assert pair.client.cid_negotiated and pair.server.cid_negotiated
    return pair


def deliver(sender: DtlsConnection, receiver: DtlsConnection, data: bytes, address: Any) -> bytes:
    """Send ``data`` as one record and return its datagram once ``receiver`` got it."""
    sender.send_application_data(data)
    (datagram,) = [d for d, _ in sender.datagrams_to_send()]
    receiver.receive_datagram(datagram, address, 0.0)
    assert drain(receiver) == [ApplicationData(data)]
    return datagram


def drain(connection: DtlsConnection) -> list[object]:
    events: list[object] = []
    while (event := connection.next_event()) is not None:
        events.append(event)
    return events


def sequence_of(datagram: bytes, cid_length: int) -> int:
    (received,), malformed = record.parse_records(datagram, cid_length)
    assert not malformed
    return received.sequence_number


@pytest.mark.parametrize("suite", sorted(suites.SUITES_BY_NAME))
def test_restored_server_continues_the_session(suite: str) -> None:
    pair = established(suite)
    client, first = pair.client, pair.server
    assert first is not None
    for number in range(3):
        deliver(client, first, b"request %d" % number, CLIENT_ADDRESS)
        deliver(first, client, b"answer %d" % number, None)
    snapshot = snapshot_connection(first)
    assert snapshot[0] == 1
    second = restore_connection(pair.server_config, snapshot, GAP)
    assert second.is_established and not second.is_client and drain(second) == []
    assert (second.cipher_suite, second.peer_identity, second.read_cid, second.write_cid, second.peer_address) == (
        first.cipher_suite,
        first.peer_identity,
        first.read_cid,
        first.write_cid,
        first.peer_address,
    )
    assert second.read_sequence_high == first.read_sequence_high
    for number in range(3, 6):
        deliver(client, second, b"request %d" % number, CLIENT_ADDRESS)
        answer = deliver(second, client, b"answer %d" % number, None)
        assert sequence_of(answer, len(client.read_cid)) == first.write_sequence + GAP + number - 3
    assert client.read_sequence_high == first.write_sequence + GAP + 2


def test_record_accepted_before_the_snapshot_is_a_replay() -> None:
    pair = established()
    assert pair.server is not None
    accepted = deliver(pair.client, pair.server, b"once", CLIENT_ADDRESS)
    second = restore_connection(pair.server_config, snapshot_connection(pair.server), 0)
    second.receive_datagram(accepted, CLIENT_ADDRESS, 0.0)
    assert drain(second) == [] and second.dropped["replay"] == 1
    deliver(pair.client, second, b"new", CLIENT_ADDRESS)  # the window moves on from there


def test_write_sequence_is_the_snapshots_plus_the_gap() -> None:
    pair = established()
    assert pair.server is not None
    snapshot = snapshot_connection(pair.server)
    sent = pair.server.write_sequence
    assert sent > 0  # the Finished went out in epoch 1
    for gap in (0, 1, GAP):
        assert restore_connection(pair.server_config, snapshot, gap).write_sequence == sent + gap
    last = restore_connection(pair.server_config, snapshot, record.MAX_SEQUENCE - sent)
    assert last.write_sequence == record.MAX_SEQUENCE
    last.seal_application_data(b"the last record of the epoch")
    with pytest.raises(RecordError):
        last.seal_application_data(b"one too many")
    with pytest.raises(SnapshotError) as raised:
        restore_connection(pair.server_config, snapshot, record.MAX_SEQUENCE - sent + 1)
    assert raised.value.reason == "sequence_exhausted"
    with pytest.raises(SnapshotError) as raised:
        restore_connection(pair.server_config, snapshot, -1)
    assert raised.value.reason == "bad_sequence_gap"


def test_snapshot_of_a_restored_connection_is_the_same_snapshot() -> None:
    pair = established()
    assert pair.server is not None
    snapshot = snapshot_connection(pair.server)
    assert snapshot_connection(restore_connection(pair.server_config, snapshot, 0)) == snapshot


def test_only_established_server_connections_are_snapshotted() -> None:
    client_config, server_config = psk_configs()
    pair = Pair(client_config, server_config)
    # The client's second flight is lost: the server waits for its key exchange.
    pair.network = lambda direction, datagrams: [] if direction == "c2s" and pair.server is not None else datagrams
    pair.start()
    pair.pump()
    assert pair.server is not None and not pair.server.is_established
    for connection in (pair.server, DtlsConnection(server_config, CLIENT_ADDRESS)):
        with pytest.raises(SnapshotError) as raised:
            snapshot_connection(connection)
        assert raised.value.reason == "not_established"
    done = established()
    with pytest.raises(SnapshotError) as raised:
        snapshot_connection(done.client)
    assert raised.value.reason == "not_server"


def test_restored_session_can_be_resumed_on_the_new_node() -> None:
    pair = established(session_cache=SessionCache())
    assert pair.server is not None
    node_config = dataclasses.replace(pair.server_config, session_cache=SessionCache())
    restore_connection(node_config, snapshot_connection(pair.server), 0)
    assert len(node_config.session_cache or ()) == 1
    session = pair.completed("client").session
    client_config, _ = psk_configs(session=session)
    resumed = Pair(client_config, node_config)
    resumed.start()
    resumed.run()
    assert resumed.completed("server").resumed and resumed.completed("client").resumed


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"is_client": True}, "not_server"),
        ({"cipher_suites": ("TLS_PSK_WITH_AES_128_GCM_SHA256",)}, "suite_not_configured"),
        ({"cid_generator": NodeConnectionIdGenerator(4, 0)}, "cid_length_mismatch"),
        ({"cid_generator": None}, "cid_length_mismatch"),
    ],
)
def test_restore_needs_a_matching_server_configuration(change: dict[str, Any], reason: str) -> None:
    pair = established()
    assert pair.server is not None
    with pytest.raises(SnapshotError) as raised:
        restore_connection(dataclasses.replace(pair.server_config, **change), snapshot_connection(pair.server), 0)
    assert raised.value.reason == reason


@functools.cache
def real_snapshot() -> tuple[DtlsConfiguration, bytes]:
    pair = established()
    assert pair.server is not None
    deliver(pair.client, pair.server, b"some traffic", CLIENT_ADDRESS)
    return pair.server_config, snapshot_connection(pair.server)


def restores_or_fails_cleanly(data: bytes) -> None:
    """Restoring ``data`` raises SnapshotError or gives a usable connection."""
    configuration, _ = real_snapshot()
    try:
        connection = restore_connection(configuration, data, 0)
    except SnapshotError as error:
        assert error.reason and error.reason.replace("_", "").isalpha()
        return
    assert connection.is_established
    assert snapshot_connection(connection) == data  # every field was read as it was written
    connection.seal_application_data(b"still usable")


@pytest.mark.parametrize(
    ("offset", "replacement", "reason"),
    [
        (0, b"\x02", "bad_version"),
        (1, b"\x80", "bad_flags"),
        (2, b"\xff\xff", "unknown_suite"),
        (4, b"\x00\x00", "bad_epoch"),
        (6, (-1).to_bytes(8, "big", signed=True), "bad_replay_window"),
        (22, b"\x00\x00", "bad_epoch"),
        (24, (record.MAX_SEQUENCE + 2).to_bytes(8, "big"), "bad_sequence"),
    ],
)
def test_malformed_fixed_fields(offset: int, replacement: bytes, reason: str) -> None:
    configuration, snapshot = real_snapshot()
    data = snapshot[:offset] + replacement + snapshot[offset + len(replacement) :]
    with pytest.raises(SnapshotError) as raised:
        restore_connection(configuration, data, 0)
    assert raised.value.reason == reason


def test_every_truncation_and_any_trailing_byte_are_rejected() -> None:
    configuration, snapshot = real_snapshot()
    for length in range(len(snapshot)):
        with pytest.raises(SnapshotError) as raised:
            restore_connection(configuration, snapshot[:length], 0)
        assert raised.value.reason == "truncated"
    with pytest.raises(SnapshotError) as raised:
        restore_connection(configuration, snapshot + b"\x00", 0)
    assert raised.value.reason == "bad_length"


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda tail: b"\x01" + tail)))
def test_restore_of_arbitrary_bytes(data: bytes) -> None:
    restores_or_fails_cleanly(data)


@FUZZ
@given(st.data())
def test_restore_of_a_snapshot_with_flipped_bytes(data: st.DataObject) -> None:
    _, snapshot = real_snapshot()
    flipped = bytearray(snapshot)
    for _ in range(data.draw(st.integers(1, 4))):
        flipped[data.draw(st.integers(0, len(snapshot) - 1))] ^= data.draw(st.integers(1, 255))
    restores_or_fails_cleanly(bytes(flipped))


# --- DtlsEndpoint ---------------------------------------------------------------


def backup_of(server: DtlsEndpoint, clock: Clock) -> tuple[DtlsEndpoint, Collector]:
    """A second node: the same server configuration, the same CID node id."""
    receiver = Collector()
    return DtlsEndpoint(clock, server_configuration=server.server_configuration, receiver=receiver), receiver


def take_over(backup: DtlsEndpoint, snapshot: bytes) -> list[bytes]:
    """The cluster's part on ``backup``: at the first record of an unknown
    CID adopt ``snapshot``, then feed that record in again.  Returns the CIDs
    it was asked about."""
    asked: list[bytes] = []

    def unknown_cid(cid: bytes, data: bytes, address: Any, route: Any) -> bool:
        asked.append(cid)
        backup.adopt(snapshot, address, route, GAP)
        backup.datagramReceived(data, address)
        return True

    backup.unknown_cid = unknown_cid
    return asked


def connected(clock: Clock) -> tuple[DtlsEndpoint, DtlsEndpoint, Collector, Any, Any, list[Any]]:
    """server, client, the client's receiver, its peer, the wire, the peers on_established reported."""
    server, client, _, client_receiver, wire = make(clock)
    reported: list[Any] = []
    server.on_established = reported.append
    client.on_established = reported.append  # client handshakes are not reported
    peers: list[Any] = []
    client.connect(SERVER).addCallback(peers.append)
    wire.deliver()
    (peer,) = peers
    return server, client, client_receiver, peer, wire, reported


def test_endpoint_fails_over_to_an_adopted_connection() -> None:
    clock = Clock()
    server, client, client_receiver, peer, wire, reported = connected(clock)
    (server_peer,) = reported
    assert server_peer.connection.is_established and not server_peer.connection.is_client
    client.send_datagram(b"before", peer)
    wire.deliver()
    cid = server.peer_context(server_peer).read_cid
    snapshot = server.snapshot(cid)
    assert snapshot is not None and server.snapshot(b"\x07nope!") is None

    backup, backup_receiver = backup_of(server, clock)
    wire.attach(backup, SERVER)  # the owner died: the load balancer sends its records here
    asked = take_over(backup, snapshot)
    client.send_datagram(b"after", peer)
    wire.deliver()
    assert asked == [cid]
    ((data, adopted),) = backup_receiver.received
    assert data == b"after"
    assert backup.peer_by_connection_id(cid) is adopted and backup.connections == [adopted]
    context = backup.peer_context(adopted)
    assert (context.address, context.identity, context.node_id) == (CLIENT, "Client_identity", 7)
    summary = backup.summary()
    assert summary["dtls_adopted"] == 1 and summary["dtls_handshakes"] == 0 and summary["dtls_dropped"] == 0
    exported = {family.name: family for family in backup.metrics.collect()}
    assert exported["nettester_dtls_adopted"].samples[0].value == 1
    backup.send_datagram(b"answer", adopted)
    wire.deliver()
    assert client_receiver.received[-1] == (b"answer", peer)
    assert peer.connection.read_sequence_high >= server_peer.connection.write_sequence + GAP
    assert len(reported) == 1  # adoption is no handshake


def test_on_established_fires_once_per_server_handshake_with_a_cid() -> None:
    clock = Clock()
    server, client, _, _, wire, reported = connected(clock)
    other = DtlsEndpoint(clock, client_configuration=dataclasses.replace(client.client_configuration, cid_length=None))
    wire.attach(other, ("10.0.0.5", 1))
    connections: list[Any] = []
    other.connect(SERVER).addCallback(connections.append)
    wire.deliver()
    assert len(connections) == 1 and len(server.connections) == 2
    assert len(reported) == 1  # the second client negotiated no CID: nothing to replicate by CID


@pytest.mark.parametrize(("answer", "counted"), [(None, 1), (False, 1), (True, 0)])
def test_unknown_cid_hook_decides_whether_the_drop_is_counted(answer: bool | None, counted: int) -> None:
    server, _, _, _, _ = make(Clock())
    calls: list[tuple[bytes, bytes, Any, Any]] = []

    def unknown_cid(cid: bytes, data: bytes, address: Any, route: Any) -> bool:
        calls.append((cid, data, address, route))
        return bool(answer)

    if answer is not None:
        server.unknown_cid = unknown_cid
    datagram = b"\x19\xfe\xfd" + bytes(8) + b"\x07abcde" + b"\x00\x10" + bytes(16)
    server.datagramReceived(datagram, CLIENT)
    assert server.counters.dropped.get("unknown_cid") == counted
    if answer is not None:
        assert calls == [(b"\x07abcde", datagram, CLIENT, None)]


def test_adopt_replaces_a_peer_with_the_same_cid() -> None:
    clock = Clock()
    server, _, _, _, _, (server_peer,) = connected(clock)
    snapshot = server.snapshot(server_peer.connection.read_cid)
    assert snapshot is not None
    backup, _ = backup_of(server, clock)
    first = backup.adopt(snapshot, CLIENT, None, GAP)
    second = backup.adopt(snapshot, CLIENT, None, 2 * GAP)
    assert first is not second and backup.connections == [second]
    assert backup.peer_by_connection_id(second.connection.read_cid) is second
    assert second.connection.write_sequence == server_peer.connection.write_sequence + 2 * GAP
    assert backup.summary()["dtls_adopted"] == 2


def test_adopted_peer_moves_only_on_an_authenticated_record() -> None:
    clock = Clock()
    server, client, client_receiver, peer, wire, (server_peer,) = connected(clock)
    cid = server_peer.connection.read_cid
    snapshot = server.snapshot(cid)
    assert snapshot is not None
    backup, backup_receiver = backup_of(server, clock)
    wire.attach(backup, SERVER)
    asked = take_over(backup, snapshot)
    genuine = peer.connection.seal_application_data(b"genuine")
    forged = genuine[:-1] + bytes((genuine[-1] ^ 1,))
    backup.datagramReceived(forged, ("203.0.113.6", 666))  # someone who saw the CID on the wire
    (adopted,) = backup.connections
    assert asked == [cid] and adopted.address == CLIENT and backup.counters.dropped.get("bad_mac") == 1
    moved = ("10.0.0.3", 40001)
    wire.move(CLIENT, moved)  # the client's NAT rebound while its node failed
    client.send_datagram(b"from the new address", peer)
    wire.deliver()
    assert backup_receiver.received == [(b"from the new address", adopted)]
    assert (adopted.address, adopted.previous_address) == (moved, CLIENT)
    backup.send_datagram(b"answer", adopted)
    wire.deliver()
    assert client_receiver.received[-1] == (b"answer", peer)


def test_adopt_rejects_a_bad_snapshot() -> None:
    clock = Clock()
    server, _, _, _, _ = make(clock)
    backup, _ = backup_of(server, clock)
    with pytest.raises(SnapshotError) as raised:
        backup.adopt(b"\x01garbage", CLIENT, None, GAP)
    assert raised.value.reason == "truncated"
    assert backup.counters.dropped.get("bad_snapshot") == 1 and backup.connections == []
