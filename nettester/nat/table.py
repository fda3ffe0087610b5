"""The sans-IO core of the NAT / load-balancer emulator.

A :class:`NatTable` maps each client source address to one NAT entry: an outgoing
socket (named by an integer key, opened by the adapter) and a destination,
picked at random when the entry is created and then sticky. Entries expire
after the NAT timeout without traffic. Destinations that stop answering for
the load-balancer timeout become stale (no new entries) and are probed back
after the same time. :class:`DropPolicy` decides which datagrams are lost on purpose.

Nothing here reads a clock or touches a socket: the time is an argument.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from zope.interface import implementer

from nettester.interfaces import INatTable

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one forwarded datagram goes: out of socket ``key`` to ``destination``.

    ``evicted`` is the socket key of the entry dropped to make room (``-n``), to close.
    """

    key: int
    destination: Address
    evicted: int | None = None


class Destination:
    """One load-balancer destination and what the table knows of its health."""

    __slots__ = ("name", "address", "usage", "unanswered_since", "stale_since")

    def __init__(self, name: str, address: Address) -> None:
        self.name = name
        self.address = address
        self.usage = 0
        # Time of the first datagram sent since the last answer; None when answered.
        self.unanswered_since: float | None = None
        # When it was declared stale; None while it is usable.
        self.stale_since: float | None = None


class NatEntry:
    """One client source address: its outgoing socket key and destination.

    ``route`` is kept up to date by the table, so forwarding allocates nothing.
    """

    __slots__ = ("client", "key", "destination", "last_used", "route")

    def __init__(self, client: Address, key: int, destination: Destination, now: float) -> None:
        self.client = client
        self.key = key
        self.destination = destination
        self.last_used = now
        self.route = Route(key, destination.address)

    def reroute(self) -> None:
        """Refresh ``route`` after the key or the destination changed."""
        self.route = Route(self.key, self.destination.address)


@implementer(INatTable)
class NatTable:
    """NAT entries and destinations; see the module docstring.

    :param nat_timeout: seconds an entry lives without traffic (``--tnat``).
    :param lb_timeout: seconds a destination may leave traffic unanswered
        before it is stale, and seconds before a stale one is probed (``--tlb``).
    :param max_entries: at most this many entries; the least recently used
        one makes room for a new client (``-n``).
    :param rng: the source of every random choice (seed it in tests).
    """

    def __init__(
        self,
        destinations: Iterable[tuple[str, Address]],
        nat_timeout: float = 30.0,
        lb_timeout: float = 15.0,
        max_entries: int = 10000,
        reverse_update: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.nat_timeout = nat_timeout
        self.lb_timeout = lb_timeout
        self.max_entries = max_entries
        self.reverse_update = reverse_update
        self._random = rng if rng is not None else random.Random()
        self._destinations: dict[Address, Destination] = {}
        # Least recently used first, so expiry and eviction look at the front only.
        self._entries: OrderedDict[Address, NatEntry] = OrderedDict()
        self._by_key: dict[int, NatEntry] = {}
        self._next_key = 1
        self.violations = 0
        self.evicted = 0
        self.stale_marked = 0
        for name, address in destinations:
            self.add_destination(name, address)

    # -- the hot path ---------------------------------------------------------

    def forward(self, client: Address, now: float) -> Route | None:
        entry = self._entries.get(client)
        evicted = None
        if entry is None:
            destination = self._pick(now, exclude=None)
            if destination is None:
                return None
            if len(self._entries) >= self.max_entries:
                evicted = self._remove(next(iter(self._entries.values())))
                self.evicted += 1
            entry = self._create(client, destination, now)
        else:
            entry.last_used = now
            self._entries.move_to_end(client)
            destination = entry.destination
            if destination.stale_since is not None or self._destinations.get(destination.address) is not destination:
                replacement = self._pick(now, exclude=None)
                if replacement is None:
                    return None
                self._move(entry, replacement)
                destination = replacement
        if destination.unanswered_since is None:
            destination.unanswered_since = now
        elif now - destination.unanswered_since > self.lb_timeout and len(self._destinations) > 1:
            self._mark_stale(destination, now)
            replacement = self._pick(now, exclude=destination)
            if replacement is not None:
                self._move(entry, replacement)
                destination = replacement
                if destination.unanswered_since is None:
                    destination.unanswered_since = now
        return entry.route if evicted is None else Route(entry.key, destination.address, evicted)

    def backward(self, socket_key: int, source: Address, now: float) -> Address | None:
        entry = self._by_key.get(socket_key)
        if entry is None:
            return None
        entry.last_used = now
        self._entries.move_to_end(entry.client)
        destination = entry.destination
        if source != destination.address:
            self.violations += 1
            answering = self._destinations.get(source)
            if answering is None:
                return entry.client
            if self.reverse_update:
                self._move(entry, answering)
            destination = answering
        destination.unanswered_since = None
        destination.stale_since = None
        return entry.client

    # -- timers -----------------------------------------------------------------

    def expire(self, now: float) -> list[int]:
        expired: list[int] = []
        limit = now - self.nat_timeout
        while self._entries:
            entry = next(iter(self._entries.values()))
            if entry.last_used > limit:
                break
            expired.append(self._remove(entry))
        return expired

    def next_deadline(self) -> float | None:
        if not self._entries:
            return None
        return next(iter(self._entries.values())).last_used + self.nat_timeout

    # -- console commands -------------------------------------------------------

    def clear(self, count: int | None) -> list[int]:
        entries = list(self._entries.values())
        if count is not None and count < len(entries):
            entries = self._random.sample(entries, count)
        return [self._remove(entry) for entry in entries]

    def reassign(self, now: float) -> list[int]:
        old_keys: list[int] = []
        for entry in list(self._entries.values()):
            destination = self._pick(now, exclude=None)
            old_keys.append(entry.key)
            del self._by_key[entry.key]
            entry.key = self._new_key()
            self._by_key[entry.key] = entry
            if destination is not None:
                self._move(entry, destination)
            else:
                entry.reroute()
        return old_keys

    def rebalance(self, now: float) -> tuple[int, int]:
        changed = 0
        for entry in self._entries.values():
            destination = self._pick(now, exclude=None)
            if destination is not None and destination is not entry.destination:
                self._move(entry, destination)
                changed += 1
        return changed, len(self._entries)

    def add_destination(self, name: str, address: Address) -> bool:
        if address in self._destinations:
            return False
        added = Destination(name, address)
        self._destinations[address] = added
        for entry in self._entries.values():
            if self._destinations.get(entry.destination.address) is not entry.destination:
                self._move(entry, added)  # left without a destination by remove_destination
        return True

    def remove_destination(self, address: Address) -> bool:
        removed = self._destinations.pop(address, None)
        if removed is None:
            return False
        for entry in self._entries.values():
            if entry.destination is removed:
                replacement = self._pick(None, exclude=None)
                if replacement is not None:
                    self._move(entry, replacement)
        return True

    def info(self) -> list[str]:
        mode = "enabled" if self.reverse_update else "disabled"
        lines = [f"{len(self._entries)} NAT entries, reverse address update {mode}."]
        lines.extend(
            f"Destination: {destination.name}, usage: {destination.usage}"
            for destination in self._destinations.values()
        )
        return lines

    # -- views ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def destinations(self) -> list[Destination]:
        """The destinations, in the order they were added."""
        return list(self._destinations.values())

    def destination_of(self, client: Address) -> Address | None:
        """The destination of ``client``'s entry, or None without an entry."""
        entry = self._entries.get(client)
        return entry.destination.address if entry is not None else None

    def key_of(self, client: Address) -> int | None:
        """The socket key of ``client``'s entry, or None without an entry."""
        entry = self._entries.get(client)
        return entry.key if entry is not None else None

    # -- internals --------------------------------------------------------------

    def _pick(self, now: float | None, exclude: Destination | None) -> Destination | None:
        """A random usable destination; a stale one is probed again once it
        has been stale for the load-balancer timeout."""
        usable = []
        for destination in self._destinations.values():
            if destination is exclude:
                continue
            if destination.stale_since is not None:
                if now is None or now - destination.stale_since < self.lb_timeout:
                    continue
                destination.stale_since = None
                destination.unanswered_since = None
            usable.append(destination)
        if not usable:
            return None
        return usable[self._random.randrange(len(usable))] if len(usable) > 1 else usable[0]

    def _mark_stale(self, destination: Destination, now: float) -> None:
        destination.stale_since = now
        destination.unanswered_since = None
        self.stale_marked += 1

    def _create(self, client: Address, destination: Destination, now: float) -> NatEntry:
        entry = NatEntry(client, self._new_key(), destination, now)
        destination.usage += 1
        self._entries[client] = entry
        self._by_key[entry.key] = entry
        return entry

    def _move(self, entry: NatEntry, destination: Destination) -> None:
        entry.destination.usage -= 1
        destination.usage += 1
        entry.destination = destination
        entry.reroute()

    def _remove(self, entry: NatEntry) -> int:
        del self._entries[entry.client]
        del self._by_key[entry.key]
        entry.destination.usage -= 1
        return entry.key

    def _new_key(self) -> int:
        key = self._next_key
        self._next_key += 1
        return key


# DTLS record header (RFC 6347 section 4.1): type, version {254, x}, epoch, sequence, length.
DTLS_HEADER_LENGTH = 13
DTLS_CONTENT_TYPES = frozenset({20, 21, 22, 23, 25})  # RFC 6347 4.1, RFC 9146 (tls12_cid = 25)
DTLS_MAJOR_VERSION = 254


def looks_like_dtls(datagram: bytes) -> bool:
    """True when the datagram starts with a DTLS 1.x record header (``-x``)."""
    return (
        len(datagram) >= DTLS_HEADER_LENGTH
        and datagram[0] in DTLS_CONTENT_TYPES
        and datagram[1] == DTLS_MAJOR_VERSION
    )


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """``-s SIZE[:PCT]``: datagrams longer than ``size`` bytes are dropped with ``percent`` % probability."""

    size: int
    percent: float = 100.0


def parse_size_limit(text: str) -> SizeLimit:
    """Parse ``SIZE`` or ``SIZE:PCT`` (SIZE at least 1, PCT 0..100)."""
    size_text, _, percent_text = text.partition(":")
    try:
        size = int(size_text)
        percent = float(percent_text) if percent_text else 100.0
    except ValueError:
        raise ValueError(f"expected SIZE or SIZE:PERCENT, e.g. 1000 or 1000:50, got {text!r}") from None
    if size < 1 or not 0.0 <= percent <= 100.0:
        raise ValueError(f"expected SIZE at least 1 and PERCENT 0-100, got {text!r}")
    return SizeLimit(size, percent)


class DropPolicy:
    """Which datagrams the emulator loses on purpose, and why.

    Each method returns a short drop reason (a metrics label) or None to pass;
    ``active`` is False when nothing is ever dropped, so callers can skip the calls.
    Percentages are 0..100; the random source is injected so tests are exact.
    """

    def __init__(
        self,
        forward_percent: float = 0.0,
        backward_percent: float = 0.0,
        size_limit: SizeLimit | None = None,
        dtls_only: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self._forward = forward_percent / 100.0
        self._backward = backward_percent / 100.0
        self._size_limit = size_limit
        self._dtls_only = dtls_only
        self._random = rng if rng is not None else random.Random()
        self.active = bool(forward_percent or backward_percent or size_limit or dtls_only)

    def forward_drop(self, datagram: bytes) -> str | None:
        """Why a client's datagram is dropped, or None."""
        return self._drop(datagram, self._forward, "forward_random")

    def backward_drop(self, datagram: bytes) -> str | None:
        """Why a destination's answer is dropped, or None."""
        return self._drop(datagram, self._backward, "backward_random")

    def _drop(self, datagram: bytes, probability: float, random_reason: str) -> str | None:
        if self._dtls_only and not looks_like_dtls(datagram):
            return "not_dtls"
        limit = self._size_limit
        if limit is not None and len(datagram) > limit.size and self._random.random() * 100.0 < limit.percent:
            return "size_limit"
        if probability and self._random.random() < probability:
            return random_reason
        return None
