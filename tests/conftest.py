"""Suite-wide fixtures."""

from collections.abc import Iterator

import pytest

from nettester import logs


@pytest.fixture(autouse=True)
def _restore_log_threshold() -> Iterator[None]:
    """A test that builds an observer with ``make_observer`` sets the process-wide level: put it back."""
    saved = logs._threshold[0]
    yield
    logs._threshold[0] = saved
