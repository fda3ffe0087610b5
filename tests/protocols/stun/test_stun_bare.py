"""The bare Binding request's fast path: ``BindingResponder.bare_answer`` and the datagram protocol's first try.

Every answer it gives must be byte for byte, and counted, as ``respond``'s;
whatever it declines (an unknown or IPv6 peer, attributes, not a Binding
request) is left to ``respond``.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import ServerCounters
from nettester.protocols.stun.message import MAGIC_COOKIE_BYTES, Address
from nettester.protocols.stun.responder import BindingResponder
from nettester.protocols.stun.server import StunDatagramProtocol

BARE = b"\x00\x01\x00\x00" + MAGIC_COOKIE_BYTES
PEER = ("192.0.2.1", 32853)


def responder() -> tuple[BindingResponder, ServerCounters]:
    counters = ServerCounters(MetricSet("stun_bare_test"))
    return BindingResponder(counters, "test server"), counters


def counted(counters: ServerCounters) -> tuple[int, int]:
    return counters.requests.value, counters.responses.value


@given(
    hosts=st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 65535)), min_size=1,
                   max_size=4),
    ids=st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=6),
)
@settings(max_examples=100, deadline=None)
def test_bare_answers_equal_full_answers(hosts: list[tuple[int, int, int]], ids: list[bytes]) -> None:
    fast, fast_counters = responder()
    full, full_counters = responder()
    for a, b, port in hosts:
        peer = (f"198.51.{a}.{b}", port)
        for transaction_id in ids:
            request = BARE + transaction_id
            reply = full.respond(request, peer)
            assert reply is not None
            answer = fast.bare_answer(request, peer)
            if answer is None:  # the first request of a peer: respond, which remembers the peer
                first = fast.respond(request, peer)
                assert first is not None
                answer = first[0]
            assert answer == reply[0]
            assert counted(fast_counters) == counted(full_counters)


def test_what_bare_answer_declines() -> None:
    fast, counters = responder()
    request = BARE + bytes(12)
    assert fast.bare_answer(request, PEER) is None  # not answered yet
    fast.respond(request, PEER)
    fast.respond(request, ("2001:db8::1", 3478))
    before = counted(counters)
    assert fast.bare_answer(request, ("2001:db8::1", 3478)) is None  # IPv6: the mask has the transaction id
    assert fast.bare_answer(request + b"\x80\x22\x00\x00", PEER) is None  # an attribute
    assert fast.bare_answer(b"\x01\x01" + request[2:], PEER) is None  # a response
    assert fast.bare_answer(request[:19], PEER) is None
    assert counted(counters) == before
    assert fast.bare_answer(request, PEER) is not None and counted(counters) == (before[0] + 1, before[1] + 1)


class Socket:
    """A listening port whose socket keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def getHandle(self) -> Socket:
        return self

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))


class Journal:
    """Counts what the protocol records."""

    def __init__(self) -> None:
        self.records = 0

    def record(self, *args: Any) -> None:
        self.records += 1


def test_the_datagram_protocol_answers_known_peers_on_the_fast_path_the_same() -> None:
    fast, counters = responder()
    full, _ = responder()
    socket = Socket()
    protocol = StunDatagramProtocol(0, [socket])  # type: ignore[list-item]
    protocol.serve(fast, counters, lambda: 0.0)
    requests = [BARE + os.urandom(12) for _ in range(3)]
    for request in requests:
        protocol.datagramReceived(request, PEER)
    expected = [full.respond(request, PEER) for request in requests]
    assert socket.sent == [(reply[0], PEER) for reply in expected if reply is not None]
    assert counted(counters) == (3, 3)


def test_a_journal_or_rfc5780_server_takes_the_full_path() -> None:
    journalled, _ = responder()
    protocol = StunDatagramProtocol(0, [Socket()])  # type: ignore[list-item]
    journal = Journal()
    protocol.serve(journalled, ServerCounters(MetricSet("stun_bare_journal")), lambda: 0.0, journal)  # type: ignore[arg-type]
    for _ in range(3):
        protocol.datagramReceived(BARE + bytes(12), PEER)
    assert journal.records == 3  # every request recorded, also those of a known peer
    addresses = [Address("192.0.2.10", 3478), Address("192.0.2.10", 3479), Address("192.0.2.11", 3478),
                 Address("192.0.2.11", 3479)]
    counters = ServerCounters(MetricSet("stun_bare_rfc5780"))
    protocol = StunDatagramProtocol(0, [Socket()])  # type: ignore[list-item]
    protocol.serve(BindingResponder(counters, "t", addresses), counters, lambda: 0.0)
    assert protocol._bare is None
