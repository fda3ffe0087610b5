"""Discovery services: the dynamic PING/PONG driver and Kubernetes pod listing.

- static: ``StaticDiscovery``, a fixed table (no service needed, after
  ``resolve_nodes`` has turned host names into addresses).
- dynamic: ``DynamicDiscovery`` drives a ``NodeTable`` core with the shared
  ``CorePump``: PING/PONG datagrams from the management socket in, PINGs
  and PONGs out through it, node changes to the listeners.
- Kubernetes: ``KubernetesDiscovery`` lists the pods of the cluster every 10 s
  (``GET /api/v1/namespaces/<ns>/pods?labelSelector=...``, bearer token of the
  service account, TLS verified against the service account's ``ca.crt``
  with pyOpenSSL and service-identity) and makes their IPs with the external
  management port the NodeTable's group; PING/PONG then map node ids.
  ``ReadyResource`` (from nettester.metrics) is the ``/ready`` readiness probe.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from zope.interface import implementer

from nettester.addresses import ip_family
from nettester.cluster.nodes import NodeChanged, NodeListeners, NodeTable
from nettester.interfaces import INodeDiscovery
from nettester.logs import Logger
from nettester.metrics import ReadyResource  # noqa: F401 - the probe lives with /metrics; re-exported
from nettester.pump import CorePump

log = Logger()

Address = tuple[str, int]

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RELIST_INTERVAL = 10.0
REQUEST_TIMEOUT = 5.0


def resolve_address(reactor: Any, address: Address) -> Deferred[Address]:
    """(host, port) with the host resolved to an IP address (IP literals as they are)."""
    host, port = address
    if ip_family(host) is not None:
        return succeed(address)
    return reactor.resolve(host).addCallback(lambda ip: (ip, port))


def resolve_nodes(reactor: Any, nodes: Mapping[int, Address]) -> Deferred[dict[int, Address]]:
    """Resolve every management address of a static cluster."""
    node_ids = list(nodes)
    resolving = [resolve_address(reactor, nodes[node_id]) for node_id in node_ids]
    gathered = gatherResults(resolving, consumeErrors=True)
    return gathered.addCallback(lambda found: dict(zip(node_ids, found, strict=True)))


@implementer(INodeDiscovery)
class StaticDiscovery(NodeListeners):
    """``--dtls-cluster`` with ``---`` entries: a fixed node id -> management address table."""

    def __init__(self, own_node_id: int, nodes: Mapping[int, Address]) -> None:
        super().__init__()
        self.own_node_id = own_node_id
        self._nodes = {node_id: address for node_id, address in nodes.items() if node_id != own_node_id}

    def management_address(self, node_id: int) -> Address | None:
        return self._nodes.get(node_id)

    def nodes(self) -> dict[int, Address]:
        return dict(self._nodes)


@implementer(INodeDiscovery)
class DynamicDiscovery(NodeListeners, Service):
    """Dynamic and Kubernetes discovery: runs ``table`` (the PING/PONG core); its
    datagrams go out through ``send(datagram, address)``, its node changes to the listeners."""

    def __init__(self, reactor: Any, table: NodeTable, send: Callable[[bytes, Address], object]) -> None:
        NodeListeners.__init__(self)
        self.table = table
        self.own_node_id = table.own_node_id
        self._reactor = reactor
        self._pump = CorePump(reactor, table, send, self._changed)

    def datagram_received(self, datagram: bytes, address: Address) -> None:
        """A PING or PONG datagram from the management socket."""
        self._pump.receive(datagram, address)

    def remember(self, nodes: Mapping[int, Address]) -> None:
        """Nodes known before this process ran the table (``NodeTable.remember``); listeners hear of them."""
        now = self._reactor.seconds()
        for node_id, address in nodes.items():
            self.table.remember(node_id, address, now)
        self._pump.pump()

    def management_address(self, node_id: int) -> Address | None:
        return self.table.management_address(node_id)

    def nodes(self) -> dict[int, Address]:
        return self.table.nodes()

    def startService(self) -> None:
        super().startService()
        self._pump.run_timer()  # the first tick is due at once

    def stopService(self) -> None:
        super().stopService()
        self._pump.stop()

    def _changed(self, event: NodeChanged) -> None:
        self._notify(event.node_id, event.address)


class KubernetesApiError(Exception):
    """The Kubernetes API answered something unusable; the message says what and what to check."""


@dataclass(frozen=True, slots=True)
class Pod:
    """A running pod of the cluster: its name and IP."""

    name: str
    ip: str


def pods_from_list(document: Any) -> list[Pod]:
    """The running, not terminating pods with an IP, from a v1 PodList document.

    :raises KubernetesApiError: when the document is not a PodList.
    """
    if not isinstance(document, dict) or document.get("kind") != "PodList" or not isinstance(
        document.get("items"), list
    ):
        raise KubernetesApiError("the answer is not a v1 PodList")
    pods = []
    for item in document["items"]:
        if not isinstance(item, dict):
            raise KubernetesApiError("a PodList item is not an object")
        metadata, status = item.get("metadata"), item.get("status")
        if not isinstance(metadata, dict) or not isinstance(status, dict):
            raise KubernetesApiError("a pod has no metadata or status object")
        name, ip = metadata.get("name"), status.get("podIP")
        if metadata.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        if isinstance(name, str) and isinstance(ip, str) and ip_family(ip) is not None:
            pods.append(Pod(name, ip))
    return pods


def app_label_of(document: Any) -> str:
    """The ``app`` label of a v1 Pod document.

    :raises KubernetesApiError: without one.
    """
    try:
        label = document["metadata"]["labels"]["app"]
    except (KeyError, TypeError):
        label = None
    if not isinstance(label, str) or not label:
        raise KubernetesApiError("this pod has no 'app' label; set KUBECTL_SELECTOR")
    return label


def trust_root_from_pem(ca_pem: bytes) -> Any:
    """A Twisted trust root holding every certificate of a PEM bundle (the service account's ca.crt)."""
    certificates = x509.load_pem_x509_certificates(ca_pem)
    return trustRootFromCertificates([Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates])


class KubernetesApi:
    """The two Kubernetes API calls discovery needs, over verified HTTPS.

    :param host: ``host[:port]`` of the API server (KUBECTL_HOST).
    :param token: returns the bearer token; called per request, because
        projected service-account tokens are rotated.
    """

    def __init__(self, reactor: Any, host: str, namespace: str, token: Callable[[], str], ca_pem: bytes) -> None:
        import treq.client

        self._reactor = reactor
        self._base = f"https://{host}/api/v1/namespaces/{quote(namespace, safe='')}/pods"
        self._token = token
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root_from_pem(ca_pem))
        self._http = treq.client.HTTPClient(Agent(reactor, contextFactory=policy))

    @inlineCallbacks
    def _get(self, url: str) -> Generator[Deferred[Any], Any, Any]:
        headers: dict[bytes | str, bytes | str] = {
            "Authorization": f"Bearer {self._token()}", "Accept": "application/json"}
        response = yield self._http.get(url, headers=headers).addTimeout(REQUEST_TIMEOUT, self._reactor)
        body = yield response.content()
        if response.code != 200:
            hint = " (check the ServiceAccount's Role: pods get/list)" if response.code in (401, 403) else ""
            raise KubernetesApiError(f"GET {url}: HTTP {response.code}{hint}")
        try:
            return json.loads(body)
        except ValueError:
            raise KubernetesApiError(f"GET {url}: the answer is not JSON") from None

    def get_pod(self, name: str) -> Deferred[Any]:
        """The v1 Pod document of pod ``name``."""
        return self._get(f"{self._base}/{quote(name, safe='')}")

    def list_pods(self, selector: str) -> Deferred[list[Pod]]:
        """The running pods matching the label selector."""
        return self._get(f"{self._base}?labelSelector={quote(selector, safe='=,')}").addCallback(pods_from_list)


class KubernetesDiscovery(Service):
    """Keeps a :class:`NodeTable`'s group equal to the cluster's pod IPs (see the module docstring).

    :param selector: a label selector; None derives ``app=<own app label>``
        from this pod (``own_pod``, the host name).
    """

    def __init__(
        self,
        reactor: Any,
        api: KubernetesApi,
        table: NodeTable,
        own_pod: str,
        management_port: int,
        selector: str | None = None,
        interval: float = RELIST_INTERVAL,
    ) -> None:
        self._reactor = reactor
        self._api = api
        self._table = table
        self._own_pod = own_pod
        self._port = management_port
        self._selector = selector
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._group: tuple[Address, ...] = ()
        self.ready = False
        #: Called once, when the pods were first listed (the node's sibling workers learn it then).
        self.on_ready: Callable[[], None] | None = None
        self.failures = 0
        self.last_error: str | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    @property
    def group(self) -> tuple[Address, ...]:
        """The management addresses of the other pods, as last listed."""
        return self._group

    def refresh(self) -> Deferred[None]:
        """List the pods once and update the group; errors are logged, never raised."""
        return self._refresh().addErrback(self._failed)

    @inlineCallbacks
    def _refresh(self) -> Generator[Deferred[Any], Any, None]:
        if self._selector is None:
            own = yield self._api.get_pod(self._own_pod)
            self._selector = f"app={app_label_of(own)}"
        pods = yield self._api.list_pods(self._selector)
        group = tuple(sorted((pod.ip, self._port) for pod in pods if pod.name != self._own_pod))
        if group != self._group:
            log.info(
                "Cluster pods changed: {count} other pods {addresses}",
                event="k8s_pods_changed",
                count=len(group),
                addresses=", ".join(f"{ip}:{port}" for ip, port in group),
            )
            self._group = group
            self._table.set_group(group)
        if not self.ready:
            self.ready = True
            log.info("Kubernetes discovery ready, selector {selector}", event="k8s_ready", selector=self._selector)
            if self.on_ready is not None:
                self.on_ready()

    def _failed(self, failure: Any) -> None:
        self.failures += 1
        self.last_error = failure.getErrorMessage()
        log.error(
            "Kubernetes pod listing failed: {error}; check KUBECTL_HOST, the service account token and ca.crt",
            event="k8s_list_failed",
            error=failure.getErrorMessage(),
        )


def api_host(environ: Mapping[str, str]) -> str:
    """``host:port`` of the API server: KUBECTL_HOST, else the in-cluster service variables."""
    explicit = environ.get("KUBECTL_HOST", "").strip()
    if explicit:
        return explicit
    service = environ.get("KUBERNETES_SERVICE_HOST", "").strip()
    if not service:
        raise ValueError("no Kubernetes API server: set KUBECTL_HOST (host:port) or run inside a pod")
    if ip_family(service) == socket.AF_INET6:
        service = f"[{service}]"
    return f"{service}:{environ.get('KUBERNETES_SERVICE_PORT', '443')}"


def kubernetes_discovery_from_environment(
    reactor: Any,
    table: NodeTable,
    management_port: int,
    environ: Mapping[str, str],
    hostname: str,
    account_dir: str = SERVICE_ACCOUNT_DIR,
) -> KubernetesDiscovery:
    """Build the Kubernetes discovery as Californium's k8s mode configures it.

    ``KUBECTL_HOST`` (else ``KUBERNETES_SERVICE_HOST``:``KUBERNETES_SERVICE_PORT``),
    ``KUBECTL_NAMESPACE`` (else the service account's namespace file),
    ``KUBECTL_SELECTOR`` (else ``app=<own app label>``); token and ca.crt from
    the service account directory.

    :raises ValueError: when something needed is missing, saying what.
    """
    host = api_host(environ)

    def read(name: str) -> str:
        path = os.path.join(account_dir, name)
        try:
            with open(path, encoding="utf-8") as file:
                return file.read().strip()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror}; is a service account mounted?") from None

    namespace = environ.get("KUBECTL_NAMESPACE") or read("namespace")
    ca_pem = read("ca.crt").encode("ascii")
    read("token")  # fail now, not at the first listing
    api = KubernetesApi(reactor, host, namespace, lambda: read("token"), ca_pem)
    return KubernetesDiscovery(reactor, api, table, hostname, management_port, environ.get("KUBECTL_SELECTOR") or None)
