"""Every Kubernetes manifest under k8s/ is valid, and configures only what its role reads.

Generic over modules: each document is validated against the Kubernetes
schemas (kubernetes-validate), and every container running the nettester
image must name an installed role as its first argument and set only
environment variables that role reads (its options' ``envVars``, merged along
the class hierarchy, which includes the common LOG_LEVEL / LOG_FORMAT).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from twisted.python import reflect

from nettester.module import discover_roles

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = sorted((ROOT / "k8s").glob("*.y*ml"))
KUBERNETES_VERSION = "1.30"
IMAGE = "nettester"
# Where a pod template sits in each workload kind.
POD_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as manifest:
        return [document for document in yaml.safe_load_all(manifest) if document]


def nettester_containers(document: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    path = POD_PATHS.get(document.get("kind", ""))
    if path is None:
        return
    pod: Any = document
    for key in path:
        pod = pod[key]
    spec = pod.get("spec", {})
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if container.get("image", "").split(":")[0].rsplit("/", 1)[-1] == IMAGE:
            yield container


def role_env_vars(options_class: type) -> set[str]:
    env_vars: dict[str, str] = {}
    reflect.accumulateClassDict(options_class, "envVars", env_vars)
    return set(env_vars.values())


def test_there_are_manifests() -> None:
    assert MANIFESTS, "no manifest under k8s/"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_nettester_container_runs_a_role_and_sets_only_its_env_vars(path: Path) -> None:
    roles = discover_roles()
    for document in documents(path):
        for container in nettester_containers(document):
            args = container.get("args") or []
            assert args and args[0] in roles, (
                f"{path.name}: container {container['name']}: args must start with a role, one of {sorted(roles)}")
            readable = role_env_vars(roles[args[0]].options)
            unknown = {variable["name"] for variable in container.get("env", [])} - readable
            assert not unknown, (
                f"{path.name}: container {container['name']} sets {sorted(unknown)}, which {args[0]} does not read; "
                f"it reads {sorted(readable)}")


def test_the_checks_catch_a_wrong_variable_and_an_invalid_field() -> None:
    deployment = documents(ROOT / "k8s" / "keepalive-client.yaml")[0]
    [container] = nettester_containers(deployment)
    assert "TCP_SERVER_IP" in role_env_vars(discover_roles()[container["args"][0]].options)
    assert "STUN_SERVER_IP" not in role_env_vars(discover_roles()[container["args"][0]].options)
    deployment["spec"]["replicas"] = "five"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
