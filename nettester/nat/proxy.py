"""The Twisted UDP adapter of the NAT / load-balancer emulator.

One public socket receives the clients' datagrams; every NAT entry gets its
own outgoing socket (its own source port), opened on the first datagram the
table routes through it and closed when the table drops the entry. Answers
arriving on an outgoing socket go back out of the public socket to the
client, so the client only ever sees the address it talked to.

Destinations may mix IPv4 and IPv6: an entry opens one outgoing socket per
address family it is routed to (a second one only when a rebalance, a stale
destination or a reverse update moves it to the other family), and all of an
entry's sockets close together.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.error import MessageLengthError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.addresses import address_text, ip_family, parse_host_port
from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.nat.table import Address, DropPolicy, NatTable
from nettester.reactor import DatagramSocket, datagram_sender, listen_udp

log = Logger()

RESOLVE_RETRY = 5.0


class _PublicProtocol(DatagramProtocol):
    """The listening socket: every datagram is a client's, to forward."""

    noisy = False

    def __init__(self, proxy: NatProxy) -> None:
        self._proxy = proxy

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self._proxy.forward_datagram(datagram, addr)


Receive = Callable[[bytes, Address], None]


class OutgoingSocket(DatagramSocket):
    """One NAT entry's outgoing UDP socket, read by the reactor directly.

    Twisted's udp.Port logs a line when it opens and another when it closes;
    with one socket per NAT entry that is two info lines per client, so the
    NAT registers plain non-blocking sockets (``DatagramSocket``) with
    IReactorFDSet instead.

    :raises OSError: when no socket can be opened (e.g. too many open files).
    """

    __slots__ = ("_reactor", "_receive")

    def __init__(self, reactor: Any, family: int, receive: Receive) -> None:
        super().__init__(family, "::" if family == socket.AF_INET6 else "0.0.0.0")
        self._reactor = reactor
        self._receive = receive
        reactor.addReader(self)

    def logPrefix(self) -> str:
        return "nat-outgoing"

    def datagram_received(self, datagram: bytes, source: Any) -> None:
        self._receive(datagram, (source[0], source[1]))

    def read_failed(self, error: OSError) -> bool:
        return True  # e.g. ECONNREFUSED: an ICMP port unreachable for an earlier datagram

    def write(self, datagram: bytes, address: Address) -> None:
        """Send; raises OSError when the kernel refuses (full buffer, no route)."""
        self.socket.sendto(datagram, address)

    def stopListening(self) -> None:
        self._reactor.removeReader(self)
        self.socket.close()


@implementer(IReportingService)
class NatProxy(Service):
    """The ``nat`` role's service: public socket, outgoing sockets, expiry timer.

    :param reactor: IReactorUDP, IReactorFDSet, IReactorTime and IReactorCore (name resolution).
    :param destinations: ``host:port`` texts; host names are resolved at start.
    :param open_socket: ``open_socket(family, receive)`` opens one entry's
        outgoing socket (default: an :class:`OutgoingSocket`); tests pass fakes.
    """

    def __init__(
        self,
        reactor: Any,
        table: NatTable,
        policy: DropPolicy,
        listen: tuple[str, int],
        destinations: Iterable[str] = (),
        open_socket: Callable[[int, Receive], Any] | None = None,
    ) -> None:
        self._reactor = reactor
        self._open_socket = open_socket or (lambda family, receive: OutgoingSocket(reactor, family, receive))
        self.table = table
        self._policy = policy
        self._listen = listen
        self._initial_destinations = list(destinations)
        self._public: Any = None
        self._public_sendto: Callable[[bytes, Address], Any] | None = None
        # Entry key -> address family -> that entry's outgoing socket for the family.
        self._sockets: dict[int, dict[int, Any]] = {}
        self._timer: IDelayedCall | None = None
        self._retries: dict[str, IDelayedCall] = {}
        self.metrics = MetricSet("nat")
        self._forwarded = self.metrics.counter("forwarded_total", "Datagrams forwarded to a destination.")
        self._backwarded = self.metrics.counter("backwarded_total", "Answers sent back to a client.")
        self._new_entries = self.metrics.counter("entries_created_total", "NAT entries created.")
        self._expired = self.metrics.counter("expired_total", "NAT entries expired by --tnat.")
        self.dropped = self.metrics.labeled_counter("dropped_total", "Datagrams dropped, by reason.", "reason")
        self.metrics.gauge("entries", "Live NAT entries.", lambda: len(self.table))
        self.metrics.gauge("destinations", "Configured destinations.", lambda: len(self.table.destinations()))
        self.metrics.gauge("violations", "Answers from another address than the entry's destination.",
                           lambda: self.table.violations)

    # -- service ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        interface, port = self._listen
        self._public = listen_udp(self._reactor, port, _PublicProtocol(self), interface)
        fast = getattr(self._public, "getHandle", None) is not None  # a test's fake port has only write
        self._public_sendto = datagram_sender(self._public, self._public_send_failed) if fast else self._public.write
        log.info(
            "NAT listening on {address}, {count} destinations, reverse address update {mode}",
            event="nat_start",
            address=address_text((interface, self.port)) if interface else f"*:{self.port}",
            count=len(self._initial_destinations),
            mode="enabled" if self.table.reverse_update else "disabled",
        )
        for name in self._initial_destinations:
            self._add_initial_destination(name)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for delayed in [self._timer, *self._retries.values()]:
            if delayed is not None and delayed.active():
                delayed.cancel()
        self._timer = None
        self._retries.clear()
        closing = [maybeDeferred(port.stopListening) for sockets in self._sockets.values() for port in sockets.values()]
        self._sockets.clear()
        if self._public is not None:
            closing.append(maybeDeferred(self._public.stopListening))
            self._public = None
        return gatherResults(closing)

    @property
    def listen_address(self) -> tuple[str, int]:
        """The ``[interface]:port`` asked for (the listening argument)."""
        return self._listen

    @property
    def port(self) -> int:
        """The public port's real number (useful with port 0)."""
        return self._public.getHost().port

    def summary(self) -> dict[str, Any]:
        return {
            "entries": len(self.table),
            "destinations": len(self.table.destinations()),
            "forwarded": self._forwarded.value,
            "backwarded": self._backwarded.value,
            "dropped": self.dropped.total,
            "violations": self.table.violations,
            "expired": self._expired.value,
        }

    # -- the hot path -----------------------------------------------------------

    def forward_datagram(self, datagram: bytes, client: Address) -> None:
        """A client's datagram: drop it on purpose, or send it out of its entry's socket."""
        if self._policy.active:
            reason = self._policy.forward_drop(datagram)
            if reason is not None:
                self.dropped.inc(reason)
                return
        route = self.table.forward(client, self._reactor.seconds())
        if route is None:
            self.dropped.inc("no_destination")
            return
        if route.evicted is not None:
            self._close((route.evicted,))
        destination = route.destination
        # Destinations are IP literals once resolved: a colon means IPv6.
        family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
        sockets = self._sockets.get(route.key)
        outgoing = sockets.get(family) if sockets is not None else None
        if outgoing is None:
            outgoing = self._open(route.key, family)
            if outgoing is None:
                self.dropped.inc("no_socket")
                return
            if sockets is None:
                log.debug("New NAT entry {client} -> {destination}", event="nat_entry", client=address_text(client),
                          destination=address_text(destination))
        try:
            outgoing.write(datagram, route.destination)
        except OSError:
            self.dropped.inc("send_error")
            return
        self._forwarded.value += 1

    def backward_datagram(self, key: int, datagram: bytes, source: Address) -> None:
        """An answer on entry ``key``'s socket: send it back to the entry's client."""
        client = self.table.backward(key, source, self._reactor.seconds())
        if client is None:
            self.dropped.inc("unknown_entry")
            return
        if self._policy.active:
            reason = self._policy.backward_drop(datagram)
            if reason is not None:
                self.dropped.inc(reason)
                return
        assert self._public_sendto is not None  # set by startService, before any entry exists
        try:
            self._public_sendto(datagram, client)
        except (OSError, MessageLengthError):
            self.dropped.inc("send_error")
            return
        self._backwarded.value += 1

    def _public_send_failed(self, _error: OSError, _client: Address) -> None:
        """An answer to a client refused after it was counted as sent (a send batched by the public port)."""
        self.dropped.inc("send_error")
        self._backwarded.value -= 1

    def _open(self, key: int, family: int) -> Any:
        """Open entry ``key``'s outgoing socket for ``family``; None (logged) when the OS refuses."""
        try:
            outgoing = self._open_socket(family, partial(self.backward_datagram, key))
        except OSError as error:
            log.error("No outgoing socket for a new NAT entry: {error}; raise the open-files limit or lower -n",
                      event="nat_socket_failed", error=error)
            return None
        sockets = self._sockets.get(key)
        if sockets is None:
            sockets = self._sockets[key] = {}
            self._new_entries.value += 1
        sockets[family] = outgoing
        if self._timer is None:
            self._arm(self.table.next_deadline())
        return outgoing

    def _close(self, keys: Iterable[int]) -> int:
        """Close the sockets of the entries ``keys``; how many entries had any."""
        closed = 0
        for key in keys:
            sockets = self._sockets.pop(key, None)
            if sockets is not None:
                for outgoing in sockets.values():
                    outgoing.stopListening()
                closed += 1
        return closed

    def _arm(self, deadline: float | None) -> None:
        self._timer = None
        if deadline is not None:
            self._timer = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), self._expire)

    def _expire(self) -> None:
        expired = self.table.expire(self._reactor.seconds())
        self._expired.value += self._close(expired)
        self._arm(self.table.next_deadline())

    # -- console commands ---------------------------------------------------------

    def clear(self, count: int | None) -> int:
        """Drop ``count`` random entries (all when None); their clients get new ports."""
        return self._close(self.table.clear(count))

    def reassign(self) -> int:
        """New outgoing port and new random destination for every entry."""
        return self._close(self.table.reassign(self._reactor.seconds()))

    def rebalance(self) -> tuple[int, int]:
        """New random destination for every entry, same outgoing port."""
        return self.table.rebalance(self._reactor.seconds())

    def set_reverse(self, enabled: bool) -> None:
        self.table.reverse_update = enabled

    def add_destination(self, name: str) -> Deferred[str]:
        """Resolve ``host:port`` and add it; fires with the console's answer line."""
        try:
            host, port = parse_host_port(name)
        except ValueError as error:
            return succeed(str(error))

        def failed(failure: Failure) -> str:
            log.error("Destination {destination} not resolved: {error}; check the host name",
                      event="nat_destination_unresolved", destination=name, error=failure.getErrorMessage())
            return f"cannot resolve {host}: {failure.getErrorMessage()}"

        return self._resolve(host).addCallbacks(self._add_resolved, failed, callbackArgs=(name, port))

    def _add_initial_destination(self, name: str) -> None:
        """A destination of the command line: retried until it resolves, because in
        Kubernetes the NAT often starts before the pods it balances have DNS names."""
        host, port = parse_host_port(name)

        def retry(failure: Failure) -> None:
            log.warn("Destination {destination} not resolved yet ({error}); retrying in {delay:g} s",
                     event="nat_destination_retry", destination=name, error=failure.getErrorMessage(),
                     delay=RESOLVE_RETRY)
            if self.running:
                self._retries[name] = self._reactor.callLater(RESOLVE_RETRY, self._add_initial_destination, name)

        self._resolve(host).addCallbacks(self._add_resolved, retry, callbackArgs=(name, port))

    def _resolve(self, host: str) -> Deferred[str]:
        return succeed(host) if ip_family(host) is not None else self._reactor.resolve(host)

    def _add_resolved(self, address: str, name: str, port: int) -> str:
        if not self.table.add_destination(name, (address, port)):
            return f"destination {name} is already there."
        log.info("Destination added {destination} ({address})", event="nat_destination_added",
                 destination=name, address=address_text((address, port)))
        return f"added destination {name}."

    def remove_destination(self, name: str) -> str:
        """Remove the destination added as ``name`` (or with that address)."""
        for destination in self.table.destinations():
            if name in (destination.name, f"{destination.address[0]}:{destination.address[1]}"):
                self.table.remove_destination(destination.address)
                log.info("Destination removed {destination}", event="nat_destination_removed", destination=name)
                return f"removed destination {name}."
        return f"unknown destination {name}; 'info' lists them."
