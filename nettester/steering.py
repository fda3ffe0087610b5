"""Kernel steering of DTLS Connection ID records to their worker (SO_ATTACH_REUSEPORT_CBPF).

With ``--workers N`` every worker binds the same UDP port with
``SO_REUSEPORT``; the kernel then picks one socket of the group per datagram.
By default it hashes the 4-tuple, so a DTLS session whose client changes
address or port (a NAT rebinding, the very thing RFC 9146 Connection IDs
survive) would land on another worker that does not know it. A classic BPF
program attached to the group with ``SO_ATTACH_REUSEPORT_CBPF`` picks the
socket instead: its return value is an index into the group's socket array
(Linux ``net/core/sock_reuseport.c``, ``run_bpf_filter``); a value at or above
the number of sockets makes the kernel fall back to the hash.

What the program sees: for UDP the kernel pulls the 8-byte UDP header before
running it, so absolute loads are offsets into the UDP payload, and
``len`` is the payload length. A load beyond the end aborts a classic BPF
program with return value 0 (socket 0), so the length is checked first.

The record layout (RFC 9146 section 4, the ``tls12_cid`` record, content
type 25)::

    offset  0      content type (25)
    offset  1..2   version {254, 253} (DTLS 1.2)
    offset  3..4   epoch
    offset  5..10  sequence number (48 bits)
    offset 11..    cid (the length the server chose), then length(2), payload

Our CIDs put the cluster node id in CID byte 0 (offset 11) and the worker
index in CID byte 1: **offset 12**. Every datagram whose first record is not
a DTLS 1.2 ``tls12_cid`` record (ClientHellos, plain CoAP, STUN) is left to
the hash. The program (``program(slots)``), one 8-byte ``sock_filter`` each
(code u16, jt u8, jf u8, k u32)::

    0  ld  len                 0x0080 A = payload length
    1  jge #13       jf FALL   0x0035 too short to hold CID byte 1: hash
    2  ldb [0]                 0x0030 A = content type
    3  jeq #25       jf FALL   0x0015 not tls12_cid: hash
    4  ldh [1]                 0x0028 A = version
    5  jeq #0xfefd   jf FALL   0x0015 not DTLS 1.2: hash
    6  ldb [12]                0x0030 A = CID byte 1, the worker index
    7  jeq #w0  jf +1          0x0015 one pair per worker w:
    8  ret #slot_of(w0)        0x0006   its socket's index in the group
       ...
    FALL ret #0xffffffff       0x0006 out of range: the kernel hashes

The slot of a worker is its socket's index in the group's array: sockets
join at the end in bind order, and when one closes the kernel moves the last
socket into its place (``reuseport_detach_sock``). ``ReuseportSlots`` follows
those two rules, so a restarted worker is found wherever it now sits.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

SO_ATTACH_REUSEPORT_CBPF = 51  # include/uapi/asm-generic/socket.h
CID_WORKER_OFFSET = 12  # UDP payload offset of CID byte 1 (see the module docstring)
TLS12_CID = 25  # RFC 9146 section 10.2: content type tls12_cid
DTLS_1_2 = 0xFEFD
FALLBACK = 0xFFFFFFFF  # any index >= the socket count: the 4-tuple hash decides

# Classic BPF opcodes (include/uapi/linux/filter.h).
BPF_LD_W_LEN = 0x00 | 0x00 | 0x80
BPF_LD_H_ABS = 0x00 | 0x08 | 0x20
BPF_LD_B_ABS = 0x00 | 0x10 | 0x20
BPF_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JGE_K = 0x05 | 0x30 | 0x00
BPF_RET_K = 0x06 | 0x00

MAX_WORKERS = 100  # the header checks jump over 2 instructions per worker: an 8-bit offset
Instruction = tuple[int, int, int, int]


def program(slots: Sequence[int]) -> list[Instruction]:
    """The steering program; ``slots[w]`` is the group index of worker ``w``'s socket (-1: none now)."""
    if len(slots) > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS} workers can be steered, got {len(slots)}")
    table: list[Instruction] = []
    for worker, slot in enumerate(slots):
        table.append((BPF_JEQ_K, 0, 1, worker))
        table.append((BPF_RET_K, 0, 0, FALLBACK if slot < 0 else slot))
    # Distance from the instruction after each check to the final FALLBACK return.
    header_checks = 6

    def to_fallback(index: int) -> int:
        return header_checks + 1 + len(table) - (index + 1)

    return [
        (BPF_LD_W_LEN, 0, 0, 0),
        (BPF_JGE_K, 0, to_fallback(1), CID_WORKER_OFFSET + 1),
        (BPF_LD_B_ABS, 0, 0, 0),
        (BPF_JEQ_K, 0, to_fallback(3), TLS12_CID),
        (BPF_LD_H_ABS, 0, 0, 1),
        (BPF_JEQ_K, 0, to_fallback(5), DTLS_1_2),
        (BPF_LD_B_ABS, 0, 0, CID_WORKER_OFFSET),
        *table,
        (BPF_RET_K, 0, 0, FALLBACK),
    ]


def encode(instructions: Sequence[Instruction]) -> bytes:
    """The ``struct sock_filter`` array, native byte order as the kernel reads it."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)


def attach(sock: socket.socket, instructions: Sequence[Instruction]) -> None:
    """Attach the program to the reuseport group of ``sock`` (it replaces the group's previous one)."""
    code = encode(instructions)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(instructions), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def run(instructions: Sequence[Instruction], payload: bytes) -> int:
    """What the kernel computes for ``payload``: an interpreter of the opcodes ``program`` emits.

    A load beyond the payload returns 0, as a classic BPF program does.
    """
    accumulator = 0
    pc = 0
    while True:
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == BPF_LD_W_LEN:
            accumulator = len(payload)
        elif code in (BPF_LD_B_ABS, BPF_LD_H_ABS):
            width = 1 if code == BPF_LD_B_ABS else 2
            if k + width > len(payload):
                return 0
            accumulator = int.from_bytes(payload[k:k + width], "big")
        elif code in (BPF_JEQ_K, BPF_JGE_K):
            taken = accumulator == k if code == BPF_JEQ_K else accumulator >= k
            pc += jt if taken else jf
        elif code == BPF_RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} is not one this module emits")


class ReuseportSlots:
    """Which worker's socket sits at each index of a reuseport group, as the kernel orders them.

    ``bound(w)``: worker ``w`` bound its socket (appended). ``closed(w)``: its
    socket closed (the last one moves into its place).
    """

    def __init__(self) -> None:
        self.order: list[int] = []

    def bound(self, worker: int) -> None:
        if worker not in self.order:
            self.order.append(worker)

    def closed(self, worker: int) -> None:
        if worker not in self.order:
            return
        index = self.order.index(worker)
        last = self.order.pop()
        if index < len(self.order):
            self.order[index] = last

    def slots(self, workers: int) -> list[int]:
        """``slots[w]``: the index of worker ``w``'s socket, -1 while it has none."""
        return [self.order.index(worker) if worker in self.order else -1 for worker in range(workers)]
