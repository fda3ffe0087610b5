"""k8s/coap-cluster.yaml configures a working cluster node: its args and env parse into the k8s mode."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from nettester.protocols.coap.options import CoapServerOptions

MANIFEST = Path(__file__).resolve().parents[2] / "k8s" / "coap-cluster.yaml"


def test_the_statefulset_container_parses_into_a_k8s_cluster_node(monkeypatch: pytest.MonkeyPatch) -> None:
    documents: list[dict[str, Any]] = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = {d["kind"]: d for d in documents}
    secret = kinds["Secret"]["stringData"]["secret-base64"]
    statefulset = kinds["StatefulSet"]
    assert statefulset["spec"]["replicas"] == 3 and statefulset["spec"]["podManagementPolicy"] == "Parallel"
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    for variable in container["env"]:
        monkeypatch.setenv(variable["name"], variable.get("value", secret))
    monkeypatch.setattr("nettester.cluster.config.socket.gethostname", lambda: "coap-cluster-2")
    options = CoapServerOptions()
    options.parseOptions(container["args"][1:])
    cluster = options["cluster"]
    assert (cluster.mode, cluster.node_id, cluster.external_management_port) == ("k8s", 2, 5884)
    assert cluster.secret == base64.b64decode(secret)
    assert options["dtls"].cid_generator.nodeId == 2 and options["ready-port"] == 8080
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (ports["coap"], ports["coaps"], ports["mgmt"]) == (options["port"] + 100, 5784, 5884)
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ready"}
    assert ports["ready"] == options["ready-port"]
    node_ports = {p["nodePort"] for d in documents if d["kind"] == "Service" for p in d["spec"]["ports"]
                  if "nodePort" in p}
    assert node_ports == {30783, 30784}
