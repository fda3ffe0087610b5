"""Connection IDs for a DTLS server (RFC 9146), node-prefixed for a cluster."""

from __future__ import annotations

import os
from typing import Callable, Container

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
        nodeId: int | None = 0,
        random: Callable[[int], bytes] = os.urandom,
        worker: int | None = None,
    ) -> None:
        if not 0 <= length <= 255:
            raise ValueError("CID length must be 0..255")
        if nodeId is not None and not 0 <= nodeId <= 255:
            raise ValueError("node id must be 0..255")
        if length == 1 and nodeId is not None:
            raise ValueError("a node-prefixed CID needs at least 2 bytes")
        if worker is not None and (nodeId is None or not 0 <= worker <= 255 or length < 3):
            raise ValueError("a worker-steered CID needs a node id, a worker 0..255 and at least 3 bytes")
        self.length = length
        self.nodeId = nodeId
        self.worker = worker
        self._random = random

    def newConnectionId(self, inUse: Container[bytes]) -> bytes:
        if self.length == 0:
            return b""
        prefix = b"" if self.nodeId is None else bytes((self.nodeId,))
        if self.worker is not None:
            prefix += bytes((self.worker,))
        for _attempt in range(1000):
            cid = prefix + self._random(self.length - len(prefix))
            if cid not in inUse:
                return cid
        raise RuntimeError("no free connection id: CID space exhausted")

    def nodeIdOf(self, cid: bytes) -> int | None:
        if self.nodeId is None or not cid:
            return None
        return cid[0]
