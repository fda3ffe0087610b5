"""The ``coap-server`` role: the extended plugtest server on up to four ports per address.

coap BASE and coaps BASE+1 serve the ETSI plugtest resources, coap BASE+100
and coaps BASE+101 the extended ones (Californium's layout, RFC 7252
section 6 default ports). Each port is a link (UdpLink or DtlsEndpoint) with
its own CoapEndpoint; the plugtest endpoints share one resource tree, the
extended ones another, so observers and stored state are the same whichever
address a client uses.

In a DTLS CID cluster (issue 6) the extended coaps endpoint is the cluster
node's public socket instead (UDP socket -> CID router -> DTLS endpoint ->
CoAP endpoint, DESIGN.md): records for another node's CID are forwarded
there, records other nodes forward to us arrive with their route, and
``mycontext`` shows ``node-id`` and ``via``. Under ``--workers`` each worker
is a part of the node (``join_workers``, ``nettester.cluster.siblings``), and
reports ready once the node's sockets are open (``when_listening``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import ifaddr
from prometheus_client.core import Metric
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from zope.interface import implementer

from nettester.cluster.config import ClusterConfig
from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.coap.attribution import attach as attach_attribution
from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.options import COAPS_OFFSET, EXTENDED_OFFSET
from nettester.protocols.coap.parameters import LayerStats, TransmissionParameters
from nettester.protocols.coap.resources import Site, build_site
from nettester.protocols.coap.resources.extended import extended_resources
from nettester.protocols.coap.resources.plugtest import plugtest_resources
from nettester.protocols.coap.tcplink import ReliableCoapEndpoint, TcpLink
from nettester.protocols.coap.tls import TlsServer
from nettester.reactor import listen_udp
from nettester.service import failed_address, listen_failed, set_exit_status
from nettester.udplink import UdpLink
from nettester.workers import merge_metric_families, metric_families, prometheus_families

if TYPE_CHECKING:
    from nettester.protocols.dtls.endpoint import DtlsEndpoint
    from nettester.workers import WorkerContext

log = Logger()

PLUGTEST_BLOCK_SZX = 2  # 64-byte blocks (RFC 7959 section 2.2: 2 ** (SZX + 4))


def local_addresses(ipv4: bool, ipv6: bool, loopback: bool, external: bool) -> list[str]:
    """Addresses to listen on for the address flags.

    Loopback and external together are the wildcards (``::`` is dual-stack,
    so IPv4 peers arrive v4-mapped; ``0.0.0.0`` where the host has no IPv6,
    as in many containers); otherwise the matching addresses of this host's
    interfaces.
    """
    ipv6 = ipv6 and ipv6_available()
    if loopback and external:
        return ["::"] if ipv6 else ["0.0.0.0"] if ipv4 else []
    return [address for _, address in interface_addresses(ipv4, ipv6)
            if ipaddress.ip_address(address).is_loopback == loopback]


def pattern_addresses(patterns: Iterable[re.Pattern[str]], ipv4: bool, ipv6: bool) -> list[str]:
    """The addresses of the interfaces whose name matches one of ``patterns`` (``--interfaces-pattern``)."""
    compiled = list(patterns)
    return [address for name, address in interface_addresses(ipv4, ipv6 and ipv6_available())
            if any(pattern.fullmatch(name) for pattern in compiled)]


def interface_addresses(ipv4: bool, ipv6: bool) -> list[tuple[str, str]]:
    """(interface name, address) of this host, link-local IPv6 left out (it needs a scope).

    ifaddr enumerates them (getifaddrs): names and both families in one
    portable call, where the standard library has neither.
    """
    found: list[tuple[str, str]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                if ipv4:
                    found.append((adapter.name, ip.ip))
            elif ipv6 and not ipaddress.ip_address(ip.ip[0]).is_link_local:
                found.append((adapter.name, ip.ip[0]))
    return found


def ipv6_available() -> bool:
    """Whether this host can bind an IPv6 UDP socket at all."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


def summed_families(metric_sets: Iterable[MetricSet]) -> list[Metric]:
    """The families of metric sets of one shape, each sample summed over the sets.

    Every DtlsEndpoint counts in its own ``MetricSet("dtls")``; the server
    exports one ``nettester_dtls_*`` family per counter (names stay unique),
    labelled samples (drops by reason) summed label by label, as the
    ``--workers`` parent sums its workers' (``workers.merge_metric_families``).
    """
    parts = [metric_families(metric_set) for metric_set in metric_sets]
    return prometheus_families(merge_metric_families(parts, parts))


class CoapServerMetrics(MetricSet):
    """``nettester_coap_server_*``, followed by the DTLS endpoints' counters summed (``nettester_dtls_*``)."""

    def __init__(self, dtls_links: list[DtlsEndpoint]) -> None:
        super().__init__("coap_server")
        self._dtls_links = dtls_links

    def collect(self) -> Iterable[Metric]:
        yield from super().collect()
        yield from summed_families(link.metrics for link in self._dtls_links)


@implementer(IReportingService)
class CoapServerService(Service):
    """Listens on every (address, port) and serves the two resource trees."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        addresses: list[str],
        plugtest: bool = True,
        benchmark: bool = False,
        notify_interval: float = 5.0,
        receive_buffer: int = 4 << 20,
        dtls_link_factory: Callable[[], DtlsEndpoint] | None = None,
        dtls_only: bool = False,
        server_name: str = "nettester",
        params: TransmissionParameters | None = None,
        cluster: ClusterConfig | None = None,
        ready_port: int = 0,
        ready_interface: str = "",
        tcp: bool = False,
        tls: TlsServer | None = None,
        max_tcp_connections: int | None = None,
    ) -> None:
        """``cluster``: the extended coaps endpoint joins this DTLS CID cluster (needs
        ``dtls_link_factory``). ``ready_port``: serve ``/ready`` over HTTP there (0: off).
        ``tcp``: coap+tcp (RFC 8323) on the coap port numbers too, and coaps+tcp on the coaps
        ones with ``tls`` (a ``tls.TlsServer``); each TCP listener closes a new connection at once
        past ``max_tcp_connections`` open ones (None: no cap)."""
        if cluster is not None and dtls_link_factory is None:
            raise ValueError("a DTLS cluster needs a DTLS link factory")
        self._reactor = reactor
        self._base_port = port
        self._addresses = addresses
        self._plugtest = plugtest
        self._receive_buffer = receive_buffer
        self._dtls_link_factory = dtls_link_factory
        self._dtls_only = dtls_only
        self._tcp = tcp
        self._tls = tls
        self._max_tcp_connections = max_tcp_connections
        #: The coap+tcp listeners' links (connections and why they ended).
        self.tcp_links: list[TcpLink] = []
        self._params = params
        self._cluster = cluster
        self._ready_port_number = ready_port
        self._ready_interface = ready_interface
        self._ready_port: Any = None
        #: The cluster node (public socket, router, management), or None outside a cluster.
        self.cluster_node: Any = None
        self._workers: WorkerContext | None = None
        self._listening_waiters: list[defer.Deferred[None]] | None = [] if cluster is not None else None
        started = reactor.seconds()
        self.plugtest_site: Site = build_site(reactor, plugtest_resources(notify_interval, self._shutdown))
        self.extended_site: Site = build_site(
            reactor, extended_resources(benchmark, server_name, reactor.seconds, started)
        )
        self.attribution = attach_attribution(self.extended_site)  # loss attribution for coap-bench
        self.endpoints: list[CoapEndpoint] = []
        #: Why listening failed (the process then exits with status 1), or None.
        self.failed: str | None = None
        #: (scheme, address, port, "plugtest" | "extended") of every listening socket.
        self.listening: list[tuple[str, str, int, str]] = []
        self._ports: list[Any] = []
        #: Every DTLS endpoint made (coaps ports, the cluster node's): their counters join ours.
        self.dtls_links: list[DtlsEndpoint] = []
        self.metrics = CoapServerMetrics(self.dtls_links)
        self.metrics.gauge("received", "requests received (datagrams)", lambda: self._total("received"))
        self.metrics.gauge("duplicates", "duplicate CON/NON answered from the cache",
                           lambda: self._total("duplicates"))
        self.metrics.gauge("retransmissions", "retransmitted CON messages", lambda: self._total("retransmissions"))
        self.metrics.gauge("malformed", "datagrams that were not acceptable CoAP", self._malformed)
        self.metrics.gauge("observers", "active observe relations",
                           lambda: sum(endpoint.core.observer_count for endpoint in self.endpoints))
        self.metrics.gauge("dedup_entries", "(peer, MID) pairs remembered for deduplication",
                           lambda: sum(endpoint.core.dedup_size for endpoint in self.endpoints))
        self.metrics.gauge("tcp_connections", "open coap+tcp connections",
                           lambda: sum(len(link.connections) for link in self.tcp_links))
        self.tcp_refused = self.metrics.labeled_counter(
            "tcp_refused_total", "coap+tcp and coaps+tcp connections closed for what the peer sent (no CSM, too "
            "large, slowloris, format) or at once past --max-tcp-connections", "reason")
        self.metrics.gauge("dedup_evicted", "dedup entries dropped early at --max-dedup-entries",
                           lambda: sum(endpoint.core.dedup_evicted for endpoint in self.endpoints))

    def _total(self, field: str) -> int:
        return sum(getattr(endpoint.stats, field) for endpoint in self.endpoints)

    def _malformed(self) -> int:
        return self._total("garbage") + self._total("format_errors") + self._total("bad_options")

    def summary(self) -> dict[str, Any]:
        """Counters of every endpoint (and the cluster's), for the periodic summary line."""
        fields = {
            "received": self._total("received"),
            "sent": self._total("sent"),
            "duplicates": self._total("duplicates"),
            "retransmissions": self._total("retransmissions"),
            "malformed": self._malformed(),
            "observers": sum(endpoint.core.observer_count for endpoint in self.endpoints),
        }
        if self._tcp:
            fields["tcp_connections"] = sum(len(link.connections) for link in self.tcp_links)
            fields["tcp_refused"] = self.tcp_refused.total
        if self._dtls_link_factory is not None:
            fields.update(self._dtls_summary())
        if self.cluster_node is not None:
            fields["node_id"] = self._cluster.node_id  # type: ignore[union-attr]
            fields.update(self.cluster_node.summary())
        return fields

    def _dtls_summary(self) -> dict[str, int]:
        """The DTLS endpoints' main counters, summed, for the summary line."""
        summaries = [link.summary() for link in self.dtls_links]
        return {field: sum(summary[key] for summary in summaries) for field, key in (
            ("dtls_handshakes", "dtls_handshakes"), ("dtls_failures", "dtls_failed"),
            ("dtls_dropped", "dtls_dropped"), ("dtls_connections", "dtls_connections"))}

    def is_ready(self) -> bool:
        """For ``/ready``: every socket open and, in a cluster, the node ready (pods listed once in k8s)."""
        if self.failed is not None or not self.running:
            return False
        return self.cluster_node.is_ready() if self.cluster_node is not None else bool(self.listening)

    def join_workers(self, context: WorkerContext) -> None:
        """Under ``--workers``: the cluster node is this worker's part of the node (``nettester.supervisor``)."""
        self._workers = context

    def when_listening(self) -> defer.Deferred[None]:
        """Fires once every socket is open, the cluster node's too (it may resolve names first); never
        when listening failed (the process then stops with status 1)."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._listening_waiters is None:
            waiter.callback(None)
        else:
            self._listening_waiters.append(waiter)
        return waiter

    @property
    def stats(self) -> list[LayerStats]:
        """Each endpoint's counters."""
        return [endpoint.stats for endpoint in self.endpoints]

    def startService(self) -> None:
        super().startService()
        try:
            if not self._addresses:
                raise OSError("no address to listen on for these --ipv4/--ipv6/--loopback/--external flags")
            for address in self._addresses:
                for offset, site, name in ((0, self.plugtest_site, "plugtest"),
                                           (EXTENDED_OFFSET, self.extended_site, "extended")):
                    if name == "plugtest" and not self._plugtest:
                        continue
                    if not self._dtls_only:
                        self._listen("coap", address, offset, UdpLink(receive_buffer=self._receive_buffer), site, name)
                    if self._tcp and not self._dtls_only:
                        link = self._new_tcp_link()
                        self._listen("coap+tcp", address, offset, link, site, name)
                    if self._tcp and self._tls is not None:
                        link = self._new_tcp_link(self._tls.context_factory)
                        self._listen("coaps+tcp", address, offset + COAPS_OFFSET, link, site, name)
                    if self._dtls_link_factory is not None and not (self._cluster and name == "extended"):
                        self._listen("coaps", address, offset + COAPS_OFFSET, self._new_dtls_link(), site, name)
            if self._tcp and self._tls is not None:
                log.info("coaps+tcp uses a {certificate}", event="coap_tls_certificate",
                         certificate=self._tls.description)
            if self._cluster is not None:
                self._start_cluster_node(self._cluster)
            if self._ready_port_number:
                self._serve_ready()
        except (CannotListenError, OSError) as error:
            host, port = failed_address(error, "0.0.0.0", self._base_port)
            ready = self._ready_port_number and port == self._ready_port_number and host == (
                self._ready_interface or "0.0.0.0")
            self.failed = str(error)
            self.stopService()
            listen_failed(self, self._reactor, host, port, "--ready-port" if ready else "--port", error)

    def _new_tcp_link(self, tls_server: Any = None) -> TcpLink:
        """A coap+tcp (or, with ``tls_server``, coaps+tcp) listener's link, counted in ours."""
        link = TcpLink(self._reactor, tls_server=tls_server, max_connections=self._max_tcp_connections,
                       refused_counter=self.tcp_refused)
        self.tcp_links.append(link)
        return link

    def _new_dtls_link(self) -> DtlsEndpoint:
        """A DTLS endpoint from the factory, its counters remembered for the summary and /metrics."""
        link = self._dtls_link_factory()  # type: ignore[misc]
        self.dtls_links.append(link)
        return link

    def _endpoint_params(self, name: str) -> TransmissionParameters:
        """The extended endpoints' parameters; the plugtest ones send server-initiated blocks of
        64 bytes, as Californium's plugtest server does (TD_COAP_BLOCK_*)."""
        params = self._params or TransmissionParameters()
        return replace(params, block_szx=PLUGTEST_BLOCK_SZX) if name == "plugtest" else params

    def _fail(self, reason: str, advice: str) -> None:
        """The cluster node did not start: say why and what to check, stop, and exit with status 1."""
        self.failed = reason
        log.critical("cannot listen: {reason}; {advice}", event="listen_failed", reason=reason, advice=advice)
        self.stopService()
        set_exit_status(self, 1)
        self._reactor.callWhenRunning(self._reactor.stop)

    def _start_cluster_node(self, cluster: ClusterConfig) -> None:
        """The extended coaps endpoint behind the CID router, on the cluster's DTLS interface."""
        from nettester.cluster.node import ClusterNodeService

        link = self._new_dtls_link()
        endpoint = CoapEndpoint(link, self._reactor, params=self._params)
        self.extended_site.attach(endpoint)
        self.endpoints.append(endpoint)
        self.cluster_node = ClusterNodeService(self._reactor, cluster, link, self.metrics, workers=self._workers)
        self.cluster_node.startService()
        self.cluster_node.started.addCallbacks(self._cluster_listening, self._cluster_failed)

    def _cluster_listening(self, _: None) -> None:
        host = self._cluster.dtls_address[0] or "0.0.0.0"  # type: ignore[union-attr]
        port = self.cluster_node.public_port
        self.listening.append(("coaps", host, port, "extended"))
        log.info("{name} resources on {scheme}://{where}:{port} (cluster node {node})", event="coap_listening",
                 name="extended", scheme="coaps", where=f"[{host}]" if ":" in host else host, port=port,
                 node=self._cluster.node_id)  # type: ignore[union-attr]
        waiters, self._listening_waiters = self._listening_waiters or [], None
        for waiter in waiters:
            waiter.callback(None)

    def _cluster_failed(self, failure: Any) -> None:
        if self.running:
            self._fail(f"cluster node: {failure.getErrorMessage()}",
                       "check the addresses and ports of --dtls-cluster / --dtls-cluster-group / --k8s-dtls-cluster "
                       "(in Kubernetes: the service account and the KUBECTL_* variables)")

    def _serve_ready(self) -> None:
        """``/ready`` for a Kubernetes readiness probe (the metrics port is the core's; this one is ours)."""
        from twisted.web.resource import Resource

        from nettester.metrics import QuietSite, ReadyResource

        root = Resource()
        root.putChild(b"ready", ReadyResource(self.is_ready))
        site = QuietSite(root)
        self._ready_port = self._reactor.listenTCP(self._ready_port_number, site, interface=self._ready_interface)
        where = self._ready_interface or "0.0.0.0"
        log.info("readiness probe on http://{where}:{port}/ready", event="coap_ready_port",
                 where=f"[{where}]" if ":" in where else where, port=self._ready_port.getHost().port)

    def _listen(self, scheme: str, address: str, offset: int, link: Any, site: Site, name: str) -> None:
        """One endpoint on one socket: UDP, or TCP for a ``TcpLink`` (a factory of connections)."""
        port_number = self._base_port + offset if self._base_port else 0
        if isinstance(link, TcpLink):
            endpoint: CoapEndpoint = ReliableCoapEndpoint(link, self._reactor, params=self._endpoint_params(name))
            port = link.listen(port_number, address)
        else:
            endpoint = CoapEndpoint(link, self._reactor, params=self._endpoint_params(name))
            port = listen_udp(self._reactor, port_number, link, address)
        site.attach(endpoint)
        self._ports.append(port)
        self.endpoints.append(endpoint)
        actual = port.getHost().port
        self.listening.append((scheme, address, actual, name))
        log.info("{name} resources on {scheme}://{where}:{port}", event="coap_listening", name=name, scheme=scheme,
                 where=f"[{address}]" if ":" in address else address, port=actual)

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        self.plugtest_site.close()
        self.extended_site.close()
        for endpoint in self.endpoints:
            endpoint.stop()
        for link in self.tcp_links:
            link.release_all("the server stops")
        ports, self._ports = self._ports, []
        if self._ready_port is not None:
            ports.append(self._ready_port)
            self._ready_port = None
        stopping = [defer.maybeDeferred(port.stopListening) for port in ports]
        if self.cluster_node is not None and self.cluster_node.running:  # kept for the final summary
            stopping.append(defer.maybeDeferred(self.cluster_node.stopService))
        return defer.gatherResults(stopping)

    def _shutdown(self) -> None:
        """The plugtest ``shutdown`` resource: stop the whole process."""
        log.info("shutdown requested through the plugtest resource", event="coap_shutdown")
        self._reactor.stop()
