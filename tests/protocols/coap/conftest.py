"""Fixtures of the CoAP tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nettester import logs


@pytest.fixture(autouse=True)
def _restore_log_threshold() -> Iterator[None]:
    """A test that builds a role's log observer (``make_observer``) moves the process-wide
    threshold; later tests in the same process (keepalive's log-line tests) expect info again."""
    saved = list(logs._threshold)
    yield
    logs._threshold[:] = saved
