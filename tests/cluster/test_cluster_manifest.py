"""k8s/overlays/coap-cluster configures a working cluster node: its args and env parse into the k8s mode.

The management secret is not in the manifests (applying them again must not
overwrite it): the node parses with and without it, and without it says at
start that management records are unauthenticated and how to set the secret.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.task import Clock

from nettester.cluster.config import SECRET_ENV
from nettester.cluster.management import ManagementEndpoint
from nettester.cluster.wire import ManagementCodec
from nettester.metrics import MetricSet
from nettester.protocols.coap.options import CoapServerOptions
from tests.kustomize import environment, pod_templates, render_overlay
from tests.logcapture import log_events

SECRET = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _parse(monkeypatch: pytest.MonkeyPatch, secret: str | None) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    documents = render_overlay("coap-cluster")
    [(statefulset, pod)] = [(w, p) for w, p in pod_templates(documents) if w["kind"] == "StatefulSet"]
    [container] = pod["spec"]["containers"]
    for name, value in environment(documents, container).items():
        if isinstance(value, dict):  # valueFrom: the Secret's key, when the Secret exists
            assert value["secretKeyRef"] == {"name": "coap-cluster-mgmt", "key": "secret-base64", "optional": True}
            assert name == SECRET_ENV
            if secret is None:
                monkeypatch.delenv(name, raising=False)
                continue
            value = secret
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("nettester.cluster.config.socket.gethostname", lambda: "coap-cluster-2")
    options = CoapServerOptions()
    options.parseOptions(container["args"][1:])
    return options, documents, container


def test_the_statefulset_container_parses_into_a_k8s_cluster_node(monkeypatch: pytest.MonkeyPatch) -> None:
    options, documents, container = _parse(monkeypatch, SECRET)
    statefulset = next(d for d in documents if d["kind"] == "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3 and statefulset["spec"]["podManagementPolicy"] == "Parallel"
    cluster = options["cluster"]
    assert (cluster.mode, cluster.node_id, cluster.external_management_port) == ("k8s", 2, 5884)
    assert cluster.secret == base64.b64decode(SECRET)
    assert options["dtls"].cid_generator.node_id == 2 and options["ready-port"] == 8080
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (ports["coap"], ports["coaps"], ports["mgmt"]) == (options["port"] + 100, 5784, 5884)
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ready"}
    assert ports["ready"] == options["ready-port"]
    node_ports = {p["nodePort"] for d in documents if d["kind"] == "Service" for p in d["spec"]["ports"]
                  if "nodePort" in p}
    assert node_ports == {30783, 30784}


def test_without_the_secret_the_node_runs_and_says_why_it_is_unauthenticated(monkeypatch: pytest.MonkeyPatch) -> None:
    options, _, _ = _parse(monkeypatch, None)
    assert options["cluster"].secret is None
    with log_events() as events:
        ManagementEndpoint(Clock(), ManagementCodec(options["cluster"].secret), lambda *a: None, lambda *a: None,
                           MetricSet("coap_server"))
    [warning] = [event for event in events if event.get("event") == "cluster_unauthenticated"]
    assert warning["env"] == SECRET_ENV
