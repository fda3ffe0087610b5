"""Reconnect policy of the client fleet: exponential backoff with jitter, and repeated failures summarised.

Sans-IO: times go in as arguments, randomness is injected. A client whose
server refuses it or whose TLS handshake fails must not reconnect 20 times a
second and log 24,000 identical lines in ten minutes.

- ``Backoff``: the first reconnect after a drop waits ``--reconnect-delay``
  (the original tool's behaviour, so one reset by a middlebox costs one
  delay); each further consecutive failure doubles the delay up to
  ``--reconnect-max-delay``, drawn at random in its upper half so a fleet
  that failed at once does not come back at once.
- ``RepeatedFailures``: the first failure of a kind is logged in full; the
  same failure again within ``window`` seconds is only counted, and the
  count is said in one line when the window is over.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Growth starts from at least this many seconds, so --reconnect-delay 0 still backs off.
MIN_STEP = 0.5
DEFAULT_MAX_DELAY = 60.0


class Backoff:
    """The delay before each reconnect of one client; ``succeeded`` starts over."""

    __slots__ = ("_initial", "_cap", "_rng", "failures")

    def __init__(self, initial: float, cap: float, rng: random.Random) -> None:
        self._initial = initial
        self._cap = max(cap, initial)
        self._rng = rng
        self.failures = 0

    def failed(self) -> float:
        """One more consecutive failure: the seconds to wait before the next attempt."""
        self.failures += 1
        if self.failures == 1:
            return self._initial
        ceiling = min(self._cap, max(self._initial, MIN_STEP) * 2 ** (self.failures - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def succeeded(self) -> None:
        """The connection works (a keep-alive was answered): the next failure waits the initial delay."""
        self.failures = 0


@dataclass
class Repeats:
    """Failures of one kind since ``since``, beyond the one logged in full."""

    since: float
    count: int = 0
    last_conn: str = ""


class RepeatedFailures:
    """Which failures to log in full and which to count, per kind (e.g. the TLS error text)."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._runs: dict[str, Repeats] = {}

    def record(self, kind: str, conn: str, now: float) -> tuple[bool, Repeats | None]:
        """A failure of ``kind`` on ``conn``: (log it in full?, a finished run of repeats to summarise)."""
        run = self._runs.get(kind)
        if run is not None and now - run.since < self._window:
            run.count += 1
            run.last_conn = conn
            return False, None
        self._runs[kind] = Repeats(now)
        return True, run if run is not None and run.count else None

    def flush(self) -> list[tuple[str, Repeats]]:
        """Every run with uncounted repeats (on stop), emptied by the call."""
        runs = [(kind, run) for kind, run in self._runs.items() if run.count]
        self._runs.clear()
        return runs
