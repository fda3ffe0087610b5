"""k8s/overlays/nat configures a working nat role (schema and env-var names: tests/test_k8s_manifests.py)."""

from __future__ import annotations

import pytest

from nettester.nat.options import NatOptions
from tests.kustomize import environment, nettester_containers, pod_templates, render_overlay


def test_the_container_runs_the_nat_role_configured_by_its_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    documents = render_overlay("nat")
    [(deployment, pod)] = [(w, p) for w, p in pod_templates(documents) if w["metadata"]["name"] == "nettester-nat"]
    (container,) = nettester_containers(pod)
    assert container["args"][0] == "nat"
    for name, value in environment(documents, container).items():
        monkeypatch.setenv(name, value)
    options = NatOptions()
    options.parseOptions(container["args"][1:])
    assert options["listen"] == ("", 5784)
    assert len(options["destinations"]) == 3
    assert options["console-port"] == 5799 and options["no-stdin-console"]
    service = next(d for d in documents if d["kind"] == "Service" and d["metadata"]["name"] == "nettester-nat")
    assert service["spec"]["ports"][0]["protocol"] == "UDP"
    # The NAT forwards to the cluster's pods: the overlay deploys both.
    workloads = [(workload["kind"], workload["metadata"]["name"]) for workload, _ in pod_templates(documents)]
    assert ("StatefulSet", "coap-cluster") in workloads
