"""The Twisted adapter of the DTLS engine: one UDP socket, many peers.

``DtlsEndpoint`` demultiplexes datagrams to ``DtlsConnection``s by CID
(tls12_cid records, RFC 9146) or by address, creates server connections only
after a valid stateless cookie, bounds the live connections, and offers
``IDatagramLink`` so CoAP runs over it unchanged.  A layer beneath (the
cluster router) hands it records that arrived elsewhere with
``routedDatagramReceived`` and a ``DatagramRoute`` to answer through.

For a cluster that survives the loss of a node, ``on_established`` reports
each new server connection (to replicate its ``snapshot``), ``unknown_cid``
lets the cluster handle records of connections this node does not hold, and
``adopt`` restores a replicated connection without a new handshake.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Protocol

from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from nettester.interfaces import IDatagramLink, IDatagramReceiver
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.dtls import record
from nettester.protocols.dtls.connection import (
    AddressChanged,
    ApplicationData,
    ConnectionClosed,
    DtlsConfiguration,
    DtlsConnection,
    HandshakeCompleted,
    Session,
)
from nettester.protocols.dtls.cookie import CookieGate, Verdict
from nettester.protocols.dtls.snapshot import SnapshotError, restore_connection, snapshot_connection

log = Logger()

Address = tuple[str, int]
DEFAULT_MAX_CONNECTIONS = 10000
MAX_DATAGRAM = 65535
DEFAULT_STALE_AFTER = 300.0


class DatagramRoute(Protocol):
    """How to answer a peer whose records arrived through another node."""

    name: str

    def send(self, data: bytes, address: Address) -> None:
        """Deliver C{data} to the peer at C{address} along this route."""


class ConnectFailed(Exception):
    """A client handshake ended without a session (the reason is the message)."""


class DtlsPeer:
    """The handle CoAP sees for one DTLS peer: stable across address changes."""

    __slots__ = (
        "connection",
        "address",
        "previous_address",
        "route",
        "last_activity",
        "_timer",
        "_timer_at",
        "_waiting",
    )

    def __init__(self, connection: DtlsConnection, address: Address) -> None:
        self.connection = connection
        self.address = address
        self.previous_address: Address | None = None
        self.route: DatagramRoute | None = None
        self.last_activity = 0.0
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._waiting: list[defer.Deferred[DtlsPeer]] = []

    def __repr__(self) -> str:
        return "<DtlsPeer %s:%d>" % self.address


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
    ) -> None:
        """C{resume_sessions}: a client reconnecting to a server resumes
        the last session it had with it."""
        self.clock = clock
        self.resume_sessions = resume_sessions
        self._client_sessions: dict[Address, Session] = {}
        self.receiver = receiver
        self.max_connections = max_connections
        self.stale_after = stale_after
        self.metrics = metrics if metrics is not None else MetricSet("dtls")
        self.counters = DtlsCounters(self.metrics)
        self.metrics.gauge("connections", "live DTLS connections", lambda: len(self._peers))
        self._gate = cookie_gate or CookieGate()
        self._by_cid: dict[bytes, DtlsPeer] = {}
        self._by_address: dict[Address, DtlsPeer] = {}
        # insertion order = least recently active first
        self._peers: OrderedDict[DtlsPeer, None] = OrderedDict()
        self.server_configuration = (
            dataclasses.replace(server_configuration, cids_in_use=self._by_cid) if server_configuration else None
        )
        self.client_configuration = client_configuration
        self._sendto: Callable[[bytes, Address], int] | None = None
        generator = server_configuration.cid_generator if server_configuration else None
        client_cid = client_configuration.cid_length if client_configuration else None
        self._cid_generator = generator
        self.cid_length = generator.length if generator is not None else (client_cid or 0)
        if generator is not None and client_cid and client_cid != generator.length:
            raise ValueError("server and client CIDs on one endpoint must have one length")
        #: called with each server peer whose handshake just completed with a
        #: CID, so a cluster can replicate its snapshot; it must not raise
        self.on_established: Callable[[DtlsPeer], None] | None = None
        #: called with (cid, datagram, address, route) for a tls12_cid record
        #: whose CID no peer here has; True: the datagram was taken care of
        #: (adopted and fed again, or forwarded), so it is not counted as dropped
        self.unknown_cid: Callable[[bytes, bytes, Address, DatagramRoute | None], bool] | None = None

    # --- IDatagramLink -----------------------------------------------------------

    def sendDatagram(self, data: bytes, peer: DtlsPeer) -> None:
        """Send C{data} as one application data record to C{peer}."""
        connection = peer.connection
        if not connection.is_established:
            self.counters.dropped.inc("send_not_established")
            return
        # Sending changes no timer and makes no event: write at once.
        self._write(connection.seal_application_data(data), peer.address, peer.route)

    def connect(self, address: Address) -> defer.Deferred[DtlsPeer]:
        """Handshake with the server at C{address}: fires with the peer."""
        if self.client_configuration is None:
            return defer.fail(ConnectFailed("no client configuration"))
        host, port = address
        if not (isIPAddress(host) or isIPv6Address(host)):
            resolve = getattr(self.clock, "resolve", None)
            if resolve is None:
                return defer.fail(ConnectFailed("cannot resolve %s" % host))
            return resolve(host).addCallback(lambda resolved: self.connect((resolved, port)))
        existing = self._by_address.get(address)
        if existing is not None and existing.connection.is_established:
            return defer.succeed(existing)
        waiting: defer.Deferred[DtlsPeer] = defer.Deferred()
        if existing is not None and not existing.connection.is_closed:
            existing._waiting.append(waiting)
            return waiting
        configuration = self.client_configuration
        session = self._client_sessions.get(address)
        if session is not None:
            # Resume the last session with this server (RFC 5246 section 7.3).
            configuration = dataclasses.replace(configuration, session=session)
        peer = self._add_peer(DtlsConnection(configuration, address, self.counters.dropped.inc), address)
        peer._waiting.append(waiting)
        peer.connection.connect(self.clock.seconds())
        self._pump(peer)
        return waiting

    def peerContext(self, peer: DtlsPeer) -> PeerContext:
        connection = peer.connection
        suite = connection.cipher_suite
        read_cid = connection.read_cid if connection.cid_negotiated else None
        node_id = None
        if read_cid and self._cid_generator is not None and not connection.is_client:
            # The node serving the session: the CID's node, or its successor after a takeover.
            node_id = self._cid_generator.nodeId
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

    def datagramReceived(self, data: bytes, addr: Address) -> None:  # type: ignore[override]
        self._receive(data, addr, None)

    def routedDatagramReceived(self, data: bytes, address: Address, route: DatagramRoute) -> None:
        """Records from C{address} that reached another node first; answers
        to that peer go back through C{route} until it is heard directly."""
        self._receive(data, address, route)

    def _receive(self, data: bytes, address: Address, route: DatagramRoute | None) -> None:
        now = self.clock.seconds()
        cid = record.peek_cid(data, self.cid_length)
        if cid is not None:
            peer = self._by_cid.get(cid)
            if peer is None:
                if self.unknown_cid is None or not self.unknown_cid(cid, data, address, route):
                    self.counters.dropped.inc("unknown_cid")
                return
        else:
            peer = self._by_address.get(address)
            if peer is not None and _is_new_client_hello(data, peer.connection):
                # A new handshake from a known address (the client restarted,
                # RFC 6347 section 4.2.8): only a valid cookie replaces the
                # old connection, so a spoofer cannot end it.
                peer = None
            if peer is None:
                peer = self._admit(data, address, now, route)
                if peer is None:
                    return
        peer.route = route
        peer.last_activity = now
        self._peers.move_to_end(peer)
        peer.connection.receive_datagram(data, now, address)
        self._pump(peer, now)

    def _admit(self, data: bytes, address: Address, now: float, route: DatagramRoute | None) -> DtlsPeer | None:
        """A server connection for a ClientHello with a valid cookie, else None."""
        if self.server_configuration is None:
            self.counters.dropped.inc("unknown_peer")
            return None
        result = self._gate.check(data, address, now)
        if result.verdict is Verdict.VERIFY:
            self.counters.hello_verify.inc()
            self._write(result.reply, address, route)
            return None
        if result.verdict is Verdict.DROP:
            self.counters.dropped.inc(result.reason)
            return None
        if len(self._peers) >= self.max_connections and not self._evict_stale(now):
            self.counters.dropped.inc("max_connections")
            return None
        connection = DtlsConnection(self.server_configuration, address, self.counters.dropped.inc)
        return self._add_peer(connection, address)

    def _evict_stale(self, now: float) -> bool:
        """Drop the least recently active connection if it is stale."""
        oldest = next(iter(self._peers), None)
        if oldest is None or now - oldest.last_activity < self.stale_after:
            return False
        self.counters.evictions.inc()
        log.info("DTLS evicting stale connection {peer}", event="dtls_evicted", peer=oldest.address)
        self._remove(oldest)
        return True

    # --- the pump ----------------------------------------------------------------

    def _add_peer(self, connection: DtlsConnection, address: Address) -> DtlsPeer:
        """Register a new peer at C{address}, replacing the one there."""
        previous = self._by_address.get(address)
        if previous is not None:
            self._remove(previous)
        peer = DtlsPeer(connection, address)
        peer.last_activity = self.clock.seconds()
        self._peers[peer] = None
        self._by_address[address] = peer
        return peer

    def _pump(self, peer: DtlsPeer, now: float | None = None) -> None:
        """Write what the connection wants written, dispatch its events,
        re-arm its timer."""
        connection = peer.connection
        if now is None:
            now = self.clock.seconds()
        for datagram in connection.datagrams_to_send(now):
            self._write(datagram, peer.address, peer.route)
        if connection.read_cid and connection.read_cid not in self._by_cid:
            self._by_cid[connection.read_cid] = peer
        while (event := connection.next_event()) is not None:
            self._dispatch(peer, event)
        if peer not in self._peers:
            return
        timer_at = connection.get_timer()
        if timer_at != peer._timer_at:
            if peer._timer is not None and peer._timer.active():
                peer._timer.cancel()
            peer._timer = None
            if timer_at is not None:
                peer._timer = self.clock.callLater(max(0.0, timer_at - now), self._fire_timer, peer)
            peer._timer_at = timer_at

    def _fire_timer(self, peer: DtlsPeer) -> None:
        peer._timer = None
        peer._timer_at = None
        peer.connection.handle_timer(self.clock.seconds())
        self._pump(peer)

    def _dispatch(self, peer: DtlsPeer, event: object) -> None:
        if isinstance(event, ApplicationData):
            if self.receiver is not None:
                self.receiver.datagramReceived(event.data, peer)
        elif isinstance(event, HandshakeCompleted):
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
                peer=peer.address,
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
        elif isinstance(event, AddressChanged):
            self.counters.address_changes.inc()
            if self._by_address.get(peer.address) is peer:
                del self._by_address[peer.address]
            peer.previous_address, peer.address = peer.address, event.current
            self._by_address[event.current] = peer
            log.info(
                "DTLS peer moved from {previous} to {current} (CID)",
                event="dtls_address_changed",
                previous=event.previous,
                current=event.current,
            )
        elif isinstance(event, ConnectionClosed):
            if not peer.connection.is_established and event.reason not in ("closed", "close_notify"):
                self.counters.failures.inc(event.reason)
                log.info(
                    "DTLS handshake with {peer} failed: {reason}",
                    event="dtls_handshake_failed",
                    peer=peer.address,
                    reason=event.reason,
                )
            waiting, peer._waiting = peer._waiting, []
            for deferred in waiting:
                deferred.errback(ConnectFailed(event.reason))
            self._remove(peer)

    def _remove(self, peer: DtlsPeer) -> None:
        self._peers.pop(peer, None)
        if self._by_address.get(peer.address) is peer:
            del self._by_address[peer.address]
        cid = peer.connection.read_cid
        if cid and self._by_cid.get(cid) is peer:
            del self._by_cid[cid]
        if peer._timer is not None and peer._timer.active():
            peer._timer.cancel()
        peer._timer = None

    def startProtocol(self) -> None:
        # Straight to the socket: Port.write re-validates the address text on
        # every datagram (see nettester.udplink).
        self._sendto = self.transport.getHandle().sendto  # type: ignore[union-attr]

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
            self.counters.dropped.inc("send_error")
            log.debug("DTLS send to {peer} failed: {error}", event="dtls_send_failed", peer=address, error=error)

    # --- cluster fail-over ------------------------------------------------------------

    def snapshot(self, cid: bytes) -> bytes | None:
        """The snapshot of the established server connection whose read CID
        is C{cid}, else None.  It holds key material: send it encrypted only."""
        peer = self._by_cid.get(cid)
        if peer is None or peer.connection.is_client or not peer.connection.is_established:
            return None
        return snapshot_connection(peer.connection)

    def adopt(self, snapshot: bytes, address: Address, route: DatagramRoute | None, sequence_gap: int) -> DtlsPeer:
        """Continue the connection of C{snapshot} (taken on a node that is
        gone) here, without a handshake: registered by CID and by address
        like a handshake-made peer, replacing a peer with the same read CID;
        answers go through C{route} when given.

        C{address} is where the datagram that prompted the adoption came
        from.  It is not authenticated yet, so the peer is registered at the
        address the owner last authenticated (the snapshot's): feed that
        datagram in again after adopt, and the peer moves to C{address} only
        if its record authenticates (RFC 9146 section 6).  C{sequence_gap}:
        see L{restore_connection}.  Raises L{SnapshotError}.
        """
        if self.server_configuration is None:
            raise SnapshotError("not_server")
        try:
            connection = restore_connection(
                self.server_configuration, snapshot, sequence_gap, drop_sink=self.counters.dropped.inc
            )
        except SnapshotError as error:
            self.counters.dropped.inc("bad_snapshot")
            log.info("DTLS snapshot rejected: {reason}", event="dtls_adopt_failed", reason=error.reason)
            raise
        cid = connection.read_cid
        existing = self._by_cid.get(cid) if cid else None
        if existing is not None:
            self._remove(existing)
        peer = self._add_peer(connection, connection.peer_address)
        peer.route = route
        if cid:
            self._by_cid[cid] = peer
        self.counters.adopted.inc()
        log.info(
            "DTLS connection {cid} adopted from a snapshot, peer {peer}",
            event="dtls_adopted",
            cid=cid.hex(),
            peer=peer.address,
            source=address,
        )
        return peer

    # --- introspection -------------------------------------------------------------

    def summary(self) -> dict[str, int]:
        """The counters for a role's summary line (IReportingService.summary)."""
        counters = self.counters
        return {
            "dtls_connections": len(self._peers),
            "dtls_handshakes": counters.handshakes.value,
            "dtls_resumed": counters.resumptions.value,
            "dtls_failed": counters.failures.total,
            "dtls_hello_verify": counters.hello_verify.value,
            "dtls_dropped": counters.dropped.total,
            "dtls_moved": counters.address_changes.value,
            "dtls_evicted": counters.evictions.value,
            "dtls_adopted": counters.adopted.value,
        }

    @property
    def connections(self) -> list[DtlsPeer]:
        return list(self._peers)

    def peerByConnectionId(self, cid: bytes) -> DtlsPeer | None:
        return self._by_cid.get(cid)

    def closeAll(self) -> None:
        """Send close_notify to every peer (on service stop)."""
        for peer in list(self._peers):
            peer.connection.close()
            self._pump(peer)


_CLIENT_RANDOM = slice(record.HEADER_LENGTH + 12 + 2, record.HEADER_LENGTH + 12 + 2 + 32)


def _is_new_client_hello(data: bytes, connection: DtlsConnection) -> bool:
    """An epoch-0 ClientHello to a server connection, with another random
    than the hello that connection serves (not a retransmission)."""
    return (
        not connection.is_client
        and len(data) >= _CLIENT_RANDOM.stop
        and data[0] == record.HANDSHAKE
        and data[3:5] == b"\x00\x00"
        and data[record.HEADER_LENGTH] == 1
        and data[_CLIENT_RANDOM] != connection.client_random
    )
