"""Connection IDs for a DTLS server (RFC 9146), node-prefixed for a cluster."""

from __future__ import annotations

import os
from collections.abc import Callable, Container

from zope.interface import implementer

from nettester.interfaces import IConnectionIdGenerator

DEFAULT_CID_LENGTH = 6


@implementer(IConnectionIdGenerator)
class NodeConnectionIdGenerator:
    """CIDs of ``length`` bytes whose first byte is the node id (0 outside a
    cluster), the rest random and unique among the live connections.

    ``worker`` (``--workers``): the second byte is this worker process's
    index, which the kernel steers the session's records by
    (``nettester.steering``)."""

    def __init__(
        self,
        length: int = DEFAULT_CID_LENGTH,
        node_id: int | None = 0,
        random: Callable[[int], bytes] = os.urandom,
        worker: int | None = None,
    ) -> None:
        if not 0 <= length <= 255:
            raise ValueError("CID length must be 0..255")
        if node_id is not None and not 0 <= node_id <= 255:
            raise ValueError("node id must be 0..255")
        if length == 1 and node_id is not None:
            raise ValueError("a node-prefixed CID needs at least 2 bytes")
        if worker is not None and (node_id is None or not 0 <= worker <= 255 or length < 3):
            raise ValueError("a worker-steered CID needs a node id, a worker 0..255 and at least 3 bytes")
        self.length = length
        self.node_id = node_id
        self.worker = worker
        self._random = random

    def new_connection_id(self, inUse: Container[bytes]) -> bytes:
        if self.length == 0:
            return b""
        prefix = b"" if self.node_id is None else bytes((self.node_id,))
        if self.worker is not None:
            prefix += bytes((self.worker,))
        for _attempt in range(1000):
            cid = prefix + self._random(self.length - len(prefix))
            if cid not in inUse:
                return cid
        raise RuntimeError("no free connection id: CID space exhausted")

    def node_id_of(self, cid: bytes) -> int | None:
        if self.node_id is None or not cid:
            return None
        return cid[0]
