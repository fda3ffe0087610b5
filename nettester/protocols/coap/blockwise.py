"""Sans-IO block-wise transfer (RFC 7959): slicing, reassembly and their bounds.

The message layer (``layer.py``) decides when a transfer starts and sends
what these helpers build:

- server side, ``Block1Uploads`` reassembles request bodies sent with
  Block1 (RFC 7959 section 2.5). Its memory is bounded three ways: a body
  larger than ``max_body_size`` gets 4.13 with Size1 telling the limit
  (section 2.9.3), a peer keeps at most ``max_uploads_per_peer`` uploads, and
  all uploads together take at most ``max_uploads`` entries and
  ``max_bytes`` bytes (the least recently active upload goes first, counted;
  an upload that cannot fit even alone gets 5.03);
- ``block_of`` cuts one Block2 slice of a response body (section 2.4);
- client side, ``block1_request`` and ``block2_follow_up`` build the
  next request of a transfer (sections 2.4, 2.5 and 3.4).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from nettester.protocols.coap.message import (
    BlockValue,
    Code,
    Message,
    OptionNumber,
    encode_block,
    encode_uint,
    is_no_cache_key,
)

_NOT_CACHE_KEY = frozenset(
    (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE, OptionNumber.SIZE1, OptionNumber.SIZE2)
)
#: Options a follow-up block request does not copy from the original.
BLOCK_OPTIONS = frozenset((OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.SIZE1, OptionNumber.SIZE2))

CacheKey = tuple[int, tuple[tuple[int, bytes], ...]]


def cache_key(message: Message) -> CacheKey:
    """Method plus the cache-key options (RFC 7252 section 5.4.6), minus block and observe.

    Block-wise state is keyed by it (RFC 7959 section 2.4: follow-up block
    requests carry the same options).
    """
    return message.code, tuple(
        (number, value)
        for number, value in message.options
        if number not in _NOT_CACHE_KEY and not is_no_cache_key(number)
    )


@dataclass(frozen=True, slots=True)
class BlockRefusal:
    """Why a block was not taken: the response code, a diagnostic, and Size1 for 4.13."""

    code: int
    diagnostic: bytes = b""
    size1: int | None = None

    def response_options(self) -> list[tuple[int, bytes]]:
        """Size1 telling the limit on a 4.13 (RFC 7959 section 2.9.3)."""
        return [] if self.size1 is None else [(OptionNumber.SIZE1, encode_uint(self.size1))]


class _Upload:
    __slots__ = ("peer", "body", "touched")

    def __init__(self, peer: Hashable, now: float) -> None:
        self.peer = peer
        self.body = bytearray()
        self.touched = now


class Block1Uploads:
    """Server-side reassembly of block-wise request bodies, bounded per peer and in total."""

    def __init__(
        self,
        lifetime: float,
        max_body_size: int,
        max_uploads: int,
        max_uploads_per_peer: int,
        max_bytes: int,
    ) -> None:
        self.lifetime = lifetime
        self.max_body_size = max_body_size
        self.max_uploads = max_uploads
        self.max_uploads_per_peer = max_uploads_per_peer
        self.max_bytes = max_bytes
        #: Uploads dropped before they completed or expired, to respect a bound.
        self.evicted = 0
        #: Accept BERT blocks (SZX 7, RFC 8323 section 6): reliable transports only.
        self.bert = False
        # (peer, cache key) -> upload, least recently active first.
        self._uploads: OrderedDict[tuple[Hashable, CacheKey], _Upload] = OrderedDict()
        self._per_peer: dict[Hashable, int] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._uploads)

    @property
    def bytes_held(self) -> int:
        """Bytes of all unfinished uploads."""
        return self._bytes

    @property
    def next_sweep(self) -> float:
        """When the least recently active upload expires (inf: none)."""
        for upload in self._uploads.values():
            return upload.touched + self.lifetime
        return float("inf")

    def sweep(self, now: float) -> None:
        """Forget uploads idle for ``lifetime`` (EXCHANGE_LIFETIME)."""
        uploads = self._uploads
        while uploads:
            key, upload = next(iter(uploads.items()))
            if upload.touched + self.lifetime > now:
                return
            self._forget(key)

    def too_large(self, size1: int | None, payload_length: int = 0) -> BlockRefusal | None:
        """4.13 when a request announces (Size1) or carries more than ``max_body_size``."""
        if (size1 is not None and size1 > self.max_body_size) or payload_length > self.max_body_size:
            return BlockRefusal(Code.REQUEST_ENTITY_TOO_LARGE, size1=self.max_body_size)
        return None

    def receive(
        self, peer: Hashable, key: CacheKey, block1: BlockValue, payload: bytes, size1: int | None, now: float
    ) -> bytes | BlockRefusal | None:
        """Take one Block1 block: the whole body when it was the last, None when more must come."""
        bert = block1.szx == 7
        if bert and not self.bert:
            return BlockRefusal(Code.BAD_REQUEST, b"Block1 SZX 7 is reserved")
        # RFC 8323 section 6: a BERT block is any multiple of 1024 bytes, numbered in 1024-byte units.
        unit = 1024 if bert else block1.size
        refusal = self.too_large(size1)
        if refusal is not None:
            return refusal
        entry = (peer, key)
        if block1.num == 0:
            self._forget(entry)
            upload = self._start(entry, peer, now)
        else:
            found = self._uploads.get(entry)
            if found is None or len(found.body) != block1.num * unit:
                return BlockRefusal(Code.REQUEST_ENTITY_INCOMPLETE)
            upload = found
            self._uploads.move_to_end(entry)
            upload.touched = now
        if block1.more and (not payload or len(payload) % unit if bert else len(payload) != unit):
            self._forget(entry)
            return BlockRefusal(Code.BAD_REQUEST, b"Block1 with M set must be full size")
        if len(upload.body) + len(payload) > self.max_body_size:
            self._forget(entry)
            return BlockRefusal(Code.REQUEST_ENTITY_TOO_LARGE, size1=self.max_body_size)
        if not self._make_room(len(payload), entry):
            self._forget(entry)
            return BlockRefusal(Code.SERVICE_UNAVAILABLE, b"block-wise reassembly memory is full")
        upload.body += payload
        self._bytes += len(payload)
        if block1.more:
            return None
        body = bytes(upload.body)
        self._forget(entry)
        return body

    def _start(self, entry: tuple[Hashable, CacheKey], peer: Hashable, now: float) -> _Upload:
        if self._per_peer.get(peer, 0) >= self.max_uploads_per_peer:
            # The peer's least recently active upload goes.
            self._evict(next(key for key, upload in self._uploads.items() if upload.peer == peer))
        while len(self._uploads) >= self.max_uploads:
            self._evict(next(iter(self._uploads)))
        upload = self._uploads[entry] = _Upload(peer, now)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return upload

    def _make_room(self, length: int, keep: tuple[Hashable, CacheKey]) -> bool:
        """Evict the least recently active other uploads until ``length`` more bytes fit; False if they cannot."""
        while self._bytes + length > self.max_bytes:
            victim = next((key for key in self._uploads if key != keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, entry: tuple[Hashable, CacheKey]) -> None:
        self.evicted += 1
        self._forget(entry)

    def _forget(self, entry: tuple[Hashable, CacheKey]) -> None:
        upload = self._uploads.pop(entry, None)
        if upload is None:
            return
        self._bytes -= len(upload.body)
        remaining = self._per_peer[upload.peer] - 1
        if remaining:
            self._per_peer[upload.peer] = remaining
        else:
            del self._per_peer[upload.peer]


class Block2Assembly:
    """Client-side reassembly of one Block2 response body (RFC 7959 sections 2.4 and 3.4)."""

    __slots__ = ("body", "etag", "observe", "max_size")

    def __init__(self, first: Message, max_size: int) -> None:
        self.body = bytearray()
        self.etag = first.option(OptionNumber.ETAG)
        #: Only the first block of a notification carries its Observe (section 3.4).
        self.observe = first.observe
        self.max_size = max_size

    def add(self, message: Message, block2: BlockValue) -> str | None:
        """Append one block; why the transfer must fail, or None."""
        if block2.num != 0 and not self.body and block2.offset:
            return "Block2 transfer did not start at block 0"
        if message.option(OptionNumber.ETAG) != self.etag:
            # Section 2.4: the representation changed under the transfer.
            return "ETag changed during a Block2 transfer"
        if block2.offset != len(self.body):
            return "Block2 out of sequence"
        self.body += message.payload
        if len(self.body) > self.max_size:
            return "Block2 body larger than max_response_body_size"
        return None

    def complete(self, last: Message) -> None:
        """Turn the last block's message into the whole response."""
        last.payload = bytes(self.body)
        last.remove_option(OptionNumber.BLOCK2)
        if self.observe is not None:
            last.set_uint_option(OptionNumber.OBSERVE, self.observe)


def block_of(whole: Message, wanted: BlockValue, max_szx: int) -> Message:
    """One Block2 slice of ``whole`` (RFC 7959 section 2.4), Size2 on the first block.

    The block is at most ``max_szx`` large; a request for a bigger one gets
    the smaller size (section 2.4: the server may answer with a smaller block).
    """
    szx = min(wanted.szx, max_szx)
    size = 16 << szx
    offset = wanted.num * (16 << wanted.szx)
    body = whole.payload
    if offset and offset >= len(body):
        return Message(whole.mtype, Code.BAD_OPTION, whole.mid, whole.token, [],
                       b"Block2 beyond the end of the body")
    num = offset // size
    chunk = body[num * size: num * size + size]
    more = num * size + size < len(body)
    options = [(n, v) for n, v in whole.options if n != OptionNumber.BLOCK2 and n != OptionNumber.SIZE2]
    options.append((OptionNumber.BLOCK2, encode_block(num, more, szx)))
    if num == 0:
        options.append((OptionNumber.SIZE2, encode_uint(len(body))))
    else:
        # Notifications are only numbered on the first block (RFC 7959 section 3.4).
        options = [(n, v) for n, v in options if n != OptionNumber.OBSERVE]
    return Message(whole.mtype, whole.code, whole.mid, whole.token, options, chunk)


def block1_request(base: Message, body: bytes, offset: int, szx: int) -> Message:
    """The request carrying the Block1 slice of ``body`` at ``offset`` (RFC 7959 section 2.5)."""
    size = 16 << szx
    options = [(n, v) for n, v in base.options if n not in BLOCK_OPTIONS]
    more = offset + size < len(body)
    options.append((OptionNumber.BLOCK1, encode_block(offset // size, more, szx)))
    if offset == 0:
        options.append((OptionNumber.SIZE1, encode_uint(len(body))))
    return Message(base.mtype, base.code, 0, base.token, options, body[offset: offset + size])


def block2_follow_up(base: Message, received: BlockValue) -> Message:
    """The request for the block after ``received`` (RFC 7959 sections 2.4 and 3.4).

    Same method and options, no body, no Observe; the layer gives it a fresh token.
    """
    options = [(n, v) for n, v in base.options if n not in BLOCK_OPTIONS and n != OptionNumber.OBSERVE]
    options.append((OptionNumber.BLOCK2, encode_block(received.num + 1, False, received.szx)))
    return Message(base.mtype, base.code, 0, b"", options)
