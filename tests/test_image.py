"""The Dockerfile builds from a local Debian 12 base, and its entrypoint runs as uid 10001.

``buildah build --isolation chroot`` with ``BASE_IMAGE`` set to the fresh
Debian 12 of tests/debian12.py (no registry is reachable from CI), then the
image's own entrypoint, as its own user, with ``--version``, ``--help`` and
``local --duration 10``.
"""

from __future__ import annotations

import json
import re
import time
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import nettester
from tests.debian12 import ROOT, base_image, host_options, pip_environment, require_tools, run, working_container

IMAGE = "localhost/nettester:ci"
UID = "10001"
# Every port a role listens on by default (or in the k8s overlays): the Dockerfile must EXPOSE each.
ROLE_PORTS = {"49665/tcp", "3478/udp", "3478/tcp", "5683/udp", "5684/udp", "5783/udp", "5784/udp", "5884/udp",
              "5799/tcp", "8080/tcp", "9100/tcp"}


def test_the_dockerfile_takes_its_base_as_an_argument_and_pins_its_dependencies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert dockerfile.count("FROM ${BASE_IMAGE}") == 2
    assert "--constraint constraints.txt" in dockerfile
    assert "ARG EXTRAS=" in dockerfile and '".${EXTRAS:+[${EXTRAS}]}"' in dockerfile
    exposed = {port for line in dockerfile.splitlines() if line.startswith("EXPOSE") for port in line.split()[1:]}
    assert exposed == ROLE_PORTS
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][^ ]*", pin) for pin in pins), pins
    assert any(pin.lower().startswith("twisted==") for pin in pins)


def _runtime_closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution ``name`` (with ``extras``) needs at run time (extras followed, markers evaluated
    here), ``name`` excluded."""
    seen: dict[str, frozenset[str]] = {}
    pending = [(name, extras)]
    while pending:
        distribution, extras = pending.pop()
        key = canonicalize_name(distribution)
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, frozenset()) | extras
        for text in metadata.requires(distribution) or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate({"extra": extra})
                                                 for extra in ("", *extras)):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return set(seen) - {canonicalize_name(name)}


def test_the_constraints_pin_every_runtime_dependency() -> None:
    """constraints.txt is a resolved environment: a new install_requires line (or a new transitive
    dependency) without a refreshed file fails here, not in the image build."""
    pins = {canonicalize_name(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    missing = _runtime_closure("nettester", frozenset({"plots"})) - pins  # the image's EXTRAS=plots too
    assert not missing, f"constraints.txt does not pin {sorted(missing)}: refresh it (README, 'The image')"


def test_the_readme_runs_every_role_in_the_image() -> None:
    from nettester.module import discover_roles

    section = (ROOT / "README.md").read_text().split("### The image", 1)[1].split("\n### ", 1)[0]
    run_roles = set(re.findall(r"^docker run .*? nettester:[\w.-]+ ([a-z-]+)", section, re.MULTILINE))
    missing = set(discover_roles()) - run_roles
    assert not missing, f"README, 'The image': no docker run line for {sorted(missing)}"


@pytest.fixture(scope="module")
def image() -> str:
    require_tools()
    base = base_image()
    started = time.monotonic()
    run(["buildah", "build", *host_options(), "--quiet", "--build-arg", f"BASE_IMAGE={base}",
         "--tag", IMAGE, "--file", str(ROOT / "Dockerfile"), str(ROOT)], timeout=900, what="buildah build")
    print(f"image built from {base} in {time.monotonic() - started:.0f} s")
    return IMAGE


def _config(image: str) -> dict:
    inspected = json.loads(run(["buildah", "inspect", "--type", "image", image], timeout=60,
                               what="buildah inspect").stdout)
    return inspected["OCIv1"]["config"]


@pytest.mark.timeout(1200)
def test_the_image_runs_its_entrypoint_as_uid_10001(image: str) -> None:
    config = _config(image)
    assert config["User"] == f"{UID}:{UID}"
    assert set(config["ExposedPorts"]) == ROLE_PORTS
    entrypoint = config["Entrypoint"]
    assert entrypoint == ["nettester"]
    with working_container(image) as container:
        def entrypoint_run(*args: str, timeout: float) -> str:
            result = run(["buildah", "run", *host_options(), *pip_environment(), "--user", f"{UID}:{UID}",
                          container, "--", *entrypoint, *args], timeout=timeout, what=f"nettester {' '.join(args)}")
            return result.stdout + result.stderr

        assert entrypoint_run("--version", timeout=60).strip() == f"nettester {nettester.__version__}"
        assert "keepalive-server" in entrypoint_run("--help", timeout=60)
        output = entrypoint_run("local", "--duration", "10", timeout=300)
        assert "Permission denied" not in output and "Traceback" not in output, output
        verdicts = [line for line in output.splitlines() if "local verdict" in line]
        assert verdicts and all("PASS" in line for line in verdicts), output[-4000:]
        whoami = run(["buildah", "run", *host_options(), "--user", f"{UID}:{UID}", container, "--", "python3", "-c",
                      "import os; print(os.getuid())"], timeout=60, what="uid check").stdout
        assert whoami.strip() == UID
