"""CoAP loss attribution: the tag and report options, the server's session table, the client's resolver."""

from __future__ import annotations

import dataclasses
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from nettester.protocols.coap.attribution import (
    REPORT_OPTION,
    TAG_OPTION,
    WINDOW,
    Attributor,
    Report,
    SessionTable,
    decode_report,
    decode_tag,
    encode_tag,
)
from nettester.protocols.coap.message import (
    CON,
    Code,
    Message,
    MessageType,
    decode,
    encode_message,
    is_critical,
    is_no_cache_key,
    is_unsafe,
)

SESSION = b"\x01" * 8


def test_code_points_are_experimental_elective_safe_and_no_cache_key() -> None:
    for number in (TAG_OPTION, REPORT_OPTION):
        assert 65000 <= number <= 65535  # RFC 7252 section 12.2
        assert not is_critical(number) and not is_unsafe(number) and is_no_cache_key(number)


def test_tag_and_report_cross_the_wire() -> None:
    tag = encode_tag(SESSION, 7)
    data = encode_message(CON, Code.GET, 1, b"t", [(11, b"benchmark"), (TAG_OPTION, tag)], b"")
    assert decode_tag(decode(data).option(TAG_OPTION) or b"") == (SESSION, 7)
    report = Report(3, 7, 0b101)
    assert decode_report(report.encode()) == report
    assert decode_tag(b"short") is None and decode_report(b"x" * 15) is None
    assert decode_tag(encode_tag(SESSION, 0)) is None  # sequences start at 1


def test_table_tracks_received_sequences_in_a_window() -> None:
    table = SessionTable()
    for sequence in (1, 2, 4):
        report = table.record(encode_tag(SESSION, sequence))
    assert report == Report(3, 4, 0b1101)  # bit i: sequence 4 - i
    assert [report.reached(sequence) for sequence in (1, 2, 3, 4)] == [True, True, False, True]
    assert report.reached(5) is None and report.reached(4 - WINDOW) is None
    assert table.record(encode_tag(SESSION, 3)) == Report(4, 4, 0b1111)  # late arrival fills its bit
    assert table.record(encode_tag(SESSION, 3)) == Report(4, 4, 0b1111)  # counted once
    far = table.record(encode_tag(SESSION, 4 + 2 * WINDOW))
    assert far is not None and far.window == 1 and far.received == 5


def test_table_is_a_bounded_lru_and_counts_bad_tags() -> None:
    table = SessionTable(max_sessions=2)
    for first in (1, 2, 1, 3):
        table.record(encode_tag(bytes([first]) * 8, 1))
    assert list(table.sessions) == [bytes([1]) * 8, bytes([3]) * 8] and table.evicted == 1
    assert table.record(b"garbage") is None and table.invalid == 1


def test_bytes_per_session_as_the_readme_says() -> None:
    table = SessionTable()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for index in range(2000):
        table.record(encode_tag(index.to_bytes(8, "big"), 70))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert used / 2000 <= 300  # the README states "about 300 bytes per session"


def test_annotate_copies_cached_answers_and_waits_for_deferred_ones() -> None:
    table = SessionTable()
    request = Message(CON, Code.GET, 1, b"t", [(11, b"benchmark"), (TAG_OPTION, encode_tag(SESSION, 1))])
    cached = Message(MessageType.ACK, Code.CONTENT, 1, b"t", [(12, b"")], b"hello")
    answer = table.annotate(request, cached)
    assert answer.option(REPORT_OPTION) == Report(1, 1, 1).encode()
    assert cached.options == [(12, b"")]  # the resource's cached answer is untouched
    assert answer == dataclasses.replace(cached, options=[*cached.options, (REPORT_OPTION, Report(1, 1, 1).encode())])
    later: defer.Deferred[Message] = defer.Deferred()
    request.options[-1] = (TAG_OPTION, encode_tag(SESSION, 2))
    found: list[Message] = []
    table.annotate(request, later).addCallback(found.append)
    later.callback(cached)
    assert found[0].option(REPORT_OPTION) == Report(2, 2, 0b11).encode()
    untagged = Message(CON, Code.GET, 2, b"u", [(11, b"benchmark")])
    assert table.annotate(untagged, cached) is cached
    assert table.annotate(request, None) is None


def test_attributor_resolves_by_the_report() -> None:
    attributor = Attributor(SESSION)
    sequences = [attributor.next_tag()[0] for _ in range(3)]
    assert sequences == [1, 2, 3]
    attributor.failed(1, "first")
    attributor.failed(2, "second")
    # The server saw 2 and 3, not 1: 1 was lost on the way out, 2's answer on the way back.
    resolved = attributor.answered(Report(2, 3, 0b011).encode())
    assert sorted(resolved) == [("first", "forward"), ("second", "return")]
    assert attributor.pending == {}


def test_attributor_without_report_or_with_a_lying_one() -> None:
    attributor = Attributor(SESSION)
    attributor.next_tag()
    attributor.failed(1, "x")
    assert attributor.answered(None) == [("x", "unattributed")]
    attributor.failed(1, "y")
    assert attributor.answered(Report(50, 1, 1).encode()) == [("y", "unattributed")]  # 50 received of 1 sent
    assert attributor.answered(b"bad") == [] and attributor.invalid == 2


@given(st.binary(max_size=40))
def test_any_option_value_is_safe(value: bytes) -> None:
    table = SessionTable()
    attributor = Attributor(SESSION)
    attributor.next_tag()
    attributor.failed(1, "x")
    table.record(value)
    for _, direction in attributor.answered(value):
        assert direction in ("forward", "return", "unattributed")
