"""The client fleet's reconnect policy: exponential backoff with jitter, repeats summarised."""

import random

from nettester.protocols.keepalive.backoff import Backoff, RepeatedFailures


def test_the_first_reconnect_waits_the_delay_then_doubles_with_jitter_up_to_the_cap() -> None:
    backoff = Backoff(1.0, 10.0, random.Random(3))
    delays = [backoff.failed() for _ in range(8)]
    assert delays[0] == 1.0
    for n, delay in enumerate(delays[1:], start=2):
        ceiling = min(10.0, 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    backoff.succeeded()
    assert backoff.failed() == 1.0


def test_a_zero_delay_still_backs_off() -> None:
    backoff = Backoff(0.0, 30.0, random.Random(1))
    assert backoff.failed() == 0.0
    assert backoff.failed() > 0.0


def test_repeats_within_the_window_are_counted_then_summarised() -> None:
    repeats = RepeatedFailures(10.0)
    assert repeats.record("tls", "c-1", 0.0) == (True, None)
    assert repeats.record("tls", "c-2", 1.0) == (False, None)
    assert repeats.record("tls", "c-3", 2.0) == (False, None)
    assert repeats.record("other", "c-4", 2.0) == (True, None)
    full, finished = repeats.record("tls", "c-5", 11.0)
    assert full and finished is not None and (finished.count, finished.last_conn) == (2, "c-3")
    repeats.record("tls", "c-6", 12.0)
    assert [(kind, run.count) for kind, run in repeats.flush()] == [("tls", 1)]
    assert repeats.flush() == []
