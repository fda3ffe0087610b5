"""The sans-IO policy of a DTLS endpoint: who gets a connection, and who
loses one when room runs out.

``Admission`` judges datagrams from addresses without a connection: a
ClientHello gets a stateless HelloVerifyRequest cookie (RFC 6347 section
4.2.1) and a connection only once it returns with a valid one.  A ClientHello
that arrives in fragments (RFC 6347 section 4.2.3: in several records, or
several fragments in one record) is reassembled first, in a small area that
is bounded per source and in total and forgets a source after a short time,
so the cookie exchange stays stateless in all but those few bytes.

``PeerTable`` holds the live peers by address and by CID, least recently
active first, and decides evictions: a half-open handshake (one that never
completed) has its own bound and is evicted oldest first when a new one needs
room, a stale established session only when it is idle for ``stale_after``;
an active established session never.

Both take ``now`` and never read a clock; the endpoint is their adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Hashable, Iterator, TypeVar

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record
from nettester.protocols.dtls.configuration import Address
from nettester.protocols.dtls.cookie import CookieGate, GateResult, Verdict

#: the largest ClientHello reassembled, per source (PQ key shares and long
#: extension lists fit; RFC 6347 lets a message be 2^24 bytes, we need not)
DEFAULT_MAX_CLIENT_HELLO = 8192
#: all partial ClientHellos together
DEFAULT_FRAGMENT_AREA = 256 * 1024
#: a partial ClientHello is forgotten after this many seconds
DEFAULT_FRAGMENT_TIMEOUT = 2.0

DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_STALE_AFTER = 300.0
DEFAULT_MAX_HALF_OPEN = 1000
#: seconds a server handshake may take before it is given up
DEFAULT_HALF_OPEN_TIMEOUT = 10.0
#: seconds between two log lines about half-open pressure
PRESSURE_REPORT_INTERVAL = 10.0


@dataclass(frozen=True)
class AdmissionResult:
    """The gate's verdict, plus how many partial ClientHellos this datagram
    made the reassembly area evict (a counter)."""

    verdict: Verdict
    reply: bytes = b""
    reason: str = ""
    datagram: bytes = b""
    evicted: int = 0

    @classmethod
    def of(cls, result: GateResult, evicted: int = 0) -> AdmissionResult:
        return cls(result.verdict, result.reply, result.reason, result.datagram, evicted)


class _PartialHello:
    __slots__ = ("message_seq", "message", "record_sequence", "started")

    def __init__(self, message_seq: int, length: int, now: float) -> None:
        self.message_seq = message_seq
        self.message = hs.PartialMessage(hs.CLIENT_HELLO, length, 0)
        self.record_sequence = 0
        self.started = now


class ClientHelloFragments:
    """Bounded reassembly of ClientHellos by source address."""

    def __init__(
        self,
        max_client_hello: int = DEFAULT_MAX_CLIENT_HELLO,
        area: int = DEFAULT_FRAGMENT_AREA,
        timeout: float = DEFAULT_FRAGMENT_TIMEOUT,
    ) -> None:
        self.max_client_hello = max_client_hello
        self.area = area
        self.timeout = timeout
        self._partials: OrderedDict[Address, _PartialHello] = OrderedDict()  # oldest first
        self._held = 0
        self.evicted = 0

    @property
    def held(self) -> int:
        """Bytes held for partial ClientHellos."""
        return self._held

    def __len__(self) -> int:
        return len(self._partials)

    def assembling(self, address: Address) -> bool:
        """Whether part of a ClientHello from ``address`` is held."""
        return address in self._partials

    def add(
        self, address: Address, fragments: list[tuple[int, hs.Fragment]], now: float
    ) -> tuple[str, tuple[bytes, int, int] | None, int]:
        """Take the ClientHello fragments of one datagram, each with its
        record sequence number.  Returns (reason, hello, evicted): ``hello``
        is (body, message_seq, highest record sequence) once complete, else
        None with ``reason`` saying why nothing is complete ("" while waiting
        for more); ``evicted``: partials this call made room by dropping."""
        evicted = self._expire(now)
        partial = self._partials.get(address)
        for record_sequence, fragment in fragments:
            if fragment.length > self.max_client_hello:
                self._forget(address)
                return "client_hello_too_large", None, evicted
            if partial is not None and (partial.message_seq, len(partial.message.buffer)) != (
                fragment.message_seq,
                fragment.length,
            ):
                self._forget(address)  # another hello from this source: start over
                partial = None
            if partial is None:
                while self._partials and self._held + fragment.length > self.area:
                    self._forget(next(iter(self._partials)))
                    evicted += 1
                partial = self._partials[address] = _PartialHello(fragment.message_seq, fragment.length, now)
                self._held += fragment.length
            partial.message.add(fragment.offset, fragment.body)
            partial.record_sequence = max(partial.record_sequence, record_sequence)
        self.evicted += evicted
        if partial is None or not partial.message.complete:
            return "", None, evicted
        self._forget(address)
        return "", (bytes(partial.message.buffer), partial.message_seq, partial.record_sequence), evicted

    def _expire(self, now: float) -> int:
        expired = 0
        while self._partials:
            address, oldest = next(iter(self._partials.items()))
            if now - oldest.started < self.timeout:
                break
            self._forget(address)
            expired += 1
        return expired

    def _forget(self, address: Address) -> None:
        partial = self._partials.pop(address, None)
        if partial is not None:
            self._held -= len(partial.message.buffer)


class Admission:
    """The stateless cookie gate in front of a server, with the bounded
    reassembly of fragmented ClientHellos."""

    def __init__(self, gate: CookieGate | None = None, fragments: ClientHelloFragments | None = None) -> None:
        self.gate = gate or CookieGate()
        self.fragments = fragments or ClientHelloFragments()

    def check(self, datagram: bytes, address: Address, now: float) -> AdmissionResult:
        """Judge a datagram from ``address``, which has no connection."""
        result = self.gate.check(datagram, address, now)
        if result.reason != "not_client_hello":
            return AdmissionResult.of(result)
        # Not one whole ClientHello: fragments of one, maybe, in one or more
        # records of this datagram (RFC 6347 section 4.2.3).
        records, _ = record.parse_records(datagram, 0)
        fragments: list[tuple[int, hs.Fragment]] = []
        for received in records:
            if received.content_type != record.HANDSHAKE or received.epoch != 0:
                return AdmissionResult.of(result)
            try:
                parsed = hs.parse_fragments(received.fragment)
            except hs.DecodeError:
                return AdmissionResult(Verdict.DROP, reason="malformed")
            if any(fragment.msg_type != hs.CLIENT_HELLO for fragment in parsed):
                return AdmissionResult.of(result)
            fragments += [(received.sequence_number, fragment) for fragment in parsed]
        if not fragments:
            return AdmissionResult.of(result)
        reason, hello, evicted = self.fragments.add(address, fragments, now)
        if hello is None:
            return AdmissionResult(Verdict.DROP, reason=reason or "client_hello_fragment", evicted=evicted)
        body, message_seq, record_sequence = hello
        return AdmissionResult.of(self.gate.judge(body, message_seq, record_sequence, address, now), evicted)


P = TypeVar("P", bound=Hashable)


class _Entry:
    __slots__ = ("address", "cid", "last_activity", "half_open")

    def __init__(self, address: Address, now: float, half_open: bool) -> None:
        self.address = address
        self.cid = b""
        self.last_activity = now
        self.half_open = half_open


class PeerTable(Generic[P]):
    """Live peers by address and by CID, with the eviction policy (see the
    module docstring).  ``P`` is whatever the adapter calls a peer."""

    def __init__(
        self,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        stale_after: float = DEFAULT_STALE_AFTER,
        max_half_open: int = DEFAULT_MAX_HALF_OPEN,
    ) -> None:
        self.max_connections = max_connections
        self.stale_after = stale_after
        self.max_half_open = max_half_open
        self._entries: OrderedDict[P, _Entry] = OrderedDict()  # least recently active first
        self._half_open: OrderedDict[P, None] = OrderedDict()  # oldest first
        self._by_address: dict[Address, P] = {}
        #: CID -> peer; also the set a server's new CIDs must avoid
        self.by_cid: dict[bytes, P] = {}
        self.half_open_evictions = 0
        self._unreported_evictions = 0
        self._reported_at = float("-inf")

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[P]:
        return iter(list(self._entries))

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    @property
    def half_open(self) -> int:
        return len(self._half_open)

    def at_address(self, address: Address) -> P | None:
        return self._by_address.get(address)

    def with_cid(self, cid: bytes) -> P | None:
        return self.by_cid.get(cid)

    def add(self, peer: P, address: Address, now: float, half_open: bool = False) -> P | None:
        """Register ``peer`` at ``address``; returns the peer it replaces
        there (for the adapter to remove), if any."""
        previous = self._by_address.get(address)
        if previous is not None:
            self.remove(previous)
        self._entries[peer] = _Entry(address, now, half_open)
        self._by_address[address] = peer
        if half_open:
            self._half_open[peer] = None
        return previous

    def touch(self, peer: P, now: float) -> None:
        """``peer`` was heard from: it becomes the most recently active."""
        entry = self._entries.get(peer)
        if entry is not None:
            entry.last_activity = now
            self._entries.move_to_end(peer)

    def established(self, peer: P) -> None:
        """``peer``'s handshake completed: no longer half-open."""
        entry = self._entries.get(peer)
        if entry is not None:
            entry.half_open = False
        self._half_open.pop(peer, None)

    def set_cid(self, peer: P, cid: bytes) -> None:
        """Route records with ``cid`` to ``peer``, replacing a holder."""
        entry = self._entries.get(peer)
        if entry is None or not cid:
            return
        holder = self.by_cid.get(cid)
        if holder is not None and holder is not peer:
            self.remove(holder)
        entry.cid = cid
        self.by_cid[cid] = peer

    def move(self, peer: P, address: Address) -> None:
        """``peer`` is now at ``address`` (RFC 9146 section 6)."""
        entry = self._entries.get(peer)
        if entry is None:
            return
        if self._by_address.get(entry.address) is peer:
            del self._by_address[entry.address]
        entry.address = address
        self._by_address[address] = peer

    def remove(self, peer: P) -> None:
        entry = self._entries.pop(peer, None)
        self._half_open.pop(peer, None)
        if entry is None:
            return
        if self._by_address.get(entry.address) is peer:
            del self._by_address[entry.address]
        if entry.cid and self.by_cid.get(entry.cid) is peer:
            del self.by_cid[entry.cid]

    def make_room(self, now: float) -> tuple[bool, list[tuple[P, str]]]:
        """Room for one more half-open handshake?  Returns (admit, evicted):
        the peers to evict first, each with why ("half_open": the oldest
        handshake that never completed; "stale": the least recently active
        peer, idle for ``stale_after``).  Established sessions that are not
        stale are never evicted: admit is False when only they fill the table."""
        evicted: list[tuple[P, str]] = []
        if self._half_open and len(self._half_open) >= self.max_half_open:
            evicted.append((next(iter(self._half_open)), "half_open"))
        elif len(self._entries) >= self.max_connections:
            oldest = next(iter(self._entries), None)
            if oldest is not None and now - self._entries[oldest].last_activity >= self.stale_after:
                evicted.append((oldest, "stale"))
            elif self._half_open:
                evicted.append((next(iter(self._half_open)), "half_open"))
            else:
                return False, []
        for peer, why in evicted:
            self.remove(peer)
            if why == "half_open":
                self.half_open_evictions += 1
                self._unreported_evictions += 1
        return True, evicted

    def pressure_report(self, now: float) -> int:
        """Half-open evictions to report now (0: nothing to say yet): at
        most one report per PRESSURE_REPORT_INTERVAL, so a flood makes a few
        log lines, not one per handshake."""
        if not self._unreported_evictions or now - self._reported_at < PRESSURE_REPORT_INTERVAL:
            return 0
        count, self._unreported_evictions = self._unreported_evictions, 0
        self._reported_at = now
        return count
