"""The management UDP socket of a cluster node (the Twisted adapter).

Incoming: PING/PONG feed the node table (dynamic and Kubernetes discovery);
IN records are handed to the local DTLS endpoint as if they had arrived on
its own socket, with the forwarding node as the route to answer through;
OUT records are the owner's answers, to send from our public socket to the
client; STATE records (connection snapshots) go to ``on_state``, the
replication (:mod:`nettester.cluster.replication`) when it runs, which returns
a drop reason for a stale one. Anything that does not decode or authenticate is dropped and counted
by reason (:exc:`nettester.cluster.wire.ManagementError`).

Outgoing: :meth:`ManagementEndpoint.forward` (IN, to the owner) and
:meth:`ManagementEndpoint.backward` (OUT, to the node the client talks to).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import DatagramProtocol

from nettester.cluster.discovery import DynamicDiscovery
from nettester.cluster.wire import (
    TYPE_IN,
    TYPE_OUT,
    TYPE_PING,
    TYPE_PONG,
    ConnectionState,
    ManagementCodec,
    ManagementError,
)
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.reactor import datagram_sender

log = Logger()

Address = tuple[str, int]
RecordsHandler = Callable[[bytes, Address, Address], None]
"""``handler(records, client, node)``: DTLS records of ``client``, from/for cluster node ``node``."""


class ManagementEndpoint(DatagramProtocol):
    """One node's management socket; see the module docstring.

    :param on_forwarded: IN records: ``(records, client, forwarding node)``;
        the DTLS endpoint processes them and answers through that node.
    :param on_backwarded: OUT records: ``(records, client, owner node)``; send
        the records to the client from the public socket.
    :param discovery: dynamic (or Kubernetes) discovery, which PING/PONG
        datagrams go to; None in static mode (they are then dropped and counted).
    :param sibling: a worker other than the discovery worker under ``--workers``
        (``nettester.cluster.siblings``): the PING/PONG the kernel hands it while
        worker 0 is down are dropped as ``ping_on_sibling_worker``.
    """

    noisy = False

    def __init__(
        self,
        reactor: Any,
        codec: ManagementCodec,
        on_forwarded: RecordsHandler,
        on_backwarded: RecordsHandler,
        metrics: MetricSet,
        discovery: DynamicDiscovery | None = None,
        sibling: bool = False,
    ) -> None:
        self._reactor = reactor
        self._ping_drop = "ping_on_sibling_worker" if sibling else "static_cluster_ping"
        self._codec = codec
        self._on_forwarded = on_forwarded
        self._on_backwarded = on_backwarded
        self._discovery = discovery
        self._sendto: Callable[[bytes, Address], Any] = self._transport_write
        self.on_state: Callable[[ConnectionState, Address], str | None] | None = None
        self.received_in = metrics.counter("forwarded_in_total", "IN records received (forwarded to us).")
        self.received_out = metrics.counter("management_out_total", "OUT records received (answers to send).")
        self.sent_in = metrics.counter("management_forwarded_total", "Datagrams forwarded to their owner node.")
        self.sent_out = metrics.counter("backwarded_total", "Answers sent back through another node.")
        self.dropped = metrics.labeled_counter("management_dropped_total", "Management records dropped.", "reason")
        if discovery is not None:
            # The node table counts its own drops (replay, stale_timestamp...) in the same series.
            self.dropped.values = discovery.table.drops
        if not codec.authenticated:
            log.warn(
                "Cluster management records are not authenticated: anyone reaching the management port can "
                "inject records with forged client addresses; set --dtls-cluster-group-security or {env}",
                event="cluster_unauthenticated",
                env="DTLS_CID_MGMT_SECRET_BASE64",
            )

    def _transport_write(self, datagram: bytes, address: Address) -> None:
        transport = self.transport
        assert transport is not None, "written to before the port was opened"
        transport.write(datagram, address)

    def startProtocol(self) -> None:
        if getattr(self.transport, "getHandle", None) is not None:  # a real port, not a test's fake
            self._sendto = datagram_sender(self.transport, self._send_failed)

    def stopProtocol(self) -> None:
        self._sendto = self._transport_write

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        kind = datagram[0] if datagram else None
        if kind == TYPE_PING or kind == TYPE_PONG:
            # the node table's business (dynamic and Kubernetes discovery); it decodes them itself
            if self._discovery is None:
                self.dropped.inc(self._ping_drop)
            else:
                self._discovery.datagram_received(datagram, addr)
            return
        try:
            if kind == TYPE_OUT or kind == TYPE_IN:
                client, records = self._codec.decode_records(datagram)  # the relay's hot path: no event object
            else:
                message = self._codec.decode(datagram)  # a connection state, or the error saying why not
        except ManagementError as error:
            self.dropped.inc(error.reason)
            return
        if kind == TYPE_OUT:
            self.received_out.value += 1
            self._on_backwarded(records, client, addr)
        elif kind == TYPE_IN:
            self.received_in.value += 1
            self._on_forwarded(records, client, addr)
        else:
            assert type(message) is ConnectionState  # PING and PONG went to the discovery above
            if self.on_state is None:
                self.dropped.inc("state_not_replicating")
            elif (reason := self.on_state(message, addr)) is not None:
                self.dropped.inc(reason)

    def forward(self, records: bytes, client: Address, owner: Address) -> None:
        """Send a client's datagram to the node owning its CID (an IN record)."""
        if self.send(self._codec.encode_records(TYPE_IN, client, records), owner):
            self.sent_in.value += 1

    def backward(self, records: bytes, client: Address, via: Address) -> None:
        """Send our answer to ``client`` through node ``via``, which received the request (an OUT record)."""
        if self.send(self._codec.encode_records(TYPE_OUT, client, records), via):
            self.sent_out.value += 1

    def send(self, datagram: bytes, address: Address) -> bool:
        """Send a management datagram; a refused send is a counted drop (False)."""
        try:
            self._sendto(datagram, address)
        except OSError as error:
            self._send_failed(error, address)
            return False
        return True

    def _send_failed(self, _error: OSError, _address: Address) -> None:
        """A refused send; one refused after the call (an OUT record batched while this port's reads are
        handled) was counted as sent too, so ``sent_out`` minus these is what the kernel took."""
        self.dropped.inc("send_error")
