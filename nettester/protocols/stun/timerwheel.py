"""A hashed timer wheel for many small-integer keys (clients), sans-IO.

One ``expire(now)`` per tick replaces thousands of independent delayed
calls: scheduling is an append, cancelling or moving a timer just overwrites
the key's deadline (older entries become stale and are skipped when their
slot comes round). Memory: 8 bytes per key plus one list slot per pending entry.
"""

from __future__ import annotations

import math
from array import array

_NONE = math.inf


class TimerWheel:
    """Deadlines for keys ``0 .. size-1``, fired with C{resolution} granularity."""

    def __init__(self, size: int, now: float, resolution: float = 0.01, slots: int = 1024) -> None:
        self._resolution = resolution
        self._slots: list[list[int]] = [[] for _ in range(slots)]
        self._deadlines = array("d", [_NONE]) * size
        self._tick = self._tick_of(now) - 1  # the last tick wholly swept: the one before now's

    def _tick_of(self, when: float) -> int:
        return int(when / self._resolution)

    def schedule(self, key: int, deadline: float) -> None:
        """Fire C{key} at C{deadline}, replacing any earlier schedule of it."""
        self._deadlines[key] = deadline
        # Never into a slot already swept: a past deadline fires at the next tick.
        tick = max(self._tick_of(deadline), self._tick + 1)
        self._slots[tick % len(self._slots)].append(key)

    def cancel(self, key: int) -> None:
        self._deadlines[key] = _NONE

    def deadline(self, key: int) -> float:
        """The key's pending deadline, or ``math.inf`` when none."""
        return self._deadlines[key]

    def expire(self, now: float) -> list[tuple[int, float]]:
        """Every (key, deadline) whose tick has completely passed at C{now}; never early.

        Each fires once and is then unscheduled. Only whole ticks are swept,
        so a timer fires between 0 and one resolution after its deadline,
        plus however long the caller waits between two calls.
        """
        fired: list[tuple[int, float]] = []
        target = self._tick_of(now) - 1
        slots = self._slots
        count = len(slots)
        deadlines = self._deadlines
        tick_of = self._tick_of
        # One lap at most: a longer jump still visits every slot once.
        for tick in range(max(self._tick + 1, target - count + 1), target + 1):
            index = tick % count
            entries = slots[index]
            if not entries:
                continue
            keep: list[int] = []
            for key in entries:
                deadline = deadlines[key]
                if deadline == _NONE:
                    continue  # cancelled or already fired
                due_tick = tick_of(deadline)
                if due_tick <= tick:
                    deadlines[key] = _NONE
                    fired.append((key, deadline))
                elif due_tick % count == index:
                    keep.append(key)  # due in a later lap of the wheel
                # else: stale entry; the key's live entry sits in another slot
            slots[index] = keep
        self._tick = max(self._tick, target)
        return fired
