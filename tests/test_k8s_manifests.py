"""Every kustomize overlay under k8s/ renders to valid, hardened workloads that configure only what their role reads.

Each overlay is rendered with ``kubectl kustomize`` (also with the optional
PodMonitor component) and every document is validated against the Kubernetes
schemas (kubernetes-validate). Every container running the nettester image
names an installed role as its first argument and gets only environment
variables that role reads (``env`` and its ConfigMaps; the role's options'
``envVars``, merged along the class hierarchy, LOG_LEVEL / LOG_FORMAT
included). The Grafana dashboards query only metrics some role exports.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from twisted.python import reflect

import nettester
from nettester.module import discover_roles
from tests.kustomize import K8S, OVERLAYS, environment, kustomize, nettester_containers, pod_templates, render_overlay
from tests.scrape import exported_sample_names

KUBERNETES_VERSION = "1.30"
UID = 10001
DASHBOARDS = sorted((K8S / "dashboards").glob("*.json"))
# Custom resources kubernetes-validate has no schema for (checked by their own tests below).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}


def role_env_vars(options_class: type) -> set[str]:
    env_vars: dict[str, str] = {}
    reflect.accumulateClassDict(options_class, "envVars", env_vars)
    return set(env_vars.values())


def with_podmonitor(overlay: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The overlay with the optional PodMonitor component added, as a user enables it."""
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / overlay, tmp_path)}\n"
        f"components:\n  - {os.path.relpath(K8S / 'components' / 'podmonitor', tmp_path)}\n")
    return kustomize(tmp_path)


def test_there_is_one_overlay_per_scenario() -> None:
    assert OVERLAYS == ["coap-cluster", "keepalive", "nat", "stun"]
    assert not list(K8S.glob("*.y*ml")), "manifests live in k8s/base/<scenario>/, configured by k8s/overlays/"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_kubernetes(overlay: str) -> None:
    documents = render_overlay(overlay)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_nettester_container_runs_a_role_and_gets_only_its_env_vars(overlay: str) -> None:
    roles = discover_roles()
    documents = render_overlay(overlay)
    containers = [container for _, pod in pod_templates(documents) for container in nettester_containers(pod)]
    assert containers
    for container in containers:
        args = container.get("args") or []
        assert args and args[0] in roles, (
            f"{overlay}: container {container['name']}: args must start with a role, one of {sorted(roles)}")
        readable = role_env_vars(roles[args[0]].options)
        unknown = set(environment(documents, container)) - readable
        assert not unknown, (
            f"{overlay}: container {container['name']} gets {sorted(unknown)}, which {args[0]} does not read; "
            f"it reads {sorted(readable)}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_overlay_sets_image_and_configuration(overlay: str) -> None:
    """Image and log level come from the overlay (a ConfigMap it generates), not from hand edits of the base."""
    documents = render_overlay(overlay)
    for _, pod in pod_templates(documents):
        for container in nettester_containers(pod):
            assert container["image"] == f"nettester:{nettester.__version__}"
            assert container.get("envFrom"), f"{overlay}: {container['name']} takes no ConfigMap from the overlay"
            assert "LOG_LEVEL" in environment(documents, container)
    variables = {name for _, pod in pod_templates(documents) for container in nettester_containers(pod)
                 for name in environment(documents, container)}
    wanted = {"keepalive": {"TCP_SERVER_IP", "TCP_CLIENT_COUNT"}, "stun": {"STUN_SERVER_IP", "STUN_CLIENT_COUNT"},
              "nat": {"NAT_DESTINATIONS"}, "coap-cluster": set()}[overlay]
    assert wanted <= variables


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened_limited_and_probed_without_log_lines(overlay: str) -> None:
    for workload, pod in pod_templates(render_overlay(overlay)):
        name = workload["metadata"]["name"]
        security = pod["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == UID, name
        assert security["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["spec"]["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
            probe = container["readinessProbe"]["httpGet"]
            assert probe["path"] == "/ready", f"{name}: probe /ready (it logs nothing per probe), not {probe['path']}"
            assert probe["port"] in {port["name"] for port in container["ports"]}, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_overlay_ships_a_secret(overlay: str) -> None:
    """Applying an overlay again must never overwrite the cluster's real management secret."""
    documents = render_overlay(overlay)
    assert not [document for document in documents if document["kind"] == "Secret"]
    for _, pod in pod_templates(documents):
        for container in pod["spec"]["containers"]:
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference is not None:
                    assert reference.get("optional") is True, f"{variable['name']}: a pod without the Secret must start"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_podmonitor_component_scrapes_every_nettester_pod(overlay: str, tmp_path: Path) -> None:
    documents = with_podmonitor(overlay, tmp_path)
    [monitor] = [document for document in documents if document["kind"] == "PodMonitor"]
    assert (monitor["apiVersion"], monitor["kind"]) in CUSTOM_KINDS
    selector = monitor["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    pods = list(pod_templates(documents))
    assert pods
    for workload, pod in pods:
        labels = pod["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
        ports = {port["name"] for container in pod["spec"]["containers"] for port in container.get("ports", [])}
        assert endpoint["port"] in ports, workload["metadata"]["name"]
    for document in documents:
        if (document["apiVersion"], document["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_checks_catch_a_wrong_variable_and_an_invalid_field() -> None:
    documents = render_overlay("keepalive")
    [(deployment, pod)] = [(w, p) for w, p in pod_templates(documents) if w["metadata"]["name"] == "keepalive-client"]
    [container] = nettester_containers(pod)
    readable = role_env_vars(discover_roles()[container["args"][0]].options)
    assert "TCP_SERVER_IP" in readable and "STUN_SERVER_IP" not in readable
    deployment["spec"]["replicas"] = "five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _queries(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_there_is_a_tester_dashboard() -> None:
    assert DASHBOARDS
    titles = " ".join(panel["title"].lower() for path in DASHBOARDS for panel in json.loads(path.read_text())["panels"])
    for topic in ("loss", "round-trip", "connections", "reset", "direction"):
        assert topic in titles, topic
    queries = [query for path in DASHBOARDS for query in _queries(json.loads(path.read_text()))]
    assert any("by (direction)" in query and "_lost_total" in query for query in queries), "no loss by direction"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.name)
def test_every_dashboard_query_names_a_metric_a_role_exports(path: Path) -> None:
    exported = exported_sample_names()
    queries = _queries(json.loads(path.read_text()))
    assert queries
    for query in queries:
        names = re.findall(r"\bnettester_[a-z0-9_]+", query)
        assert names, query
        missing = [name for name in names if name not in exported]
        assert not missing, f"{path.name}: {query!r} names {missing}, which no role exports"
