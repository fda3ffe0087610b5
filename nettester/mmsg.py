"""Batched datagram I/O on Linux: ``recvmmsg(2)`` and ``sendmmsg(2)`` through ``ctypes``.

A server under load reads and answers many datagrams per wake-up. Python's
``recvfrom`` and ``sendto`` pay, per datagram, a system call, a release and
re-acquisition of the GIL, a receive buffer of the maximum size shrunk to
the datagram, the source address formatted as text, and on the way out that
text parsed back. ``recvmmsg`` reads up to :data:`BATCH` datagrams in one
call into buffers allocated once, ``sendmmsg`` sends the answers in one
call, and a source address is formatted once per peer (a bounded cache in
each direction), not once per datagram.

This is what no well-kept Python package offers (the one binding on PyPI,
pysockmmsg 0.0.2 of 2021, is a C extension that needs a compiler and takes
its messages as a dict per destination). ``ctypes`` is in the standard
library and calls the C library directly, so nothing is compiled and a
machine without a compiler installs the same package. Where the C library
lacks either call (not Linux, an old libc), :func:`available` says no and
the caller keeps the plain ``recvfrom``/``sendto`` loop.

The structures are the C library's (``<sys/socket.h>``, ``<bits/uio.h>``)::

    struct iovec   { void *iov_base; size_t iov_len; };
    struct msghdr  { void *msg_name; socklen_t msg_namelen; struct iovec *msg_iov;
                     size_t msg_iovlen; void *msg_control; size_t msg_controllen; int msg_flags; };
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };

declared with ``ctypes.Structure`` (so the offsets and padding are the
platform's), and read and written on the hot path through ``memoryview``
casts of those arrays, a few tens of nanoseconds per field.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

Address = tuple[str, int]

BATCH = 64  # datagrams per recvmmsg or sendmmsg call (as DrainingPort reads at most 64 per wake-up)
SEND_SLOT = 2048  # the largest answer that is batched; a larger one is sent on its own, in order
ADDRESS_CACHE_LIMIT = 16384  # peers remembered in each direction; past it, the caches start again
MSG_DONTWAIT = 0x40  # <bits/socket.h>
DISABLE_ENV = "NETTESTER_MMSG"  # "off": keep the plain recvfrom/sendto loop

NAME_SLOT = 32  # >= sizeof(struct sockaddr_in6) == 28, rounded for alignment


class _IoVector(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _MessageHeader(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _MultiMessageHeader(ctypes.Structure):
    _fields_ = (("msg_hdr", _MessageHeader), ("msg_len", ctypes.c_uint))


def _bind() -> tuple[Any, Any] | None:
    """The C library's ``recvmmsg`` and ``sendmmsg``, typed; None where either is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        receive, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    receive.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    receive.restype = ctypes.c_int
    send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
    send.restype = ctypes.c_int
    return receive, send


_CALLS = _bind()


def available(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether batched I/O can be used here: the C library has both calls and ``NETTESTER_MMSG`` is not ``off``."""
    return _CALLS is not None and environ.get(DISABLE_ENV, "").strip().lower() != "off"


def _words(array: Any, code: Any) -> memoryview:
    """``array``'s memory as unsigned words of the ``struct`` format ``code`` ("I", "Q")."""
    return memoryview(array).cast("B").cast(code)


class DatagramBatch:
    """The buffers of one socket's batched reads and writes, allocated once.

    :param family: the socket's address family (``AF_INET`` or ``AF_INET6``).
    :param size: the largest datagram read; a longer one is truncated, as ``recvfrom(size)`` does.
    """

    def __init__(self, family: int, size: int) -> None:
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not in this C library")
        self._receive, self._send = _CALLS
        self.family = family
        self.size = size
        # sizeof(struct sockaddr_in6 / sockaddr_in). Its bytes after the family tell one peer from another:
        # port and address (IPv4), or port, flow label, address and scope (IPv6, RFC 3493 section 3.3).
        self.name_length = 28 if family == socket.AF_INET6 else 16
        header_size = ctypes.sizeof(_MultiMessageHeader)
        word = ctypes.sizeof(ctypes.c_uint)
        length_offset = _MultiMessageHeader.msg_len.offset
        pointer_offset = _MessageHeader.msg_name.offset
        if header_size % 8 or length_offset % word or pointer_offset % 8 or ctypes.sizeof(ctypes.c_void_p) != 8:
            raise OSError(errno.ENOSYS, "batched I/O here assumes a 64-bit C library")
        self.header_words = header_size // word  # uint32 words per mmsghdr
        self.length_word = length_offset // word  # msg_len, in uint32 words from a header's start
        self.header_pointers = header_size // 8  # pointer-sized words per mmsghdr

        # Receive side: BATCH headers, each with its own address slot and one iovec onto its data slot.
        # Slicing a ``c_char`` array gives bytes (typeshed says a list), the cheapest copy out of it.
        self.names: Any = ctypes.create_string_buffer(BATCH * NAME_SLOT)
        # Anonymous memory is zero-filled lazily: a slot's pages are touched only as far as datagrams
        # reach, so a 64 KiB read size (STUN) costs its pages only when such datagrams come.
        self._data_memory = mmap.mmap(-1, BATCH * size)
        self.data: Any = (ctypes.c_char * (BATCH * size)).from_buffer(self._data_memory)
        self._in_vectors = (_IoVector * BATCH)()
        self._in_headers = (_MultiMessageHeader * BATCH)()
        # Send side: BATCH headers whose msg_name points at a cached peer address, each with one
        # iovec onto its slot of the output buffer.
        self._out = ctypes.create_string_buffer(BATCH * SEND_SLOT)
        self._out_vectors = (_IoVector * BATCH)()
        self._out_headers = (_MultiMessageHeader * BATCH)()
        names, data, out = ctypes.addressof(self.names), ctypes.addressof(self.data), ctypes.addressof(self._out)
        for index in range(BATCH):
            self._in_vectors[index].iov_base = data + index * size
            self._in_vectors[index].iov_len = size
            header = self._in_headers[index].msg_hdr
            header.msg_name = names + index * NAME_SLOT
            header.msg_namelen = self.name_length
            header.msg_iov = ctypes.addressof(self._in_vectors[index])
            header.msg_iovlen = 1
            self._out_vectors[index].iov_base = out + index * SEND_SLOT
            header = self._out_headers[index].msg_hdr
            header.msg_namelen = self.name_length
            header.msg_iov = ctypes.addressof(self._out_vectors[index])
            header.msg_iovlen = 1
        self.lengths = _words(self._in_headers, "I")  # msg_len of header i at i * header_words + length_word
        self._out_pointers = _words(self._out_headers, "Q")  # msg_name of header i at i * header_pointers
        self._out_lengths = _words(self._out_vectors, "Q")  # iov_len of vector i at 2 * i + 1
        self._out_view = memoryview(self._out).cast("B")
        self._in_address = ctypes.addressof(self._in_headers)
        self._out_address = ctypes.addressof(self._out_headers)

        #: Peers heard from: raw address bytes -> address tuple, and back to a C ``sockaddr`` kept alive here.
        self.sources: dict[bytes, Address] = {}
        self._sockaddrs: dict[Address, tuple[ctypes.Array[ctypes.c_char], int]] = {}
        #: The answers queued for the next :meth:`flush`, and each one's destination and failure handler.
        self.queued = 0
        self._queued_to: list[Address] = []
        self._queued_failed: list[Callable[[OSError, Address], None]] = []

    def receive(self, fileno: int) -> int:
        """Read up to :data:`BATCH` queued datagrams; how many (0: none queued).

        :raises OSError: a receive error other than "nothing queued" (e.g. an ICMP error, ``ECONNREFUSED``).
        """
        while True:
            count: int = self._receive(fileno, self._in_address, BATCH, MSG_DONTWAIT, None)
            if count >= 0:
                return count
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            if code != errno.EINTR:
                raise OSError(code, os.strerror(code))

    def source(self, index: int) -> Address:
        """The sender of datagram ``index`` of the last :meth:`receive`, as ``recvfrom`` gives it (host, port)."""
        offset = index * NAME_SLOT
        key = self.names[offset + 2:offset + self.name_length]
        address = self.sources.get(key)
        if address is None:
            address = self._remember(key, self.names[offset:offset + self.name_length])
        return address

    def _remember(self, key: bytes, sockaddr: bytes) -> Address:
        if len(self.sources) >= ADDRESS_CACHE_LIMIT:
            self.sources.clear()
        port = int.from_bytes(key[:2], "big")
        if self.family == socket.AF_INET6:
            host = socket.inet_ntop(socket.AF_INET6, key[6:22])
            scope = int.from_bytes(key[22:26], sys.byteorder)
            if scope:  # a link-local peer: its scope as recvfrom names it ("fe80::1%eth0")
                host = socket.getnameinfo((host, port, 0, scope), socket.NI_NUMERICHOST)[0]
        else:
            host = socket.inet_ntop(socket.AF_INET, key[2:6])
        address = (host, port)
        self.sources[key] = address
        self._keep_sockaddr(address, sockaddr)
        return address

    def _keep_sockaddr(self, address: Address, sockaddr: bytes) -> int:
        if len(self._sockaddrs) >= ADDRESS_CACHE_LIMIT and not self.queued:
            self._sockaddrs.clear()
        buffer = ctypes.create_string_buffer(sockaddr, NAME_SLOT)
        pointer = ctypes.addressof(buffer)
        self._sockaddrs[address] = (buffer, pointer)
        return pointer

    def _sockaddr_of(self, address: Address) -> int | None:
        """The C address of ``address``'s ``sockaddr``, made once per peer; None when ``address`` is no
        numeric address of this family (a host name: ``sendto`` resolves it, or says why not)."""
        known = self._sockaddrs.get(address)
        if known is not None:
            return known[1]
        host, port = address[0], address[1]
        try:
            packed = socket.inet_pton(self.family, host.partition("%")[0])
            resolved: Any = socket.getaddrinfo(host, port, self.family, socket.SOCK_DGRAM, 0,
                                               socket.AI_NUMERICHOST) if "%" in host else None
        except (OSError, TypeError, ValueError, OverflowError):
            return None
        # sa_family and sin6_scope_id are in host byte order, the port in network byte order.
        family = self.family.to_bytes(2, sys.byteorder)
        if self.family == socket.AF_INET6:
            scope = resolved[0][4][3] if resolved else 0
            sockaddr = family + port.to_bytes(2, "big") + bytes(4) + packed + scope.to_bytes(4, sys.byteorder)
        else:
            sockaddr = family + port.to_bytes(2, "big") + packed + bytes(8)
        return self._keep_sockaddr((host, port), sockaddr)

    def queue(self, data: bytes, address: Address, failed: Callable[[OSError, Address], None]) -> bool:
        """Queue ``data`` for ``address`` until :meth:`flush`; False when it must go on its own
        (longer than :data:`SEND_SLOT`, the batch full, or ``address`` no numeric address of this
        socket's family: flush, then ``sendto`` it, which resolves a name or raises as it always did).
        """
        index = self.queued
        length = len(data)
        if index >= BATCH or length > SEND_SLOT:
            return False
        pointer = self._sockaddr_of(address)
        if pointer is None:
            return False
        self._out_pointers[index * self.header_pointers] = pointer
        start = index * SEND_SLOT
        self._out_view[start:start + length] = data
        self._out_lengths[2 * index + 1] = length
        self._queued_to.append(address)
        self._queued_failed.append(failed)
        self.queued = index + 1
        return True

    def flush(self, fileno: int) -> None:
        """Send what is queued, in order; each datagram the kernel refuses goes to its failure handler."""
        total = self.queued
        if not total:
            return
        sent = 0
        while sent < total:
            count: int = self._send(fileno, self._out_address + sent * ctypes.sizeof(_MultiMessageHeader),
                                    total - sent, 0)
            if count > 0:
                sent += count
                continue
            code = ctypes.get_errno() if count < 0 else errno.EIO
            if code == errno.EINTR:
                continue
            # The datagram at ``sent`` was refused (EAGAIN on a full send buffer, ENETUNREACH...): report it
            # as sendto would have raised it, and go on with the next one.
            self._queued_failed[sent](OSError(code, os.strerror(code)), self._queued_to[sent])
            sent += 1
        self.queued = 0
        self._queued_to.clear()
        self._queued_failed.clear()
