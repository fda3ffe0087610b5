"""Shared fixture of the keepalive tests: the log events nettester emitted."""

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import formatEvent, globalLogPublisher


class LogCapture:
    """Every event published while a test runs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("event") == name]

    def lines(self, name: str) -> list[str]:
        """The rendered messages of the events called ``name``."""
        return [formatEvent(event) for event in self.named(name)]


@pytest.fixture
def logged() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)
