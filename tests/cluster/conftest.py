"""Shared by the cluster tests: a Kubernetes API server over TLS with its own CA and a bearer token.

Fixtures: ``api_server`` (the server, its port, the CA that signed it, another CA)
and ``pod`` (builds a v1 Pod document in the API's shape).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import unquote

import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.ssl import PrivateCertificate
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from nettester.cluster.discovery import KubernetesApi, KubernetesDiscovery
from nettester.cluster.nodes import NodeTable
from nettester.protocols.dtls.certificates import Identity, issue, make_ca

TOKEN = "test-token-123"
NAMESPACE = "lab"


def server_pem(ca: Identity) -> bytes:
    """A server certificate for 127.0.0.1 (IP SAN) and kubernetes.default.svc, signed by the CA, and its key."""
    server = issue(ca, "kube-apiserver", ("kubernetes.default.svc",))
    return server.certificate.public_bytes(serialization.Encoding.PEM) + server.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def pod(name: str, ip: str | None, phase: str = "Running", terminating: bool = False) -> dict[str, Any]:
    """A v1 Pod in the API's shape (only the fields that matter, plus a few that do not)."""
    metadata: dict[str, Any] = {
        "name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "labels": {"app": "coap-cluster"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "coap-cluster"}],
    }
    if terminating:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase, "hostIP": "192.168.1.10", "conditions": [{"type": "Ready",
                                                                                      "status": "True"}]}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"metadata": metadata, "spec": {"containers": [{"name": "coap", "image": "nettester:latest"}]},
            "status": status}


class FakeApiServer(Resource):
    """``/api/v1/namespaces/<ns>/pods[/<name>]`` with a bearer-token check."""

    isLeaf = True
    token = TOKEN
    namespace = NAMESPACE

    def __init__(self) -> None:
        super().__init__()
        self.pods: list[dict[str, Any]] = []
        self.selectors: list[str] = []

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.getHeader(b"authorization") != f"Bearer {TOKEN}".encode():
            request.setResponseCode(401)
            return json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized",
                               "code": 401}).encode()
        path = request.path.decode().split("/")
        if path[:5] != ["", "api", "v1", "namespaces", NAMESPACE] or path[5:6] != ["pods"]:
            request.setResponseCode(404)
            return b'{"kind":"Status","code":404}'
        if len(path) == 7:
            found = [p for p in self.pods if p["metadata"]["name"] == path[6]]
            if not found:
                request.setResponseCode(404)
                return b'{"kind":"Status","code":404}'
            return json.dumps({"kind": "Pod", "apiVersion": "v1", **found[0]}).encode()
        selector = unquote(request.args[b"labelSelector"][0].decode())
        self.selectors.append(selector)
        key, _, value = selector.partition("=")
        items = [p for p in self.pods if p["metadata"]["labels"].get(key) == value]
        return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "42"},
                           "items": items}).encode()


def pod_discovery(kubernetes: tuple[FakeApiServer, int, bytes] | None, node_id: int, table: NodeTable,
                  management_port: int) -> KubernetesDiscovery:
    """Node ``node_id``'s pod discovery (pod ``coap-cluster-<id>``) against the test API server (server, port, CA)."""
    assert kubernetes is not None, "k8s mode needs the api_server fixture"
    server, port, ca_pem = kubernetes
    api = KubernetesApi(reactor, f"127.0.0.1:{port}", server.namespace, lambda: server.token, ca_pem)
    return KubernetesDiscovery(reactor, api, table, f"coap-cluster-{node_id}", management_port)


@pytest.fixture
def api_server() -> Generator[tuple[FakeApiServer, int, bytes, bytes], None, None]:
    ca = make_ca("test-cluster-ca")
    resource = FakeApiServer()
    site = Site(resource)
    site.noisy = False
    options = PrivateCertificate.loadPEM(server_pem(ca)).options()
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    other_ca = make_ca("some-other-ca")
    yield resource, port.getHost().port, ca.certificate.public_bytes(serialization.Encoding.PEM), \
        other_ca.certificate.public_bytes(serialization.Encoding.PEM)
    port.stopListening()


@pytest.fixture(name="pod")
def pod_fixture() -> Callable[..., dict[str, Any]]:
    return pod

