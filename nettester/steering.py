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
program with return value 0 (socket 0), so every program here checks the
length before it loads, and no datagram, however short or hostile, is
read out of bounds.

The record layout (RFC 9146 section 4, the ``tls12_cid`` record, content
type 25)::

    offset  0      content type (25)
    offset  1..2   version {254, 253} (DTLS 1.2)
    offset  3..4   epoch
    offset  5..10  sequence number (48 bits)
    offset 11..    cid (the length the server chose), then length(2), payload

Our CIDs put the cluster node id in CID byte 0 (offset 11) and the worker
index in CID byte 1: **offset 12**. The worker byte is taken modulo N: a
node's own CIDs name one of its N workers, and a CID a cluster node took
over from a lost node with more workers (``nettester.cluster.replication``)
goes to worker ``byte mod N``, the one that holds its replica (the
management program below puts it there by the same rule).

The DTLS port's program (``program(slots)``), one 8-byte ``sock_filter``
each (code u16, jt u8, jf u8, k u32). Every datagram whose first record is
not a DTLS 1.2 ``tls12_cid`` record (ClientHellos, plain CoAP, STUN) is left
to the hash::

    0  ld  len                 0x0080 A = payload length
    1  jge #13       jf FALL   0x0035 too short to hold CID byte 1: hash
    2  ldb [0]                 0x0030 A = content type
    3  jeq #25       jf FALL   0x0015 not tls12_cid: hash
    4  ldh [1]                 0x0028 A = version
    5  jeq #0xfefd   jf FALL   0x0015 not DTLS 1.2: hash
    6  ldb [12]                0x0030 A = CID byte 1, the worker byte
    7  mod #N                  0x0094 A = the worker (BPF_MOD: Linux 3.7 and later)
    8  jeq #0  jf +1           0x0015 one pair per worker w:
    9  ret #slot_of(0)         0x0006   its socket's index in the group
       ...                              (FALLBACK while it has none)
    FALL ret #0xffffffff       0x0006 out of range: the kernel hashes

A cluster node's management port (``management_program(slots, mac_length)``)
is shared by the workers too. Its datagrams are the management records of
``nettester.cluster.wire`` (Californium's layout)::

    IN (63) / OUT (62): type(1) port(2) address-length(1: 4|16) address [MAC(8)] DTLS record(s)
    PING (61) / PONG (60): type(1) node-id(4) state(1) [timestamp(8) MAC(8)]
    STATE (59): type(1) cid-length(1) cid nonce(12) ciphertext tag(16)

An IN record carries, unchanged, the record another node received for one of
our CIDs, so the CID's byte 1 sits at offset ``4 + address-length + MAC
length`` (the record's start, 8 with a group secret, else 0) ``+ 12``: a
variable offset, read with an indirect load (``ldb [x + k]``) after ``tax``
copied the record's start into X. A STATE record (a session replica) names
its CID in the clear (it is in every record of the session anyway), byte 1
at offset 3. PING and PONG go to worker 0, which runs the node table for the
whole node (``nettester.cluster.node``); OUT records (our answers to send
from the public socket, which any worker can) and everything else follow the
hash::

    0  ld  len                 0x0080 A = payload length
    1  jge #4        jf FALL   0x0035 shorter than any header read below: hash
    2  ldb [0]                 0x0030 A = type
    3  jeq #63       jt IN     0x0015
    4  jeq #59       jt STATE  0x0015
    5  jeq #61       jt PEERS  0x0015
    6  jeq #60       jf FALL   0x0015 OUT and anything else: hash
    PEERS ret #slot_of(0)      0x0006 PING/PONG: the discovery worker
    STATE ldb [1]              0x0030 A = CID length
       jge #2        jf FALL   0x0035 a CID without a byte 1: hash
       ldb [3]                 0x0030 A = CID byte 1
       ja  TABLE               0x0005
    IN ldb [3]                 0x0030 A = address length
       add #4+mac              0x0004 A = where the forwarded record starts
       tax                     0x0007 X = A
       ld  len                 0x0080
       jge x         jf FALL   0x003d the record starts inside the datagram
       sub x                   0x001c A = the record's length (no wrap: len >= X)
       jge #13       jf FALL   0x0035 too short to hold CID byte 1: hash
       ldb [x+0]               0x0050 the record's content type
       jeq #25       jf FALL   0x0015 not tls12_cid: hash
       ldh [x+1]               0x0048
       jeq #0xfefd   jf FALL   0x0015 not DTLS 1.2: hash
       ldb [x+12]              0x0050 A = CID byte 1
    TABLE mod #N, then the pairs and FALL as in the DTLS port's program

The slot of a worker is its socket's index in the group's array: sockets
join at the end in bind order, and when one closes the kernel moves the last
socket into its place (``reuseport_detach_sock``). ``ReuseportSlots`` follows
those two rules, so a restarted worker is found wherever it now sits. Every
group of a worker process has the same order (the workers open their ports
one after the other), so one slot list serves them all.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Callable, Sequence

SO_ATTACH_REUSEPORT_CBPF = 51  # include/uapi/asm-generic/socket.h
CID_WORKER_OFFSET = 12  # UDP payload offset of CID byte 1 (see the module docstring)
TLS12_CID = 25  # RFC 9146 section 10.2: content type tls12_cid
DTLS_1_2 = 0xFEFD
FALLBACK = 0xFFFFFFFF  # any index >= the socket count: the 4-tuple hash decides
DISCOVERY_WORKER = 0  # the worker whose socket takes PING and PONG

# Management record types and layout (nettester.cluster.wire, Californium's).
MANAGEMENT_IN = 63
MANAGEMENT_PING = 61
MANAGEMENT_PONG = 60
MANAGEMENT_STATE = 59
RECORDS_HEADER = 4  # type(1) port(2) address-length(1); the address follows
ADDRESS_LENGTH_OFFSET = 3
STATE_CID_WORKER_OFFSET = 3  # type(1) cid-length(1) cid byte 0, cid byte 1

# Classic BPF opcodes (include/uapi/linux/filter.h).
BPF_LD_W_LEN = 0x00 | 0x00 | 0x80
BPF_LD_H_ABS = 0x00 | 0x08 | 0x20
BPF_LD_B_ABS = 0x00 | 0x10 | 0x20
BPF_LD_H_IND = 0x00 | 0x08 | 0x40
BPF_LD_B_IND = 0x00 | 0x10 | 0x40
BPF_ADD_K = 0x04 | 0x00 | 0x00
BPF_SUB_X = 0x04 | 0x10 | 0x08
BPF_MOD_K = 0x04 | 0x90 | 0x00
BPF_JA = 0x05 | 0x00
BPF_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JGE_K = 0x05 | 0x30 | 0x00
BPF_JGE_X = 0x05 | 0x30 | 0x08
BPF_RET_K = 0x06 | 0x00
BPF_TAX = 0x07 | 0x00

MAX_WORKERS = 100  # the header checks jump over 2 instructions per worker: an 8-bit offset
U32 = 0xFFFFFFFF
Instruction = tuple[int, int, int, int]
ProgramFactory = Callable[[Sequence[int]], list[Instruction]]
"""``factory(slots)``: the program steering a group whose worker ``w`` sits at ``slots[w]``."""

# Source form for ``assemble``: (code, jt, jf, k), where a jump target may be a label
# name; a bare string is a label.
Source = tuple[int, int | str, int | str, int | str]
FALL = "FALL"
TABLE = "TABLE"


def assemble(source: Sequence[Source | str]) -> list[Instruction]:
    """Instructions with their jump labels resolved (a conditional jump reaches 255 instructions ahead)."""
    labels: dict[str, int] = {}
    code: list[Source] = []
    for item in source:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)

    def offset(target: int | str, index: int, limit: int) -> int:
        if isinstance(target, int):
            return target
        distance = labels[target] - (index + 1)
        if not 0 <= distance <= limit:
            raise ValueError(f"jump to {target} out of reach ({distance} instructions)")
        return distance

    return [(op, offset(jt, index, 255), offset(jf, index, 255),
             offset(k, index, U32) if op == BPF_JA else int(k))
            for index, (op, jt, jf, k) in enumerate(code)]


def _cid_record(load_byte: int, load_half: int) -> list[Source | str]:
    """A DTLS 1.2 tls12_cid record at the load base (0, or X for indirect loads): A = its CID byte 1."""
    return [
        (load_byte, 0, 0, 0),
        (BPF_JEQ_K, 0, FALL, TLS12_CID),
        (load_half, 0, 0, 1),
        (BPF_JEQ_K, 0, FALL, DTLS_1_2),
        (load_byte, 0, 0, CID_WORKER_OFFSET),
    ]


def _worker_table(slots: Sequence[int]) -> list[Source | str]:
    """A = a worker byte: return the slot of worker ``A mod N``; then the FALL return."""
    table: list[Source | str] = [TABLE, (BPF_MOD_K, 0, 0, len(slots))]
    for worker, slot in enumerate(slots):
        table.append((BPF_JEQ_K, 0, 1, worker))
        table.append((BPF_RET_K, 0, 0, _slot(slot)))
    return [*table, FALL, (BPF_RET_K, 0, 0, FALLBACK)]


def _slot(slot: int) -> int:
    return FALLBACK if slot < 0 else slot


def _check_workers(slots: Sequence[int]) -> None:
    if len(slots) > MAX_WORKERS:
        raise ValueError(f"at most {MAX_WORKERS} workers can be steered, got {len(slots)}")


def program(slots: Sequence[int]) -> list[Instruction]:
    """The DTLS port's program; ``slots[w]`` is the group index of worker ``w``'s socket (-1: none now)."""
    _check_workers(slots)
    if not slots:
        return [(BPF_RET_K, 0, 0, FALLBACK)]
    return assemble([
        (BPF_LD_W_LEN, 0, 0, 0),
        (BPF_JGE_K, 0, FALL, CID_WORKER_OFFSET + 1),
        *_cid_record(BPF_LD_B_ABS, BPF_LD_H_ABS),
        *_worker_table(slots),
    ])


def management_program(slots: Sequence[int], mac_length: int = 0) -> list[Instruction]:
    """A cluster node's management port's program (module docstring); ``mac_length``: 8 with a group secret."""
    _check_workers(slots)
    if not slots:
        return [(BPF_RET_K, 0, 0, FALLBACK)]
    return assemble([
        (BPF_LD_W_LEN, 0, 0, 0),
        (BPF_JGE_K, 0, FALL, RECORDS_HEADER),
        (BPF_LD_B_ABS, 0, 0, 0),
        (BPF_JEQ_K, "IN", 0, MANAGEMENT_IN),
        (BPF_JEQ_K, "STATE", 0, MANAGEMENT_STATE),
        (BPF_JEQ_K, "PEERS", 0, MANAGEMENT_PING),
        (BPF_JEQ_K, 0, FALL, MANAGEMENT_PONG),
        "PEERS",
        (BPF_RET_K, 0, 0, _slot(slots[DISCOVERY_WORKER])),
        "STATE",
        (BPF_LD_B_ABS, 0, 0, 1),
        (BPF_JGE_K, 0, FALL, 2),
        (BPF_LD_B_ABS, 0, 0, STATE_CID_WORKER_OFFSET),
        (BPF_JA, 0, 0, TABLE),
        "IN",
        (BPF_LD_B_ABS, 0, 0, ADDRESS_LENGTH_OFFSET),
        (BPF_ADD_K, 0, 0, RECORDS_HEADER + mac_length),
        (BPF_TAX, 0, 0, 0),
        (BPF_LD_W_LEN, 0, 0, 0),
        (BPF_JGE_X, 0, FALL, 0),
        (BPF_SUB_X, 0, 0, 0),
        (BPF_JGE_K, 0, FALL, CID_WORKER_OFFSET + 1),
        *_cid_record(BPF_LD_B_IND, BPF_LD_H_IND),
        *_worker_table(slots),
    ])


def encode(instructions: Sequence[Instruction]) -> bytes:
    """The ``struct sock_filter`` array, native byte order as the kernel reads it."""
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)


def attach(sock: socket.socket, instructions: Sequence[Instruction]) -> None:
    """Attach the program to the reuseport group of ``sock`` (it replaces the group's previous one)."""
    code = encode(instructions)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(instructions), ctypes.addressof(buffer))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


_LOADS = {BPF_LD_B_ABS: (1, False), BPF_LD_H_ABS: (2, False), BPF_LD_B_IND: (1, True), BPF_LD_H_IND: (2, True)}


def run(instructions: Sequence[Instruction], payload: bytes) -> int:
    """What the kernel computes for ``payload``: an interpreter of the opcodes this module emits.

    A load beyond the payload returns 0, as a classic BPF program does; A
    and X are 32-bit and start at 0.
    """
    accumulator = index = pc = 0
    while True:
        code, jt, jf, k = instructions[pc]
        pc += 1
        if code == BPF_LD_W_LEN:
            accumulator = len(payload)
        elif code in _LOADS:
            width, indirect = _LOADS[code]
            start = k + (index if indirect else 0)
            if start + width > len(payload):
                return 0
            accumulator = int.from_bytes(payload[start:start + width], "big")
        elif code == BPF_ADD_K:
            accumulator = (accumulator + k) & U32
        elif code == BPF_SUB_X:
            accumulator = (accumulator - index) & U32
        elif code == BPF_MOD_K:
            accumulator %= k
        elif code == BPF_TAX:
            index = accumulator
        elif code == BPF_JA:
            pc += k
        elif code in (BPF_JEQ_K, BPF_JGE_K, BPF_JGE_X):
            operand = index if code == BPF_JGE_X else k
            taken = accumulator == operand if code == BPF_JEQ_K else accumulator >= operand
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
