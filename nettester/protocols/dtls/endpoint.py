"""The Twisted adapter of the DTLS engine: one UDP socket, many peers.

``DtlsEndpoint`` demultiplexes datagrams to ``DtlsConnection``s by CID
(tls12_cid records, RFC 9146) or by address and offers ``IDatagramLink`` so
CoAP runs over it unchanged.  Who gets a connection and who loses one
(cookies, fragmented ClientHellos, half-open and stale eviction) is decided
by the sans-IO ``peers.Admission`` and ``peers.PeerTable``; this adapter
feeds them and the connections ``reactor.seconds()`` and runs one pump per
peer.  A layer beneath (the cluster router) hands it records that arrived
elsewhere with ``routed_datagram_received`` and a ``DatagramRoute`` to answer
through.

For a cluster that survives the loss of a node, ``on_established`` reports
each new server connection (to replicate its ``snapshot``), ``unknown_cid``
lets the cluster handle records of connections this node does not hold, and
``adopt`` restores a replicated connection without a new handshake.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Protocol

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nettester.interfaces import IConnectionIdGenerator, IDatagramLink, IDatagramReceiver
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.dtls import record
from nettester.protocols.dtls.configuration import Address, DtlsConfiguration, Session
from nettester.protocols.dtls.connection import DtlsConnection
from nettester.protocols.dtls.cookie import CookieGate, Verdict
from nettester.protocols.dtls.events import (
    AddressChanged,
    ApplicationData,
    ConnectionClosed,
    DtlsEvent,
    HandshakeCompleted,
    RenegotiationRefused,
)
from nettester.protocols.dtls.peers import (
    DEFAULT_HALF_OPEN_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HALF_OPEN,
    DEFAULT_STALE_AFTER,
    Admission,
    PeerTable,
)
from nettester.protocols.dtls.snapshot import SnapshotError, restore_connection, snapshot_connection
from nettester.pump import CorePump
from nettester.reactor import Send, datagram_sender

log = Logger()

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_DATAGRAM",
    "DtlsConnectError",
    "DatagramRoute",
    "DtlsEndpoint",
    "DtlsPeer",
    "format_address",
]

MAX_DATAGRAM = 65535


def format_address(address: Address | None) -> str:
    """``host:port`` or ``[v6]:port``: how addresses are written in logs."""
    if address is None:
        return "-"
    host, port = address[0], address[1]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


class DatagramRoute(Protocol):
    """How to answer a peer whose records arrived through another node."""

    @property
    def name(self) -> str:
        """The route's name in the peer's context (read-only)."""

    def send(self, data: bytes, address: Address) -> None:
        """Deliver ``data`` to the peer at ``address`` along this route."""


class DtlsConnectError(Exception):
    """A client handshake ended without a session (the reason is the message)."""


class DtlsPeer:
    """The handle CoAP sees for one DTLS peer: stable across address changes."""

    __slots__ = (
        "connection",
        "address",
        "previous_address",
        "route",
        "last_activity",
        "pump",
        "_waiting",
    )

    def __init__(self, connection: DtlsConnection, address: Address) -> None:
        self.connection = connection
        self.address = address
        self.previous_address: Address | None = None
        self.route: DatagramRoute | None = None
        #: when the peer was last heard from (the cluster replication reads it)
        self.last_activity = 0.0
        #: drives ``connection`` (set by the endpoint that registers the peer)
        self.pump: CorePump | None = None
        self._waiting: list[defer.Deferred[DtlsPeer]] = []

    def __repr__(self) -> str:
        return "<DtlsPeer %s>" % format_address(self.address)


class DtlsCounters:
    """The endpoint's counters, exported through a MetricSet."""

    def __init__(self, metrics: MetricSet) -> None:
        self.handshakes = metrics.counter("handshakes_total", "DTLS handshakes completed")
        self.resumptions = metrics.counter("resumptions_total", "DTLS handshakes that resumed a session")
        self.failures = metrics.labeled_counter("failures_total", "DTLS handshakes failed", "reason")
        self.dropped = metrics.labeled_counter("dropped_total", "DTLS records or datagrams dropped", "reason")
        self.hello_verify = metrics.counter("hello_verify_requests_total", "HelloVerifyRequests sent")
        self.address_changes = metrics.counter("address_changes_total", "peer address changes by CID")
        self.evictions = metrics.counter("evictions_total", "stale connections evicted")
        self.half_open_evictions = metrics.counter(
            "half_open_evictions_total", "half-open DTLS handshakes evicted to make room for new ones"
        )
        self.fragment_evictions = metrics.counter(
            "client_hello_fragments_evicted_total", "partial ClientHellos forgotten (area full or timed out)"
        )
        self.renegotiations_refused = metrics.counter(
            "renegotiations_refused_total", "renegotiation attempts answered with no_renegotiation"
        )
        self.adopted = metrics.counter(
            "adopted_total", "DTLS connections restored from another node's snapshot"
        )


@implementer(IDatagramLink)
class DtlsEndpoint(DatagramProtocol):
    """DTLS 1.2 over one UDP socket, for a server, clients, or both.

    Listen with ``maxPacketSize=MAX_DATAGRAM``: Twisted's default (8192)
    would truncate a peer's flight sent as one large datagram.
    """

    scheme = "coaps"
    noisy = False  # a bench opens one per client: no "Starting protocol" line for each

    def __init__(
        self,
        clock: IReactorTime,
        server_configuration: DtlsConfiguration | None = None,
        client_configuration: DtlsConfiguration | None = None,
        receiver: IDatagramReceiver | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        stale_after: float = DEFAULT_STALE_AFTER,
        metrics: MetricSet | None = None,
        cookie_gate: CookieGate | None = None,
        resume_sessions: bool = True,
        max_half_open: int = DEFAULT_MAX_HALF_OPEN,
        half_open_timeout: float = DEFAULT_HALF_OPEN_TIMEOUT,
    ) -> None:
        """``resume_sessions``: a client reconnecting to a server resumes
        the last session it had with it.  ``max_half_open`` bounds the server
        handshakes in progress (the oldest goes first when a new one needs
        room), ``half_open_timeout`` is how long one may take."""
        self.clock = clock
        self.resume_sessions = resume_sessions
        self._client_sessions: dict[Address, Session] = {}
        self.receiver = receiver
        self.metrics = metrics if metrics is not None else MetricSet("dtls")
        self.counters = DtlsCounters(self.metrics)
        self.peers: PeerTable[DtlsPeer] = PeerTable(max_connections, stale_after, max_half_open)
        self.metrics.gauge("connections", "live DTLS connections", lambda: len(self.peers))
        self.metrics.gauge("half_open", "DTLS server handshakes in progress", lambda: self.peers.half_open)
        self.admission = Admission(cookie_gate or CookieGate(
            shared_secret=server_configuration.cookie_secret if server_configuration else None))
        self.server_configuration = (
            dataclasses.replace(
                server_configuration,
                cids_in_use=self.peers.by_cid,
                handshake_timeout=min(server_configuration.handshake_timeout, half_open_timeout),
            )
            if server_configuration
            else None
        )
        self.client_configuration = client_configuration
        self._sendto: Send | None = None
        generator = server_configuration.cid_generator if server_configuration else None
        client_cid = client_configuration.cid_length if client_configuration else None
        self._cid_generator: IConnectionIdGenerator | None = generator
        self.cid_length: int = generator.length if generator is not None else (client_cid or 0)
        if generator is not None and client_cid and client_cid != generator.length:
            raise ValueError("server and client CIDs on one endpoint must have one length")
        #: called with each server peer whose handshake just completed with a
        #: CID, so a cluster can replicate its snapshot; it must not raise
        self.on_established: Callable[[DtlsPeer], None] | None = None
        #: called with (cid, datagram, address, route) for a tls12_cid record
        #: whose CID no peer here has; True: the datagram was taken care of
        #: (adopted and fed again, or forwarded), so it is not counted as dropped
        self.unknown_cid: Callable[[bytes, bytes, Address, DatagramRoute | None], bool] | None = None

    @property
    def max_connections(self) -> int:
        return self.peers.max_connections

    @property
    def stale_after(self) -> float:
        return self.peers.stale_after

    # --- IDatagramLink -----------------------------------------------------------

    def send_datagram(self, data: bytes, peer: DtlsPeer) -> None:
        """Send ``data`` as one application data record to ``peer``."""
        connection = peer.connection
        if not connection.is_established:
            self.counters.dropped.inc("send_not_established")
            return
        # Sending changes no timer and makes no event: write at once.
        self._write(connection.seal_application_data(data), peer.address, peer.route)

    def connect(self, address: Address) -> defer.Deferred[DtlsPeer]:
        """Handshake with the server at ``address``: fires with the peer."""
        if self.client_configuration is None:
            return defer.fail(DtlsConnectError("no client configuration"))
        host, port = address
        if not (isIPAddress(host) or isIPv6Address(host)):
            resolve = getattr(self.clock, "resolve", None)
            if resolve is None:
                return defer.fail(DtlsConnectError("cannot resolve %s" % host))
            resolved: defer.Deferred[str] = resolve(host)
            return resolved.addCallback(lambda name: self.connect((name, port)))
        existing = self.peers.at_address(address)
        if existing is not None and existing.connection.is_established:
            return defer.succeed(existing)
        if existing is not None and not existing.connection.is_closed:
            return self._wait_for(existing)
        configuration = self.client_configuration
        session = self._client_sessions.get(address)
        if session is not None:
            # Resume the last session with this server (RFC 5246 section 7.3).
            configuration = dataclasses.replace(configuration, session=session)
        now = self.clock.seconds()
        peer = self._add_peer(DtlsConnection(configuration, address), address, now)
        waiting = self._wait_for(peer)
        peer.connection.connect(now)
        self._pump(peer)
        return waiting

    @staticmethod
    def _wait_for(peer: DtlsPeer) -> defer.Deferred[DtlsPeer]:
        """A Deferred that fires when ``peer``'s handshake ends; cancelling it (a caller's
        timeout) stops the wait only: the handshake goes on for any other waiter."""
        waiting: defer.Deferred[DtlsPeer] = defer.Deferred(lambda cancelled: peer._waiting.remove(cancelled))
        peer._waiting.append(waiting)
        return waiting

    def peer_context(self, peer: DtlsPeer) -> PeerContext:
        connection = peer.connection
        suite = connection.cipher_suite
        read_cid = connection.read_cid if connection.cid_negotiated else None
        node_id = None
        if read_cid and self._cid_generator is not None and not connection.is_client:
            # The node serving the session: the CID's node, or its successor after a takeover.
            node_id = self._cid_generator.node_id
        return PeerContext(
            address=peer.address,
            scheme=self.scheme,
            identity=connection.peer_identity,
            cipher_suite=suite.name if suite is not None else None,
            read_cid=read_cid,
            write_cid=connection.write_cid if connection.cid_negotiated else None,
            node_id=node_id,
            via=peer.route.name if peer.route is not None else None,
            previous_address=peer.previous_address,
        )

    # --- datagrams in ----------------------------------------------------------

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        self._receive(data, addr, None)

    def routed_datagram_received(self, data: bytes, address: Address, route: DatagramRoute) -> None:
        """Records from ``address`` that reached another node first; answers
        to that peer go back through ``route`` until it is heard directly."""
        self._receive(data, address, route)

    def _receive(self, data: bytes, address: Address, route: DatagramRoute | None) -> None:
        now = self.clock.seconds()
        cid = record.peek_cid(data, self.cid_length)
        peer: DtlsPeer | None
        if cid is not None:
            peer = self.peers.with_cid(cid)
            if peer is None:
                if self.unknown_cid is None or not self.unknown_cid(cid, data, address, route):
                    self.counters.dropped.inc("unknown_cid")
                return
        else:
            peer = self.peers.at_address(address)
            if peer is not None and (
                _is_new_client_hello(data, peer.connection)
                or (self.admission.fragments.assembling(address) and _is_client_hello(data))
            ):
                # A new handshake from a known address (the client restarted,
                # RFC 6347 section 4.2.8): only a valid cookie replaces the
                # old connection, so a spoofer cannot end it.
                peer = None
            if peer is None:
                admitted = self._admit(data, address, now, route)
                if admitted is None:
                    return
                peer, data = admitted
        peer.route = route
        peer.last_activity = now
        self.peers.touch(peer, now)
        peer.connection.receive_datagram(data, address, now)
        self._pump(peer)

    def _admit(
        self, data: bytes, address: Address, now: float, route: DatagramRoute | None
    ) -> tuple[DtlsPeer, bytes] | None:
        """A server peer for a ClientHello with a valid cookie and the
        datagram to feed it (a fragmented hello comes reassembled), else None."""
        if self.server_configuration is None:
            self.counters.dropped.inc("unknown_peer")
            return None
        result = self.admission.check(data, address, now)
        if result.evicted:
            self.counters.fragment_evictions.inc(result.evicted)
        if result.verdict is Verdict.VERIFY:
            self.counters.hello_verify.inc()
            self._write(result.reply, address, route)
            return None
        if result.verdict is Verdict.DROP:
            self.counters.dropped.inc(result.reason)
            return None
        admit, evicted = self.peers.make_room(now)
        for victim, why in evicted:
            self._evicted(victim, why)
        self._report_pressure(now)
        if not admit:
            self.counters.dropped.inc("max_connections")
            return None
        connection = DtlsConnection(self.server_configuration, address)
        return self._add_peer(connection, address, now, half_open=True), result.datagram

    def _evicted(self, peer: DtlsPeer, why: str) -> None:
        """``peer`` left the table to make room (``why``: stale or half_open)."""
        if why == "stale":
            self.counters.evictions.inc()
            log.info(
                "DTLS evicting stale connection {peer}", event="dtls_evicted", peer=format_address(peer.address)
            )
        else:
            self.counters.half_open_evictions.inc()
            log.debug(
                "DTLS evicting half-open handshake with {peer}",
                event="dtls_half_open_evicted",
                peer=format_address(peer.address),
            )
        self._forget(peer)

    def _report_pressure(self, now: float) -> None:
        evicted = self.peers.pressure_report(now)
        if evicted:
            log.warn(
                "DTLS half-open handshakes at their bound ({bound}): {evicted} evicted, oldest first, "
                "to admit new ones (a flood of clients that never finish?)",
                event="dtls_half_open_pressure",
                bound=min(self.peers.max_half_open, self.peers.max_connections),
                evicted=evicted,
                half_open=self.peers.half_open,
            )

    # --- the pump ----------------------------------------------------------------

    def _add_peer(self, connection: DtlsConnection, address: Address, now: float, half_open: bool = False) -> DtlsPeer:
        """Register a new peer at ``address``, replacing the one there."""
        peer = DtlsPeer(connection, address)
        peer.last_activity = now
        peer.pump = CorePump(self.clock, connection, partial(self._write_to, peer), partial(self._dispatch, peer))
        replaced = self.peers.add(peer, address, now, half_open)
        if replaced is not None:
            self._forget(replaced)
        return peer

    def _pump(self, peer: DtlsPeer) -> None:
        """Count the records the connection dropped, register its CID, then let
        its pump write, dispatch its events and re-arm its timer."""
        connection = peer.connection
        for reason, count in connection.take_dropped().items():
            self.counters.dropped.inc(reason, count)
        if connection.read_cid and self.peers.with_cid(connection.read_cid) is None and peer in self.peers:
            self.peers.set_cid(peer, connection.read_cid)
        assert peer.pump is not None  # every registered peer has one (_add_peer)
        peer.pump.pump()

    def _write_to(self, peer: DtlsPeer, datagram: bytes, _address: Address) -> None:
        """The pump's writer: to where the peer is now heard from, through its route."""
        self._write(datagram, peer.address, peer.route)

    def _dispatch(self, peer: DtlsPeer, event: DtlsEvent) -> None:
        if isinstance(event, ApplicationData):
            if self.receiver is not None:
                self.receiver.datagramReceived(event.data, peer)
        elif isinstance(event, HandshakeCompleted):
            self.peers.established(peer)
            self.counters.handshakes.inc()
            if event.resumed:
                self.counters.resumptions.inc()
            if peer.connection.is_client and event.session is not None and self.resume_sessions:
                self._client_sessions[peer.address] = event.session
            # debug: a busy server completes thousands per second; failures are info
            log.debug(
                "DTLS handshake with {peer} done: {suite} identity={identity} "
                "read_cid={read_cid} write_cid={write_cid}",
                event="dtls_handshake",
                peer=format_address(peer.address),
                suite=event.cipher_suite,
                identity=event.peer_identity,
                read_cid=event.read_cid.hex() if event.read_cid is not None else None,
                write_cid=event.write_cid.hex() if event.write_cid is not None else None,
            )
            waiting, peer._waiting = peer._waiting, []
            for deferred in waiting:
                deferred.callback(peer)
            if self.on_established is not None and not peer.connection.is_client and event.read_cid is not None:
                self.on_established(peer)
        elif isinstance(event, RenegotiationRefused):
            self.counters.renegotiations_refused.inc()
            log.info(
                "DTLS peer {peer} asked to renegotiate: refused with no_renegotiation, the session goes on",
                event="dtls_renegotiation_refused",
                peer=format_address(peer.address),
            )
        elif isinstance(event, AddressChanged):
            self.counters.address_changes.inc()
            self.peers.move(peer, event.current)
            peer.previous_address, peer.address = peer.address, event.current
            log.info(
                "DTLS peer moved from {previous} to {current} (CID)",
                event="dtls_address_changed",
                previous=format_address(event.previous),
                current=format_address(event.current),
            )
        elif isinstance(event, ConnectionClosed):
            if not peer.connection.is_established and event.reason not in ("closed", "close_notify"):
                self.counters.failures.inc(event.reason)
                log.info(
                    "DTLS handshake with {peer} failed: {reason}",
                    event="dtls_handshake_failed",
                    peer=format_address(peer.address),
                    reason=event.description,
                    alert=event.reason,
                )
            waiting, peer._waiting = peer._waiting, []
            for deferred in waiting:
                deferred.errback(DtlsConnectError(event.description))
            self._remove(peer)

    def _remove(self, peer: DtlsPeer) -> None:
        self.peers.remove(peer)
        self._forget(peer)

    @staticmethod
    def _forget(peer: DtlsPeer) -> None:
        """Stop the timer of a peer that left the table."""
        if peer.pump is not None:
            peer.pump.stop()

    def startProtocol(self) -> None:
        self._sendto = datagram_sender(self.transport, self._send_failed)

    def stopProtocol(self) -> None:
        self._sendto = None

    def _write(self, data: bytes, address: Address, route: DatagramRoute | None) -> None:
        if route is not None:
            route.send(data, address)
            return
        sendto = self._sendto
        try:
            if sendto is not None:
                sendto(data, address)
            elif self.transport is not None:
                self.transport.write(data, address)
        except OSError as error:
            self._send_failed(error, address)

    def _send_failed(self, error: OSError, address: Address) -> None:
        self.counters.dropped.inc("send_error")
        log.debug("DTLS send to {peer} failed: {error}", event="dtls_send_failed", peer=format_address(address),
                  error=error)

    # --- cluster fail-over ------------------------------------------------------------

    def snapshot(self, cid: bytes) -> bytes | None:
        """The snapshot of the established server connection whose read CID
        is ``cid``, else None.  It holds key material: send it encrypted only."""
        peer = self.peers.with_cid(cid)
        if peer is None or peer.connection.is_client or not peer.connection.is_established:
            return None
        return snapshot_connection(peer.connection)

    def adopt(self, snapshot: bytes, address: Address, route: DatagramRoute | None, sequence_gap: int) -> DtlsPeer:
        """Continue the connection of ``snapshot`` (taken on a node that is
        gone) here, without a handshake: registered by CID and by address
        like a handshake-made peer, replacing a peer with the same read CID;
        answers go through ``route`` when given.

        ``address`` is where the datagram that prompted the adoption came
        from.  It is not authenticated yet, so the peer is registered at the
        address the owner last authenticated (the snapshot's): feed that
        datagram in again after adopt, and the peer moves to ``address`` only
        if its record authenticates (RFC 9146 section 6).  ``sequence_gap``:
        see ``restore_connection``.  Raises ``SnapshotError``.
        """
        if self.server_configuration is None:
            raise SnapshotError("not_server")
        try:
            connection = restore_connection(self.server_configuration, snapshot, sequence_gap)
        except SnapshotError as error:
            self.counters.dropped.inc("bad_snapshot")
            log.info("DTLS snapshot rejected: {reason}", event="dtls_adopt_failed", reason=error.reason)
            raise
        cid = connection.read_cid
        existing = self.peers.with_cid(cid) if cid else None
        if existing is not None:
            self._remove(existing)
        assert connection.peer_address is not None  # restore_connection checks it
        peer = self._add_peer(connection, connection.peer_address, self.clock.seconds())
        peer.route = route
        self.peers.set_cid(peer, cid)
        self.counters.adopted.inc()
        log.info(
            "DTLS connection {cid} adopted from a snapshot, peer {peer}",
            event="dtls_adopted",
            cid=cid.hex(),
            peer=format_address(peer.address),
            source=format_address(address),
        )
        return peer

    # --- introspection -------------------------------------------------------------

    def summary(self) -> dict[str, int]:
        """The counters for a role's summary line (IReportingService.summary)."""
        counters = self.counters
        return {
            "dtls_connections": len(self.peers),
            "dtls_handshakes": counters.handshakes.value,
            "dtls_resumed": counters.resumptions.value,
            "dtls_failed": counters.failures.total,
            "dtls_hello_verify": counters.hello_verify.value,
            "dtls_dropped": counters.dropped.total,
            "dtls_moved": counters.address_changes.value,
            "dtls_evicted": counters.evictions.value,
            "dtls_half_open_evicted": counters.half_open_evictions.value,
            "dtls_adopted": counters.adopted.value,
        }

    @property
    def connections(self) -> list[DtlsPeer]:
        return list(self.peers)

    def peer_by_connection_id(self, cid: bytes) -> DtlsPeer | None:
        return self.peers.with_cid(cid)

    def close_all(self) -> None:
        """Send close_notify to every peer (on service stop)."""
        for peer in list(self.peers):
            peer.connection.close()
            self._pump(peer)


_CLIENT_RANDOM = slice(record.HEADER_LENGTH + 12 + 2, record.HEADER_LENGTH + 12 + 2 + 32)
_FRAGMENT_OFFSET = slice(record.HEADER_LENGTH + 6, record.HEADER_LENGTH + 9)


def _is_client_hello(data: bytes) -> bool:
    """A datagram that starts with an epoch-0 ClientHello (fragment)."""
    return (
        len(data) > record.HEADER_LENGTH
        and data[0] == record.HANDSHAKE
        and data[3:5] == b"\x00\x00"
        and data[record.HEADER_LENGTH] == 1
    )


def _is_new_client_hello(data: bytes, connection: DtlsConnection) -> bool:
    """An epoch-0 ClientHello to a server connection, with another random
    than the hello that connection serves (not a retransmission)."""
    return (
        not connection.is_client
        and len(data) >= _CLIENT_RANDOM.stop
        and _is_client_hello(data)
        and data[_FRAGMENT_OFFSET] == b"\x00\x00\x00"  # the first fragment holds the random
        and data[_CLIENT_RANDOM] != connection.client_random
    )
