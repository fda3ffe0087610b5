"""Capturing the log events a piece of code emits, for tests that check log lines."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.logger import globalLogPublisher


@contextmanager
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Every event logged inside the block, in order (the list stays readable after it)."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)
