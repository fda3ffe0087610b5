"""A hashed timer wheel for many small-integer keys (clients), sans-IO.

One ``expire(now)`` per tick replaces thousands of independent delayed
calls: scheduling is an append, cancelling or moving a timer just overwrites
the key's deadline (older entries become stale and are skipped when their
slot comes round). Memory: 8 bytes per key plus one list slot per pending entry.
``next_deadline()`` says when ``expire`` next has work, so one re-armed
timer can drive the wheel instead of a periodic tick.
"""

from __future__ import annotations

import math
from array import array

_NONE = math.inf


class TimerWheel:
    """Deadlines for keys ``0 .. size-1``, fired with ``resolution`` granularity."""

    def __init__(self, size: int, now: float, resolution: float = 0.01, slots: int = 1024) -> None:
        self._resolution = resolution
        self._slots: list[list[int]] = [[] for _ in range(slots)]
        self._deadlines = array("d", [_NONE]) * size
        self._tick = self._tick_of(now) - 1  # the last tick wholly swept: the one before now's
        self._next_tick: int | None = None  # a lower bound of the next tick with work; None: unknown

    def _tick_of(self, when: float) -> int:
        return int(when / self._resolution)

    def schedule(self, key: int, deadline: float) -> None:
        """Fire ``key`` at ``deadline``, replacing any earlier schedule of it."""
        self._deadlines[key] = deadline
        # Never into a slot already swept: a past deadline fires at the next tick.
        tick = max(self._tick_of(deadline), self._tick + 1)
        self._slots[tick % len(self._slots)].append(key)
        if self._next_tick is not None and tick < self._next_tick:
            self._next_tick = tick

    def cancel(self, key: int) -> None:
        self._deadlines[key] = _NONE

    def deadline(self, key: int) -> float:
        """The key's pending deadline, or ``math.inf`` when none."""
        return self._deadlines[key]

    def next_deadline(self) -> float | None:
        """A time at which ``expire`` has work (just after the end of its tick), or None when nothing is scheduled.

        Never late; it may be early when a timer was cancelled or moved
        later (``expire`` then returns nothing, and this is asked again).
        """
        if self._next_tick is None:
            self._next_tick = self._find_next_tick()
            if self._next_tick is None:
                return None
        # A hair past the tick's end, so that the sweep at that time surely includes the tick.
        return (self._next_tick + 1.001) * self._resolution

    def _find_next_tick(self) -> int | None:
        slots = self._slots
        count = len(slots)
        deadlines = self._deadlines
        tick_of = self._tick_of
        for tick in range(self._tick + 1, self._tick + 1 + count):
            for key in slots[tick % count]:
                deadline = deadlines[key]
                if deadline != _NONE and tick_of(deadline) <= tick:
                    return tick
        # Nothing within one lap: the earliest deadline is further away.
        earliest = min(deadlines, default=_NONE)
        return None if earliest == _NONE else max(tick_of(earliest), self._tick + 1)

    def expire(self, now: float) -> list[tuple[int, float]]:
        """Every (key, deadline) whose tick has completely passed at ``now``; never early.

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
        self._next_tick = None
        return fired
