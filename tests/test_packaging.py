"""The wheel carries the twistd plugin, and an installed copy lists every role.

Plain ``find:`` packaging silently drops ``twisted/plugins``; this test builds
the real wheel and runs the installed copy away from the source tree.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nettester.module import discover_roles

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("nettester-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def _run_installed(target: Path, argv: list[str]) -> str:
    """Run with only the installed copy importable (cwd is not the checkout)."""
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run(argv, cwd=target.parent, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_wheel_contains_the_plugin_and_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/nettester_plugin.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    for plugin in (ROOT / "nettester" / "plugins").glob("*.py"):
        assert f"nettester/plugins/{plugin.name}" in names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert any(name.endswith("entry_points.txt") for name in names)


def test_installed_twistd_plugin_lists_every_role(installed: Path) -> None:
    code = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', '-n', 'nettester', '--help']; run()"
    listing = _run_installed(installed, [sys.executable, "-c", code])
    for role in discover_roles():
        assert f"    {role} " in listing or f"    {role}\n" in listing, role


def test_installed_console_script_lists_every_role(installed: Path) -> None:
    listing = _run_installed(installed, [sys.executable, str(installed / "bin" / "nettester"), "--help"])
    assert listing.startswith("Usage: nettester <role> [options]")
    for role in discover_roles():
        assert role in listing


def test_installed_twistd_offers_the_datagram_reactor(installed: Path) -> None:
    code = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help-reactors']; run()"
    result = subprocess.run([sys.executable, "-c", code], cwd=installed.parent,
                            env=dict(os.environ, PYTHONPATH=str(installed)), capture_output=True, text=True, timeout=60)
    assert "nettester-epoll" in result.stdout + result.stderr
