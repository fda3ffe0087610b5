"""The wheel carries the twistd plugin, and an installed copy lists every role.

Plain ``find:`` packaging silently drops ``twisted/plugins``; this test builds
the real wheel and runs the installed copy away from the source tree. A
plain ``pip install -e .`` (PEP 660, no compat mode) is tried for real in a
fresh venv.
"""

import configparser
import email
import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import twisted
from packaging.requirements import Requirement
from twisted.internet.epollreactor import EPollReactor

import nettester
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


def test_wheel_metadata_is_complete(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    assert "nettester/py.typed" in names
    (license_file,) = [name for name in names if name.endswith("dist-info/licenses/LICENSE")]
    assert archive.read(license_file).startswith(b"MIT License")
    (metadata_file,) = [name for name in names if name.endswith("dist-info/METADATA")]
    metadata = email.message_from_bytes(archive.read(metadata_file))
    assert metadata["Version"] == nettester.__version__
    assert metadata["License"] == "MIT"
    classifiers = metadata.get_all("Classifier")
    for classifier in ("Typing :: Typed", "Framework :: Twisted", "Programming Language :: Python :: 3.11",
                       "Operating System :: POSIX :: Linux", "Development Status :: 4 - Beta"):
        assert classifier in classifiers
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist")]
    runtime = {requirement.name.lower() for requirement in requirements if requirement.marker is None}
    assert "txaio" not in runtime  # declared once, never imported: removed
    interop = [requirement for requirement in requirements
               if requirement.marker is not None and requirement.marker.evaluate({"extra": "interop"})]
    assert any("tinydtls" in requirement.extras for requirement in interop)
    test = [requirement for requirement in requirements
            if requirement.marker is not None and requirement.marker.evaluate({"extra": "test"})]
    assert not any("tinydtls" in requirement.extras for requirement in test), "the test extra must build anywhere"


def _twisted_requirement() -> Requirement:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    (line,) = [line for line in config["options"]["install_requires"].splitlines()
               if line.strip().lower().startswith("twisted")]
    return Requirement(line.strip())


def test_the_installed_twisted_is_within_the_tested_bound() -> None:
    """nettester/reactor.py uses EPollReactor's private internals: only tested releases are allowed."""
    requirement = _twisted_requirement()
    assert requirement.specifier.contains(twisted.__version__), (
        f"Twisted {twisted.__version__} is outside {requirement.specifier}: run the suite against it "
        "(tests/test_reactor.py) and move the bound in setup.cfg"
    )
    assert any(spec.operator == "<" for spec in requirement.specifier), "Twisted needs an upper bound"
    for private in ("_poller", "_selectables", "_disconnectSelectable", "_doReadOrWrite", "_reads"):
        assert hasattr(EPollReactor(), private) or hasattr(EPollReactor, private), private


def test_version_is_nettesters() -> None:
    result = subprocess.run([sys.executable, "-m", "nettester", "--version"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"nettester {nettester.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", nettester.__version__)


@pytest.fixture(scope="module")
def editable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install -e .`` as the README's users run it (PEP 660, no compat mode).

    Its dependencies come from this test run's own site-packages (a path
    line), so only the editable install itself is built.
    """
    env_dir = tmp_path_factory.mktemp("editable") / "venv"
    venv.create(env_dir, with_pip=True)
    site_packages = Path(sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})["purelib"])
    (site_packages / "_outer_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(env_dir / "bin" / "pip"), "install", "-q", "--no-deps", "-e", str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    return env_dir


def _run_editable(env_dir: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(argv, cwd=env_dir.parent, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "path importer cache" not in result.stderr
    assert "Warning" not in result.stderr, result.stderr
    return result


def test_editable_install_twistd_lists_every_role(editable: Path) -> None:
    code = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', '-n', 'nettester', '--help']; run()"
    listing = _run_editable(editable, [str(editable / "bin" / "python"), "-c", code]).stdout
    for role in discover_roles():
        assert f"    {role} " in listing or f"    {role}\n" in listing, role


def test_editable_install_console_script_lists_every_role(editable: Path) -> None:
    listing = _run_editable(editable, [str(editable / "bin" / "nettester"), "--help"]).stdout
    for role in discover_roles():
        assert role in listing
    version = _run_editable(editable, [str(editable / "bin" / "nettester"), "--version"]).stdout
    assert version.strip() == f"nettester {nettester.__version__}"


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
