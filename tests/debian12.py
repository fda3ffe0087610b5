"""A fresh Debian 12 for the deployment tests: mmdebstrap builds it once, buildah runs it.

The root file system has ``python3``, ``python3-venv`` and ``ca-certificates``
and nothing else (``--variant=apt``: the essential packages and apt, as a new
Debian 12 machine or container). It is cached as a tarball under
``/var/cache/nettester`` (``NETTESTER_CACHE``) and as a local buildah image, so
repeated CI runs skip the build.

OCI runtimes cannot start containers on the CI machines (setting rlimits is
refused), so everything runs with ``--isolation chroot``; ``--network host``
lets pip reach the package index through the host's pip configuration and CA
bundle, mounted read-only, and the host's ``PIP_*`` environment.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.interop.peers import installed

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("python3", "python3-venv", "ca-certificates")
SUITE = "bookworm"
BASE_IMAGE = "localhost/nettester-debian12:python3"
CACHE = Path(os.environ.get("NETTESTER_CACHE", "/var/cache/nettester"))
ROOTFS = CACHE / f"debian12-{'-'.join(PACKAGES)}.tar"
# The host's pip configuration and CA bundle, when it has them.
HOST_MOUNTS = tuple(path for path in ("/etc/pip.conf", "/etc/ssl/certs") if os.path.exists(path))


def require_tools() -> None:
    """mmdebstrap and buildah, or a skip (a failure under CI=true, where 60-deploy.sh installs them)."""
    for tool in ("mmdebstrap", "buildah"):
        installed(tool, "apt-get install mmdebstrap buildah, as .ci/install.d/60-deploy.sh does")


def run(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; a failure names ``what`` and shows the end of its output."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-6000:]
        raise AssertionError(f"{what} failed with status {result.returncode}:\n{output}")
    return result


def base_image() -> str:
    """The local Debian 12 image (built from the cached root file system when missing)."""
    present = subprocess.run(["buildah", "inspect", "--type", "image", BASE_IMAGE], capture_output=True, timeout=60)
    if present.returncode == 0:
        return BASE_IMAGE
    if not ROOTFS.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = ROOTFS.with_suffix(".partial.tar")
        run(["mmdebstrap", "--quiet", "--variant=apt", f"--include={','.join(PACKAGES)}", SUITE, str(partial)],
            timeout=900, what="mmdebstrap (Debian 12 root file system)")
        partial.rename(ROOTFS)
    container = run(["buildah", "from", "scratch"], timeout=60, what="buildah from scratch").stdout.strip()
    try:
        run(["buildah", "add", "--quiet", container, str(ROOTFS), "/"], timeout=300, what="buildah add (rootfs)")
        run(["buildah", "commit", "--quiet", container, BASE_IMAGE], timeout=300, what="buildah commit")
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=60)
    return BASE_IMAGE


def host_options() -> list[str]:
    """``buildah run`` / ``buildah build`` options: host network, pip configuration, CA bundle, PIP_* variables."""
    options = ["--isolation", "chroot", "--network", "host"]
    for path in HOST_MOUNTS:
        options += ["--volume", f"{path}:{path}:ro"]
    return options


def pip_environment() -> list[str]:
    """``--env NAME=VALUE`` for every PIP_* variable of this process."""
    options: list[str] = []
    for name, value in sorted(os.environ.items()):
        if name.startswith("PIP_"):
            options += ["--env", f"{name}={value}"]
    return options


@contextmanager
def working_container(image: str) -> Iterator[str]:
    """A buildah working container from ``image``, removed afterwards."""
    container = run(["buildah", "from", "--quiet", image], timeout=120, what=f"buildah from {image}").stdout.strip()
    try:
        yield container
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, timeout=60)
