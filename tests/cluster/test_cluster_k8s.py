"""Kubernetes discovery against a test API server: TLS with our own CA, a bearer token, real PodList JSON."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.web.test.requesthelper import DummyRequest

from nettester.cluster.discovery import (
    KubernetesApi,
    KubernetesApiError,
    KubernetesDiscovery,
    Pod,
    ReadyResource,
    api_host,
    app_label_of,
    kubernetes_discovery_from_environment,
    pods_from_list,
)
from nettester.cluster.nodes import NodeTable
from nettester.cluster.wire import ManagementCodec
from tests.loopback import wait_until

pytestmark = pytest.mark.integration
TIMEOUT = 10.0


def discovery(server: Any, port: int, ca_pem: bytes, token: str | None = None, selector: str | None = None
              ) -> tuple[KubernetesDiscovery, NodeTable]:
    table = NodeTable(0, ManagementCodec())
    api = KubernetesApi(reactor, f"127.0.0.1:{port}", server.namespace, lambda: token or server.token, ca_pem)
    return KubernetesDiscovery(reactor, api, table, "coap-cluster-0", 5884, selector), table


@pytest_twisted.inlineCallbacks
def test_pods_appearing_and_disappearing_become_the_group(api_server: Any, pod: Any) -> Generator[Any, Any, None]:
    server, port, ca_pem, _ = api_server
    server.pods = [pod("coap-cluster-0", "10.1.0.10"), pod("coap-cluster-1", "10.1.0.11"),
                   pod("coap-cluster-2", None, phase="Pending")]
    found, table = discovery(server, port, ca_pem)
    assert not found.ready
    yield found.refresh().addTimeout(TIMEOUT, reactor)
    assert found.ready and found.failures == 0
    assert server.selectors == ["app=coap-cluster"], "selector derived from the own pod's app label"
    assert found.group == (("10.1.0.11", 5884),)
    table.handle_timer(0.0)
    assert [address for _, address in table.datagrams_to_send()] == [("10.1.0.11", 5884)]

    server.pods[2] = pod("coap-cluster-2", "10.1.0.12")
    yield found.refresh().addTimeout(TIMEOUT, reactor)
    assert found.group == (("10.1.0.11", 5884), ("10.1.0.12", 5884))

    server.pods[1] = pod("coap-cluster-1", "10.1.0.11", terminating=True)
    server.pods.append(pod("unrelated", "10.1.0.99") | {"metadata": {"name": "unrelated", "labels": {"app": "x"}}})
    yield found.refresh().addTimeout(TIMEOUT, reactor)
    assert found.group == (("10.1.0.12", 5884),)
    table.handle_timer(10.0)
    assert [address for _, address in table.datagrams_to_send()] == [("10.1.0.12", 5884)]


@pytest_twisted.inlineCallbacks
def test_a_wrong_token_is_refused_and_logged_not_raised(api_server: Any, pod: Any) -> Generator[Any, Any, None]:
    server, port, ca_pem, _ = api_server
    server.pods = [pod("coap-cluster-0", "10.1.0.10")]
    found, _ = discovery(server, port, ca_pem, token="wrong", selector="app=coap-cluster")
    yield found.refresh().addTimeout(TIMEOUT, reactor)
    assert found.failures == 1 and not found.ready
    assert "HTTP 401 (check the ServiceAccount's Role" in found.last_error


@pytest_twisted.inlineCallbacks
def test_an_api_server_not_signed_by_ca_crt_is_refused(api_server: Any, pod: Any) -> Generator[Any, Any, None]:
    server, port, _, other_ca_pem = api_server
    server.pods = [pod("coap-cluster-0", "10.1.0.10"), pod("coap-cluster-1", "10.1.0.11")]
    found, table = discovery(server, port, other_ca_pem, selector="app=coap-cluster")
    yield found.refresh().addTimeout(TIMEOUT, reactor)
    assert found.failures == 1 and not found.ready and found.group == ()
    assert "certificate verify failed" in found.last_error
    assert server.selectors == []


@pytest_twisted.inlineCallbacks
def test_an_api_server_certificate_for_another_name_is_refused(api_server: Any) -> Generator[Any, Any, None]:
    """service-identity checks the name: the certificate names 127.0.0.1, not localhost."""
    server, port, ca_pem, _ = api_server
    table = NodeTable(0, ManagementCodec())
    api = KubernetesApi(reactor, f"localhost:{port}", server.namespace, lambda: server.token, ca_pem)
    found = KubernetesDiscovery(reactor, api, table, "coap-cluster-0", 5884, "app=coap-cluster")
    yield found.refresh().addTimeout(TIMEOUT, reactor)
    assert found.failures == 1 and server.selectors == []
    assert "DNSMismatch" in found.last_error


@pytest_twisted.inlineCallbacks
def test_the_service_lists_at_start_and_builds_from_the_environment(api_server: Any, pod: Any, tmp_path: Path
                                                                    ) -> Generator[Any, Any, None]:
    server, port, ca_pem, _ = api_server
    server.pods = [pod("coap-cluster-0", "10.1.0.10"), pod("coap-cluster-1", "10.1.0.11")]
    (tmp_path / "token").write_text(server.token + "\n")
    (tmp_path / "ca.crt").write_bytes(ca_pem)
    (tmp_path / "namespace").write_text(server.namespace)
    table = NodeTable(0, ManagementCodec())
    found = kubernetes_discovery_from_environment(
        reactor, table, 5884, {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)},
        "coap-cluster-0", str(tmp_path))
    found.startService()
    try:
        yield wait_until(lambda: found.ready, timeout=TIMEOUT, step=0.05, what="Kubernetes discovery ready")
        assert found.ready and found.group == (("10.1.0.11", 5884),)
    finally:
        found.stopService()


def test_environment_errors_say_what_is_missing(tmp_path: Path) -> None:
    table = NodeTable(0, ManagementCodec())
    with pytest.raises(ValueError, match="set KUBECTL_HOST"):
        kubernetes_discovery_from_environment(reactor, table, 5884, {}, "x-0", str(tmp_path))
    with pytest.raises(ValueError, match="namespace.*is a service account mounted"):
        kubernetes_discovery_from_environment(reactor, table, 5884, {"KUBECTL_HOST": "h:1"}, "x-0", str(tmp_path))
    assert api_host({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}) == "[fd00::1]:6443"
    assert api_host({"KUBECTL_HOST": "api:8443", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "api:8443"


def test_ready_resource() -> None:
    state = {"ready": False}
    resource = ReadyResource(lambda: state["ready"])
    request = DummyRequest([b""])
    assert resource.render_GET(request) == b"not ready\n" and request.responseCode == 503
    state["ready"] = True
    request = DummyRequest([b""])
    assert resource.render_GET(request) == b"ready\n" and request.responseCode is None


def test_pod_list_parsing(pod: Any) -> None:
    document = {"kind": "PodList", "items": [pod("a", "10.0.0.1"), pod("b", "fd00::2"), pod("c", None),
                                             pod("d", "10.0.0.4", phase="Succeeded"), pod("e", "not-an-ip")]}
    assert pods_from_list(document) == [Pod("a", "10.0.0.1"), Pod("b", "fd00::2")]
    assert app_label_of(pod("a", "10.0.0.1")) == "coap-cluster"
    with pytest.raises(KubernetesApiError, match="KUBECTL_SELECTOR"):
        app_label_of({"metadata": {}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.sampled_from(["PodList", "Running", "10.0.0.1"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["kind", "items", "metadata", "status", "name", "podIP", "phase", "labels", "app"]),
        children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_gives_pods_or_kubernetes_api_error(document: Any) -> None:
    for parse in (pods_from_list, app_label_of):
        try:
            parse(document)
        except KubernetesApiError:
            pass
