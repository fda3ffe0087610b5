"""ExpiringStore: lifetime guarantees, wholesale sweep, hard cap."""

from __future__ import annotations

import pytest

from nettester.protocols.coap.store import ExpiringStore


def test_entries_live_at_least_lifetime_and_at_most_four_thirds() -> None:
    store: ExpiringStore[int] = ExpiringStore(lifetime=30.0, now=0.0, buckets=4)
    store.put("a", 1, 0.0)
    store.put("b", 2, 9.9)
    store.sweep(39.9)
    assert store.get("a") is not None and store.get("b") is not None
    store.sweep(40.0)  # a's bucket closed at 10, dropped one lifetime later
    assert store.get("a") is None and store.get("b") is None
    assert len(store) == 0


def test_get_returns_the_bucket_for_in_place_update() -> None:
    store: ExpiringStore[bytes | None] = ExpiringStore(lifetime=30.0, now=0.0)
    bucket = store.put("k", None, 1.0)
    bucket["k"] = b"answer"
    found = store.get("k")
    assert found is not None and found[1] == b"answer"
    assert store.pop("k") == b"answer" and store.pop("k") is None


def test_hard_cap_drops_oldest_bucket_and_counts() -> None:
    store: ExpiringStore[int] = ExpiringStore(lifetime=30.0, now=0.0, max_entries=10)
    for index in range(10):
        store.put(index, index, 0.0)
    store.put("late", 0, 11.0)  # a second bucket exists now; still at the cap
    assert store.evicted == 10 and len(store) == 1
    assert store.get(3) is None and store.get("late") is not None


def test_long_idle_resets_in_one_step() -> None:
    store: ExpiringStore[int] = ExpiringStore(lifetime=30.0, now=0.0)
    store.put("a", 1, 0.0)
    store.sweep(1e9)
    assert len(store) == 0 and store.next_sweep == pytest.approx(1e9 + 10.0)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ExpiringStore(lifetime=30.0, now=0.0, buckets=1)
    with pytest.raises(ValueError):
        ExpiringStore(lifetime=0.0, now=0.0)


def test_get_or_put_decides_in_one_call() -> None:
    store: ExpiringStore[bytes | None] = ExpiringStore(lifetime=30.0, now=0.0)
    bucket, previous = store.get_or_put("k", None, 0.0)
    assert bucket is not None and previous is None
    bucket["k"] = b"cached"
    assert store.get_or_put("k", None, 5.0) == (None, b"cached")
    assert len(store) == 1
