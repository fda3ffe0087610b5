"""Static answers over TCP: a static resource's GET frame answered from memory, byte for byte as in full.

Two servers side by side, each a TcpLink over StringTransport on a task.Clock:
one whose benchmark resource is static (the shipped one), one where it is
not. Every read goes to both; what they write and their counters must be
equal, and the static server must not have called the resource again.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from nettester.protocols.coap.message import Code, OptionNumber, encode_block, encode_uint
from nettester.protocols.coap.resources import build_site
from nettester.protocols.coap.resources.extended import Benchmark, extended_resources
from nettester.protocols.coap.tcp import CoapStream, SignalCode, encode_frame
from nettester.protocols.coap.tcplink import CoapTcpConnection, ReliableCoapEndpoint, TcpLink

CSM = encode_frame(SignalCode.CSM)
BENCHMARK = [(OptionNumber.URI_PATH, b"benchmark"), (OptionNumber.URI_QUERY, b"rlen=40")]


class Served:
    """Extended resources (benchmark enabled) behind a TcpLink; one connection over StringTransport."""

    def __init__(self, static: bool) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.link = TcpLink(self.clock)
        self.endpoint = ReliableCoapEndpoint(self.link, self.clock, rng=random.Random(7))  # the same Observe numbers
        self.site = build_site(self.clock, extended_resources(True, "test", self.clock.seconds, 0.0))
        self.site.attach(self.endpoint)
        benchmark = self.site.find("/benchmark")
        assert isinstance(benchmark, Benchmark)
        benchmark.static = static
        self.calls = 0
        answer = benchmark.get

        def counting(exchange: Any) -> Any:
            self.calls += 1
            return answer(exchange)

        benchmark.get = counting  # type: ignore[method-assign]
        self.connection, self.transport = self.connect()

    def connect(self) -> tuple[CoapTcpConnection, StringTransport]:
        connection = self.link.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40001))
        connection.makeConnection(transport)
        return connection, transport

    def ask(self, data: bytes) -> bytes:
        """What the connection writes on reading ``data``."""
        self.transport.clear()
        self.connection.dataReceived(data)
        return self.transport.value()


def both() -> tuple[Served, Served]:
    return Served(static=True), Served(static=False)


def ask_both(static: Served, full: Served, data: bytes) -> bytes:
    answer = static.ask(data)
    assert answer == full.ask(data)
    assert static.endpoint.stats == full.endpoint.stats
    return answer


def get(token: bytes, options: list[tuple[int, bytes]] = BENCHMARK) -> bytes:
    return encode_frame(Code.GET, token, options)


def test_the_next_identical_get_frame_is_answered_from_memory_byte_for_byte() -> None:
    static, full = both()
    ask_both(static, full, CSM)
    for token in (b"\x01\x02", b"abcdefgh", b"", b"\x09"):
        assert ask_both(static, full, get(token))
    assert static.calls == 1 and full.calls == 4
    assert static.endpoint.stats.received == 4 and static.endpoint.stats.sent == 4


def test_frames_in_one_read_and_split_across_reads() -> None:
    static, full = both()
    ask_both(static, full, CSM + get(b"a"))
    batch = get(b"b") + get(b"c", [(OptionNumber.URI_PATH, b"benchmark")]) + get(b"d")
    assert ask_both(static, full, batch[:5]) == b""
    ask_both(static, full, batch[5:])
    assert static.calls == 2 and full.calls == 4


def test_requests_with_side_effects_are_served_in_full() -> None:
    static, full = both()
    ask_both(static, full, CSM)
    for options in (
        [*BENCHMARK, (OptionNumber.OBSERVE, b"")],
        [*BENCHMARK, (OptionNumber.BLOCK2, encode_block(0, False, 7, bert=True))],  # BERT (RFC 8323 section 6)
        [(OptionNumber.URI_PATH, b"benchmark"), (OptionNumber.URI_QUERY, b"rlen=2000")],  # block-wise
    ):
        for token in (b"x", b"y"):
            ask_both(static, full, get(token, options))
    assert static.calls == full.calls == 6


def test_the_fast_path_waits_for_the_csm() -> None:
    """RFC 8323 section 5.3.1: a GET before the CSM aborts the connection even if it is remembered."""
    static, _ = both()
    static.ask(CSM + get(b"a"))
    second, _ = static.connect()
    assert second.stream is not None and second.stream.static_answer is not None
    second.dataReceived(get(b"b"))
    assert second.stream.closed == "csm_not_first"


def test_a_stream_without_static_answers_decodes_every_frame() -> None:
    stream = CoapStream(0.0)
    stream.receive_data(CSM + get(b"a"), 0.0)
    events = [stream.next_event(), stream.next_event()]
    assert type(events[1]).__name__ == "MessageReceived"


@given(
    tokens=st.lists(st.binary(max_size=8), min_size=1, max_size=4),
    queries=st.lists(st.sampled_from([b"rlen=0", b"rlen=17", b"rlen=2000", b"rlen=9000", b"ack", b"zz"]), max_size=2),
    accept=st.sampled_from([None, 0, 50]),
    cut=st.integers(min_value=0, max_value=200),
)
@settings(max_examples=100, deadline=None)
def test_fuzz_answers_from_memory_equal_full_answers(tokens: list[bytes], queries: list[bytes],
                                                     accept: int | None, cut: int) -> None:
    static, full = both()
    options = [(OptionNumber.URI_PATH, b"benchmark"), *((OptionNumber.URI_QUERY, q) for q in queries)]
    if accept is not None:
        options.append((OptionNumber.ACCEPT, encode_uint(accept)))
    ask_both(static, full, CSM + get(tokens[0], options))
    data = b"".join(get(token, options) for token in tokens)
    ask_both(static, full, data[:cut])
    ask_both(static, full, data[cut:])
    static.clock.advance(2.0)
    full.clock.advance(2.0)
    assert static.transport.value() == full.transport.value()
