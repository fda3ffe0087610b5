"""A key-value store whose entries expire by time bucket, swept wholesale.

Deduplication must remember every (peer, message id) for EXCHANGE_LIFETIME
(RFC 7252 section 4.5) without a per-message scan and without memory that
grows with the number of clients that ever came. Entries go into the newest
of ``buckets`` dictionaries; every ``lifetime / (buckets - 1)`` seconds a new
dictionary starts and the oldest one is dropped as a whole. An entry thus
lives at least ``lifetime`` and at most ``lifetime * buckets / (buckets - 1)``.
A hard cap on the entry count drops the oldest bucket early (counted), so a
flood cannot exhaust memory either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

Value = TypeVar("Value")
_ABSENT = object()  # a stored value is never this


class ExpiringStore(Generic[Value]):
    """Entries kept for at least ``lifetime`` seconds, forgotten bucket by bucket."""

    __slots__ = ("lifetime", "max_entries", "evicted", "_width", "_capacity", "_buckets", "_closes_at", "_count")

    def __init__(self, lifetime: float, now: float, buckets: int = 4, max_entries: int = 1 << 21) -> None:
        if buckets < 2:
            raise ValueError("an expiring store needs at least two buckets")
        if lifetime <= 0:
            raise ValueError("lifetime must be positive")
        self.lifetime = lifetime
        self.max_entries = max_entries
        #: Entries dropped before their lifetime because of ``max_entries``.
        self.evicted = 0
        self._width = lifetime / (buckets - 1)
        self._capacity = buckets
        self._buckets: deque[dict[Hashable, Value]] = deque([{}])
        self._closes_at = now + self._width
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def next_sweep(self) -> float:
        """When the newest bucket closes and the oldest may be dropped."""
        return self._closes_at

    def get(self, key: Hashable) -> tuple[dict[Hashable, Value], Value] | None:
        """The bucket holding ``key`` and its value, newest bucket first; None if absent.

        Returning the bucket lets the caller update the value in place later
        (a response cached against a request) without a second search.
        """
        for bucket in reversed(self._buckets):
            if key in bucket:
                return bucket, bucket[key]
        return None

    def get_or_put(
        self, key: Hashable, value: Value, now: float
    ) -> tuple[dict[Hashable, Value], None] | tuple[None, Value]:
        """One call for the deduplication decision.

        When ``key`` is new it is stored with ``value``: returns (its bucket,
        None). When it is known: returns (None, the stored value).
        """
        buckets = self._buckets
        for bucket in reversed(buckets):
            found = bucket.get(key, _ABSENT)
            if found is not _ABSENT:
                return None, found  # type: ignore[return-value]
        # What put() does, knowing the key is in no bucket (the common case: a new message).
        if now >= self._closes_at or self._count >= self.max_entries:
            return self.put(key, value, now), None
        bucket = buckets[-1]
        bucket[key] = value
        self._count += 1
        return bucket, None

    def put(self, key: Hashable, value: Value, now: float) -> dict[Hashable, Value]:
        """Store ``key`` in the newest bucket; returns that bucket."""
        if now >= self._closes_at:
            self.sweep(now)
        if self._count >= self.max_entries:
            self._drop_oldest(evicting=True)
        bucket = self._buckets[-1]
        if key not in bucket:
            self._count += 1
        bucket[key] = value
        return bucket

    def pop(self, key: Hashable) -> Value | None:
        """Remove ``key`` wherever it is; its value or None."""
        for bucket in self._buckets:
            if key in bucket:
                self._count -= 1
                return bucket.pop(key)
        return None

    def sweep(self, now: float) -> None:
        """Open new buckets up to ``now`` and drop those past the lifetime."""
        if now - self._closes_at >= self._width * self._capacity:
            # Idle longer than any entry lives: start afresh in one step.
            self._buckets = deque([{}])
            self._count = 0
            self._closes_at = now + self._width
            return
        while now >= self._closes_at:
            self._buckets.append({})
            self._closes_at += self._width
            if len(self._buckets) > self._capacity:
                self._drop_oldest(evicting=False)

    def _drop_oldest(self, evicting: bool) -> None:
        if len(self._buckets) == 1:
            self._buckets.append({})
        dropped = len(self._buckets.popleft())
        self._count -= dropped
        if evicting:
            self.evicted += dropped
