"""The rule every interop test follows for its third-party peer: skip without it, fail without it under CI=true."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def missing_peer(message: str) -> NoReturn:
    """A peer is missing: a skip on a laptop, a failure in CI (where .ci/install.d installs every peer)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def installed(program: str, hint: str) -> str:
    """The path of ``program`` on PATH, else ``missing_peer`` with ``hint`` (how to install it)."""
    path = shutil.which(program)
    if path is None:
        missing_peer(f"{program} is not installed ({hint})")
    return path
