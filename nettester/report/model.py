"""What a tester run found, kept in memory with bounds: loss episodes, samples, marks, verdict.

Twisted-free and clock-free: every call takes its time (``now``, seconds
since the epoch, as ``reactor.seconds()`` gives) from the caller.

A *loss episode* is one transaction (STUN TrID, CoAP token, keep-alive conn
id) that lost at least one transmission. Its direction says where: on the
way to the server (``forward``), on the way back (``return``), or unknown
(``unattributed``: the far end cannot tell, or the episode was still open
when the run stopped). Summaries, metrics and reports name the three counts
``lost_forward``, ``lost_return``, ``lost_unattributed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FORWARD = "forward"
RETURN = "return"
UNATTRIBUTED = "unattributed"
DIRECTIONS = (FORWARD, RETURN, UNATTRIBUTED)
LOSS_KEYS = {FORWARD: "lost_forward", RETURN: "lost_return", UNATTRIBUTED: "lost_unattributed"}

# Mark kinds the plot draws (a role may add others; they are listed, not drawn).
MAPPING_CHANGE = "nat_mapping_change"
CLOSE = "close"

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

MAX_EPISODES = 20_000
MAX_SAMPLES = 2_000
MAX_MARKS = 20_000


@dataclass(frozen=True, slots=True)
class LossEpisode:
    """One transaction that lost transmissions.

    ``client``: the client id as the logs write it; ``key``: the transaction
    (TrID hex, CoAP token hex, conn id); ``start``/``end``: first loss and
    resolution (``end`` None: still open at stop); ``transmissions``: how
    many were sent; ``reached``: how many are known to have reached the
    server (None: unknown); ``detail``: role-specific facts (mapped address,
    close cause...), JSON-able.
    """

    client: str
    key: str
    start: float
    end: float | None
    direction: str
    transmissions: int
    reached: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r}")

    def to_json(self) -> dict[str, Any]:
        return {"client": self.client, "key": self.key, "start": self.start, "end": self.end,
                "direction": self.direction, "transmissions": self.transmissions, "reached": self.reached,
                "detail": dict(self.detail)}


@dataclass(frozen=True)
class Thresholds:
    """The limits a run is judged by (``--max-loss``, ``--max-resets``); None: not judged."""

    max_loss_percent: float | None = 0.0
    max_resets: int | None = 0

    def to_json(self) -> dict[str, Any]:
        return {"max_loss_percent": self.max_loss_percent, "max_resets": self.max_resets}


@dataclass(frozen=True)
class Verdict:
    """Passed or not, and why not: one reason per failed check, readable as is."""

    passed: bool
    reasons: tuple[str, ...] = ()

    @property
    def exit_status(self) -> int:
        """0 passed, 1 failed (2, a bad command line, never gets this far)."""
        return EXIT_PASS if self.passed else EXIT_FAIL

    def line(self) -> str:
        """``verdict: pass`` or ``verdict: FAIL: reason; reason``."""
        return "verdict: pass" if self.passed else "verdict: FAIL: " + "; ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "exit_status": self.exit_status, "reasons": list(self.reasons)}


def judge(thresholds: Thresholds, sent: int, lost: int, answered: int, resets: int | None = None,
          refused: int = 0) -> Verdict:
    """The verdict for ``sent`` transactions of which ``lost`` got no answer.

    A run that sent nothing or got no answer at all fails whatever the
    thresholds: a CI job against a dead server must not pass. ``resets``
    None: the role has no resets to judge. ``refused``: ICMP port
    unreachable reports, which name the likely cause when nothing was answered.
    """
    reasons = []
    if not answered and refused:
        reasons.append(f"no responses: the server refused the requests (ICMP port unreachable, {refused} times): "
                       "is it listening on that address and port?")
    elif not sent:
        reasons.append("nothing was sent (is --duration too short, or the server unreachable?)")
    elif not answered:
        reasons.append(f"no responses: all {sent} requests were lost")
    elif thresholds.max_loss_percent is not None:
        percent = 100.0 * lost / sent
        if percent > thresholds.max_loss_percent:
            reasons.append(f"loss {percent:.2f}% ({lost} of {sent}) is above --max-loss "
                           f"{thresholds.max_loss_percent:g}%")
    if resets is not None and thresholds.max_resets is not None and resets > thresholds.max_resets:
        reasons.append(f"{resets} connections reset or dropped, above --max-resets {thresholds.max_resets}")
    return Verdict(not reasons, tuple(reasons))


class RunRecorder:
    """Collects one run's episodes, time-series samples and marks, with bounds.

    Past ``max_episodes`` / ``max_marks`` further ones are counted (and still
    counted by direction) but not kept. Samples are thinned when full: every
    second one goes and the sampling stride doubles, so a long run keeps an
    even picture of its whole length in ``max_samples`` points.
    """

    def __init__(self, role: str, configuration: Mapping[str, Any], started: float,
                 max_episodes: int = MAX_EPISODES, max_samples: int = MAX_SAMPLES,
                 max_marks: int = MAX_MARKS) -> None:
        self.role = role
        self.configuration = dict(configuration)
        self.started = started
        self.episodes: list[LossEpisode] = []
        self.episodes_dropped = 0
        self.loss = dict.fromkeys(DIRECTIONS, 0)
        self.samples: list[dict[str, Any]] = []
        self.marks: list[dict[str, Any]] = []
        self.marks_dropped = 0
        self._max_episodes = max_episodes
        self._max_samples = max(2, max_samples)
        self._max_marks = max_marks
        self._stride = 1
        self._offered = 0

    def episode(self, episode: LossEpisode) -> None:
        """A resolved (or, at stop, still open) loss episode."""
        self.loss[episode.direction] += 1
        if len(self.episodes) < self._max_episodes:
            self.episodes.append(episode)
        else:
            self.episodes_dropped += 1

    def sample(self, now: float, **values: float | None) -> None:
        """One point of the time series, e.g. ``rtt_p50_ms=..., rtt_p99_ms=..., open_connections=...``."""
        self._offered += 1
        if (self._offered - 1) % self._stride:
            return
        self.samples.append({"t": now, **values})
        if len(self.samples) >= self._max_samples:
            del self.samples[1::2]
            self._stride *= 2

    def mark(self, now: float, kind: str, client: str = "", **detail: Any) -> None:
        """An event worth a mark on the timeline (NAT mapping change, close by cause...)."""
        if len(self.marks) < self._max_marks:
            self.marks.append({"t": now, "kind": kind, "client": client, "detail": detail})
        else:
            self.marks_dropped += 1

    def loss_fields(self) -> dict[str, int]:
        """``{"lost_forward": n, "lost_return": n, "lost_unattributed": n}`` for summary lines."""
        return {LOSS_KEYS[direction]: count for direction, count in self.loss.items()}

    def document(self, ended: float, counters: Mapping[str, Any], rtt_ms: Mapping[str, float] | None,
                 thresholds: Thresholds, verdict: Verdict) -> dict[str, Any]:
        """The report (see :mod:`nettester.report.writer` for the schema)."""
        from nettester.report.writer import SCHEMA

        return {
            "schema": SCHEMA,
            "role": self.role,
            "started": self.started,
            "ended": ended,
            "duration_s": round(ended - self.started, 3),
            "configuration": self.configuration,
            "counters": dict(counters),
            "loss": self.loss_fields(),
            "rtt_ms": dict(rtt_ms) if rtt_ms is not None else None,
            "episodes": [episode.to_json() for episode in self.episodes],
            "episodes_dropped": self.episodes_dropped,
            "series": list(self.samples),
            "marks": list(self.marks),
            "marks_dropped": self.marks_dropped,
            "thresholds": thresholds.to_json(),
            "verdict": verdict.to_json(),
        }
