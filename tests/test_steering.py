"""The CID steering program: interpreted, and on the real kernel over loopback."""

from __future__ import annotations

import select
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nettester import steering


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


def test_everything_else_falls_back_to_the_hash() -> None:
    code = steering.program([0, 1])
    client_hello = bytes((22, 0xFE, 0xFF)) + bytes(20)
    coap_get = bytes((0x40, 0x01, 0x12, 0x34, 0xB4)) + b"test"
    dtls_1_0_cid = bytes((25, 0xFE, 0xFF)) + bytes(20)
    unknown_worker = cid_record(0, 5)
    for payload in (b"", b"\x19", client_hello, coap_get, dtls_1_0_cid, unknown_worker, cid_record(0, 1)[:12]):
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
