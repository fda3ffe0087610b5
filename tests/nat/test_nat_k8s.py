"""k8s/nat.yaml configures a working nat role (schema and env-var names: tests/test_k8s_manifests.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nettester.nat.options import NatOptions

MANIFEST = Path(__file__).resolve().parents[2] / "k8s" / "nat.yaml"


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_the_container_runs_the_nat_role_configured_by_its_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "nettester:latest"
    assert container["args"][0] == "nat"
    for variable in container["env"]:
        monkeypatch.setenv(variable["name"], variable["value"])
    options = NatOptions()
    options.parseOptions(container["args"][1:])
    assert options["listen"] == ("", 5784)
    assert len(options["destinations"]) == 3
    assert options["console-port"] == 5799 and options["no-stdin-console"]
    service = next(d for d in documents() if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["protocol"] == "UDP"
