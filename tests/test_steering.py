"""The CID steering programs (DTLS port, cluster management port): interpreted, and on the real kernel."""

from __future__ import annotations

import select
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nettester import steering
from nettester.cluster.wire import (
    MAC_LENGTH,
    TYPE_IN,
    TYPE_OUT,
    TYPE_PING,
    TYPE_PONG,
    TYPE_STATE,
    ManagementCodec,
    NodeState,
)


def cid_record(node: int, worker: int, tail: bytes = b"\x00\x05hello") -> bytes:
    """A tls12_cid record header (RFC 9146 section 4) with a 6-byte CID ``node, worker, 4 random``."""
    return bytes((steering.TLS12_CID, 0xFE, 0xFD, 0, 1)) + bytes(6) + bytes((node, worker, 9, 9, 9, 9)) + tail


def test_cid_byte_1_is_at_payload_offset_12() -> None:
    record = cid_record(node=7, worker=3)
    assert record[11] == 7 and record[steering.CID_WORKER_OFFSET] == 3


@pytest.mark.parametrize("slots", [[0, 1], [1, 0], [2, -1, 0]])
def test_cid_records_go_to_their_workers_slot(slots: list[int]) -> None:
    code = steering.program(slots)
    for worker, slot in enumerate(slots):
        expected = steering.FALLBACK if slot < 0 else slot
        assert steering.run(code, cid_record(1, worker)) == expected


def test_a_worker_byte_beyond_the_workers_goes_to_that_byte_mod_n() -> None:
    """A session adopted from a node with more workers (cluster fail-over) has one home: byte mod N."""
    code = steering.program([1, 0, 2])
    assert [steering.run(code, cid_record(4, worker)) for worker in (3, 4, 5, 255)] == [1, 0, 2, 1]


def test_everything_else_falls_back_to_the_hash() -> None:
    code = steering.program([0, 1])
    client_hello = bytes((22, 0xFE, 0xFF)) + bytes(20)
    coap_get = bytes((0x40, 0x01, 0x12, 0x34, 0xB4)) + b"test"
    dtls_1_0_cid = bytes((25, 0xFE, 0xFF)) + bytes(20)
    for payload in (b"", b"\x19", client_hello, coap_get, dtls_1_0_cid, cid_record(0, 1)[:12]):
        assert steering.run(code, payload) == steering.FALLBACK


@given(st.binary(max_size=64), st.lists(st.integers(-1, 3), max_size=4))
def test_any_payload_gets_a_slot_or_the_fallback(payload: bytes, slots: list[int]) -> None:
    result = steering.run(steering.program(slots), payload)
    assert result == steering.FALLBACK or result in slots


def test_too_many_workers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at most 100 workers"):
        steering.program(list(range(101)))


def test_slots_follow_the_kernel_rules() -> None:
    slots = steering.ReuseportSlots()
    for worker in range(3):
        slots.bound(worker)
    slots.closed(0)  # the last socket (worker 2) moves into index 0
    assert slots.slots(3) == [-1, 1, 0]
    slots.bound(0)
    assert slots.slots(3) == [2, 1, 0]


def _group(count: int) -> tuple[list[socket.socket], int]:
    sockets = []
    port = 0
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]
        sock.setblocking(False)
        sockets.append(sock)
    return sockets, port


def _receiver(sockets: list[socket.socket], payload: bytes, sender: socket.socket, port: int) -> int:
    """Send ``payload`` and return the index of the socket that got it (bounded wait)."""
    sender.sendto(payload, ("127.0.0.1", port))
    readable, _, _ = select.select(sockets, [], [], 5.0)
    assert len(readable) == 1, "the datagram reached no socket, or more than one"
    data, _ = readable[0].recvfrom(2048)
    assert data == payload
    return sockets.index(readable[0])


def test_kernel_steers_cid_records_whatever_the_source_port() -> None:
    sockets, port = _group(2)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    try:
        steering.attach(sockets[0], steering.program([0, 1]))
        for sender in senders:
            sender.bind(("127.0.0.1", 0))
            for worker in (0, 1, 1, 0):
                assert _receiver(sockets, cid_record(0, worker), sender, port) == worker
            # Not a CID record: the 4-tuple hash, the same socket every time for one source.
            first = _receiver(sockets, b"\x40\x01\x00\x01", sender, port)
            assert _receiver(sockets, b"\x40\x01\x00\x02", sender, port) == first
    finally:
        for sock in sockets + senders:
            sock.close()


def test_kernel_moves_the_last_socket_into_a_closed_ones_place() -> None:
    """The rule ReuseportSlots models, checked on the running kernel."""
    sockets, port = _group(3)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sockets[0].close()
        live = sockets[1:]
        model = steering.ReuseportSlots()
        for worker in range(3):
            model.bound(worker)
        model.closed(0)
        steering.attach(live[0], steering.program(model.slots(3)))
        # Worker w's records reach the socket worker w bound, wherever the kernel moved it.
        assert _receiver(live, cid_record(0, 1), sender, port) == 0
        assert _receiver(live, cid_record(0, 2), sender, port) == 1
        # Index 0 is now socket 2: a raw "return 0" program would reach it.
        steering.attach(live[0], [(steering.BPF_RET_K, 0, 0, 0)])
        assert _receiver(live, b"anything", sender, port) == 1
    finally:
        for sock in sockets[1:] + [sender]:
            sock.close()


# -- the management port's program (cluster nodes of N workers) ---------------------------------------------

IPV4_CLIENT = ("192.0.2.7", 5684)
IPV6_CLIENT = ("2001:db8::7", 5684)


def management_codec(authenticated: bool) -> ManagementCodec:
    return ManagementCodec(b"group secret" if authenticated else None)


def forwarded(worker: int, client: tuple[str, int] = IPV4_CLIENT, authenticated: bool = True) -> bytes:
    """An IN record, as the cluster encodes it, carrying a tls12_cid record of worker ``worker``."""
    return management_codec(authenticated).encode_records(TYPE_IN, client, cid_record(1, worker))


@pytest.mark.parametrize("authenticated", [True, False])
@pytest.mark.parametrize("client", [IPV4_CLIENT, IPV6_CLIENT])
def test_forwarded_records_go_to_the_worker_of_their_cid(authenticated: bool, client: tuple[str, int]) -> None:
    mac_length = management_codec(authenticated).mac_length
    code = steering.management_program([2, 0, 1], mac_length)
    assert [steering.run(code, forwarded(worker, client, authenticated)) for worker in range(5)] == [2, 0, 1, 2, 0]


def test_replicas_go_to_the_worker_that_adopts_their_session() -> None:
    codec = management_codec(True)
    code = steering.management_program([1, 0], codec.mac_length)
    for worker in range(4):
        state = codec.encode_state(bytes((3, worker, 9, 9, 9, 9)), b"snapshot", 1)
        assert steering.run(code, state) == [1, 0][worker % 2]
        # The same session's records, forwarded or straight to the DTLS port, reach that worker too.
        assert steering.run(code, forwarded(worker)) == steering.run(steering.program([1, 0]), cid_record(3, worker))


def test_ping_and_pong_go_to_the_discovery_worker_the_rest_to_the_hash() -> None:
    codec = management_codec(True)
    code = steering.management_program([1, 0, 2], codec.mac_length)
    for kind in (TYPE_PING, TYPE_PONG):
        assert steering.run(code, codec.encode_node(kind, 3, NodeState.UP, 1)) == 1
    assert steering.run(steering.management_program([-1, 0], 8), codec.encode_node(TYPE_PING, 3, NodeState.UP, 1)) \
        == steering.FALLBACK, "worker 0 down: the hash"
    out = codec.encode_records(TYPE_OUT, IPV4_CLIENT, cid_record(1, 1))
    handshake = codec.encode_records(TYPE_IN, IPV4_CLIENT, bytes((22, 0xFE, 0xFD)) + bytes(20))
    dtls_1_0 = codec.encode_records(TYPE_IN, IPV4_CLIENT, bytes((25, 0xFE, 0xFF)) + bytes(20))
    short_state = bytes((TYPE_STATE, 1, 3, 1)) + bytes(40)  # a 1-byte CID has no byte 1
    for payload in (out, handshake, dtls_1_0, short_state, b"", b"\x3f", b"\x3f\x00\x00", b"\x99" * 30):
        assert steering.run(code, payload) == steering.FALLBACK


def test_a_forwarded_record_cut_before_cid_byte_1_falls_back() -> None:
    code = steering.management_program([1, 2], MAC_LENGTH)
    whole = forwarded(1)
    start = 4 + 4 + MAC_LENGTH  # the record inside: header, IPv4 address, MAC
    assert steering.run(code, whole[:start + 13]) == 2
    for end in range(start + 13):
        assert steering.run(code, whole[:end]) == steering.FALLBACK, end


@given(st.binary(max_size=80), st.sampled_from([0, MAC_LENGTH]), st.data())
def test_no_management_datagram_is_read_out_of_bounds(payload: bytes, mac_length: int, data: st.DataObject) -> None:
    """No worker sits at slot 0 here, so a 0 could only be a load beyond the end aborting the program."""
    if payload and data.draw(st.booleans()):
        payload = bytes((data.draw(st.sampled_from([TYPE_IN, TYPE_STATE, TYPE_PING, TYPE_PONG])),)) + payload[1:]
    result = steering.run(steering.management_program([1, 2], mac_length), payload)
    assert result in (1, 2, steering.FALLBACK)
    assert steering.run(steering.program([1, 2]), payload) in (1, 2, steering.FALLBACK)


def test_kernel_steers_management_records_and_delivers_hostile_ones() -> None:
    """On the running kernel: IN and STATE by their CID, PING/PONG to worker 0, anything short or hostile
    still delivered to some worker (the program never aborts on an out-of-bounds load)."""
    sockets, port = _group(3)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    codec = management_codec(True)
    try:
        steering.attach(sockets[0], steering.management_program([2, 0, 1], codec.mac_length))
        for client in (IPV4_CLIENT, IPV6_CLIENT):
            for worker in range(4):
                assert _receiver(sockets, forwarded(worker, client), sender, port) == [2, 0, 1][worker % 3]
        for worker in range(3):
            state = codec.encode_state(bytes((3, worker, 1, 2, 3, 4)), b"snapshot", 1)
            assert _receiver(sockets, state, sender, port) == [2, 0, 1][worker]
        assert _receiver(sockets, codec.encode_node(TYPE_PONG, 3, NodeState.UP, 1), sender, port) == 2
        first = _receiver(sockets, codec.encode_records(TYPE_OUT, IPV4_CLIENT, b"\x17answer"), sender, port)
        assert _receiver(sockets, codec.encode_records(TYPE_OUT, IPV4_CLIENT, b"\x17again"), sender, port) == first
        hostile = [forwarded(1)[:end] for end in range(0, 30, 3)]
        hostile += [bytes((TYPE_IN, 0, 0, 255)) + bytes(10), bytes((TYPE_STATE,)), bytes((TYPE_STATE, 0, 0, 1)),
                    bytes((TYPE_IN, 0, 0, 16)) + b"\xff" * 40]
        for payload in hostile:
            _receiver(sockets, payload, sender, port)  # delivered to exactly one socket, whichever
    finally:
        for sock in sockets + [sender]:
            sock.close()
