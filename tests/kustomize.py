"""The Kubernetes manifests as a cluster receives them: each overlay rendered with ``kubectl kustomize``.

kubectl (Debian's ``kubernetes-client``, or any with kustomize built in) is a
peer like the others: a skip without it, a failure under CI=true.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.interop.peers import installed

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if (path / "kustomization.yaml").exists())
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


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl kustomize directory`` renders."""
    kubectl = installed("kubectl", "Debian's kubernetes-client; .ci/install.d/60-deploy.sh")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@functools.cache
def _rendered(name: str) -> str:
    return yaml.safe_dump_all(kustomize(K8S / "overlays" / name))


def render_overlay(name: str) -> list[dict[str, Any]]:
    """The rendered overlay ``k8s/overlays/<name>`` (a fresh copy: tests may change it)."""
    return [document for document in yaml.safe_load_all(_rendered(name)) if document]


def pod_templates(documents: Sequence[Mapping[str, Any]]) -> Iterator[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """``(workload, pod template)`` of every workload."""
    for document in documents:
        path = POD_PATHS.get(document.get("kind", ""))
        if path is None:
            continue
        pod: Any = document
        for key in path:
            pod = pod[key]
        yield document, pod


def nettester_containers(pod: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod.get("spec", {})
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if container.get("image", "").split(":")[0].rsplit("/", 1)[-1] == IMAGE:
            yield container


def environment(documents: Sequence[Mapping[str, Any]], container: Mapping[str, Any]) -> dict[str, Any]:
    """Every variable a container gets: ``env`` (value, or the valueFrom mapping) and its ConfigMaps' keys."""
    config_maps = {document["metadata"]["name"]: document.get("data", {}) for document in documents
                   if document.get("kind") == "ConfigMap"}
    variables: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"container {container['name']}: ConfigMap {name} is not rendered"
        variables.update(config_maps[name])
    for variable in container.get("env", []):
        variables[variable["name"]] = variable.get("value", variable.get("valueFrom"))
    return variables
