"""Static answers: a static resource's plain GET answered from memory, byte for byte as in full.

Two servers side by side on a fake link and a task.Clock: one whose
benchmark resource is static (the shipped one), one where it is not. Every
request goes to both; the answers and the counters must be equal, and the
static server must not have called the resource again.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from nettester.protocols.coap.attribution import TAG_OPTION, encode_tag
from nettester.protocols.coap.attribution import attach as attach_attribution
from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.message import CON, NON, Code, OptionNumber, encode_block, encode_message, encode_uint
from nettester.protocols.coap.resources import build_site
from nettester.protocols.coap.resources.extended import Benchmark, extended_resources
from nettester.protocols.coap.static import MAX_STATIC_ANSWERS
from nettester.udplink import UdpLink

PEER = ("192.0.2.7", 40000)
BENCHMARK = [(OptionNumber.URI_PATH, b"benchmark"), (OptionNumber.URI_QUERY, b"rlen=40")]


class Served:
    """One server: extended resources (benchmark enabled) on a CoapEndpoint over a UdpLink whose sends are kept."""

    def __init__(self, static: bool) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.site = build_site(self.clock, extended_resources(True, "test", self.clock.seconds, 0.0))
        attach_attribution(self.site)
        self.benchmark = self.site.find("/benchmark")
        assert isinstance(self.benchmark, Benchmark)
        self.benchmark.static = static
        self.calls = 0
        answer = self.benchmark.get

        def counting(exchange: Any) -> Any:
            self.calls += 1
            return answer(exchange)

        self.benchmark.get = counting  # type: ignore[method-assign]
        self.link = UdpLink()
        self.sent: list[bytes] = []
        self.link._sendto = lambda data, peer: self.sent.append(data)  # type: ignore[assignment, misc, return-value]
        self.endpoint = CoapEndpoint(self.link, self.clock, rng=random.Random(7))  # the same MIDs in both
        self.site.attach(self.endpoint)

    def ask(self, datagram: bytes, peer: Any = PEER) -> list[bytes]:
        before = len(self.sent)
        self.link.datagramReceived(datagram, peer)
        return self.sent[before:]


def both() -> tuple[Served, Served]:
    return Served(static=True), Served(static=False)


def ask_both(static: Served, full: Served, datagram: bytes, peer: Any = PEER) -> list[bytes]:
    answers = static.ask(datagram, peer)
    assert answers == full.ask(datagram, peer)
    assert static.endpoint.stats == full.endpoint.stats
    return answers


def get(mid: int, token: bytes, options: list[tuple[int, bytes]] = BENCHMARK, mtype: int = CON,
        code: int = Code.GET, payload: bytes = b"") -> bytes:
    return encode_message(mtype, code, mid, token, options, payload)


def test_the_next_identical_get_is_answered_from_memory_byte_for_byte() -> None:
    static, full = both()
    for mid, token in ((1, b"\x01\x02"), (2, b"abcdefgh"), (3, b""), (4, b"\x09")):
        (answer,) = ask_both(static, full, get(mid, token))
        assert answer[2:4] == mid.to_bytes(2, "big") and answer[4:4 + len(token)] == token
    assert static.calls == 1 and full.calls == 4
    assert static.endpoint.stats.received == 4 and static.endpoint.stats.sent == 4


def test_a_duplicate_of_an_answer_from_memory_gets_the_same_bytes_again() -> None:
    static, full = both()
    ask_both(static, full, get(1, b"t1"))
    first = ask_both(static, full, get(2, b"t2"))
    assert ask_both(static, full, get(2, b"t2")) == first  # RFC 7252 section 4.5
    assert static.endpoint.stats.duplicates == 1


def test_every_peer_and_query_has_its_answer() -> None:
    static, full = both()
    for rlen in (b"rlen=1", b"rlen=40", b"rlen=x", b"rlen=1", b"rlen=40"):
        options = [(OptionNumber.URI_PATH, b"benchmark"), (OptionNumber.URI_QUERY, rlen)]
        for port in (1, 2):
            ask_both(static, full, get(port * 100 + len(static.sent), b"k", options), ("192.0.2.8", port))
    assert static.calls == 3  # rlen=1, rlen=40 and the refused rlen=x, once each


def test_requests_with_side_effects_are_served_in_full() -> None:
    static, full = both()
    ask_both(static, full, get(1, b"a"))
    side_effects = [
        get(2, b"b", [*BENCHMARK, (TAG_OPTION, encode_tag(b"12345678", 1))]),  # counted by the attribution
        get(3, b"c", [(OptionNumber.OBSERVE, b""), *BENCHMARK]),  # registers an observer
        get(4, b"d", [*BENCHMARK, (OptionNumber.BLOCK2, encode_block(0, False, 0))]),  # block-wise
        get(5, b"e", payload=b"body"),
        get(6, b"f", mtype=NON),
        get(7, b"g", code=Code.POST),
    ]
    for datagram in side_effects:
        ask_both(static, full, datagram)
    assert static.calls == 6  # the first GET, then every GET above in full (the POST is not a GET)
    assert static.endpoint.core.observer_count == 1
    assert len(static.endpoint.core.static_answers) == 1


def test_a_reserved_token_length_is_rejected_not_answered_from_memory() -> None:
    static, full = both()
    ask_both(static, full, get(1, b"12345678"))
    valid = get(2, b"12345678")
    reserved = bytes((valid[0] + 1,)) + valid[1:12] + b"9" + valid[12:]  # TKL 9: same bytes after 13
    assert ask_both(static, full, reserved) == [bytes((0x70, 0, 0, 2))]  # RST (RFC 7252 section 3)


def test_a_change_of_the_tree_forgets_the_answers() -> None:
    static, _ = both()
    static.ask(get(1, b"a"))
    static.site.root.remove("benchmark")
    (answer,) = static.ask(get(2, b"b"))
    assert answer[1] == Code.NOT_FOUND


def test_the_memory_is_bounded() -> None:
    static, _ = both()
    for number in range(MAX_STATIC_ANSWERS + 1):
        options = [(OptionNumber.URI_PATH, b"benchmark"), (OptionNumber.URI_QUERY, b"rlen=%d" % (number % 8000))]
        static.ask(get(number, b"t", options))
    assert len(static.endpoint.core.static_answers) <= MAX_STATIC_ANSWERS


@given(
    token=st.binary(max_size=8),
    queries=st.lists(st.sampled_from([b"rlen=0", b"rlen=17", b"rlen=9000", b"ack", b"zz"]), max_size=2),
    accept=st.sampled_from([None, 0, 50]),
    repeat=st.integers(min_value=1, max_value=3),
)
@settings(max_examples=100, deadline=None)
def test_fuzz_answers_from_memory_equal_full_answers(token: bytes, queries: list[bytes], accept: int | None,
                                                     repeat: int) -> None:
    static, full = both()
    options = [(OptionNumber.URI_PATH, b"benchmark"), *((OptionNumber.URI_QUERY, q) for q in queries)]
    if accept is not None:
        options.append((OptionNumber.ACCEPT, encode_uint(accept)))
    for mid in range(repeat):
        ask_both(static, full, get(mid, token, options))
        static.clock.advance(2.0)  # separate answers (``ack``) come later
        full.clock.advance(2.0)
        assert static.sent == full.sent


def test_the_last_block_of_an_upload_is_served_in_full() -> None:
    static, full = both()
    for mid in (1, 2):
        ask_both(static, full, get(mid, b"u", [*BENCHMARK, (OptionNumber.BLOCK1, encode_block(0, False, 2))]))
    assert static.calls == 2 and not static.endpoint.core.static_answers
