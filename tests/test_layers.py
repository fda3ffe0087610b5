"""The package's layers, as the README's architecture section draws them: nothing imports upward.

Every ``import`` is read with ``ast``, function-level ones included, so a
late import cannot hide an upward dependency. The sans-IO cores are imported
in a fresh interpreter to prove that none of them pulls in
``twisted.internet``, directly or through another module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nettester"
IMPORT_CYCLES = ROOT.parent / "shared" / "tools" / "import_cycles.py"

#: Shared ground: used by every layer above, imports none of them.
FOUNDATION = ("interfaces", "addresses", "link", "logs", "options", "metrics", "pump", "reactor", "steering",
              "udplink", "workers", "histogram", "mmsg", "tally")
#: Wiring shared by roles: the registry, the service tree, the worker supervisor.
WIRING = ("module", "service", "supervisor")
#: Where the protocols live: cores, adapters, options and role builders.
PROTOCOL_TREES = ("protocols", "cluster", "nat", "report")
#: The entry points, imported by nobody inside the package but each other.
ENTRY_POINTS = ("tap", "cli", "__main__")

#: The sans-IO cores: bytes and ``now`` in, bytes, timers and events out.
CORES = (
    "nettester.protocols.coap.message", "nettester.protocols.coap.layer", "nettester.protocols.coap.events",
    "nettester.protocols.coap.exchanges", "nettester.protocols.coap.parameters",
    "nettester.protocols.coap.blockwise", "nettester.protocols.coap.observe", "nettester.protocols.coap.store",
    "nettester.protocols.coap.uri", "nettester.protocols.coap.linkformat", "nettester.protocols.coap.attribution",
    "nettester.protocols.coap.tcp", "nettester.protocols.coap.reliable",
    "nettester.protocols.dtls.record", "nettester.protocols.dtls.handshake", "nettester.protocols.dtls.suites",
    "nettester.protocols.dtls.configuration", "nettester.protocols.dtls.events", "nettester.protocols.dtls.alerts",
    "nettester.protocols.dtls.connection", "nettester.protocols.dtls.core",
    "nettester.protocols.dtls.client_handshake", "nettester.protocols.dtls.server_handshake",
    "nettester.protocols.dtls.peers", "nettester.protocols.dtls.cookie", "nettester.protocols.dtls.cid",
    "nettester.protocols.dtls.snapshot",
    "nettester.protocols.stun.message", "nettester.protocols.stun.responder", "nettester.protocols.stun.fleet",
    "nettester.protocols.stun.attribution", "nettester.protocols.stun.timerwheel",
    "nettester.protocols.keepalive.wire", "nettester.protocols.keepalive.backoff",
    "nettester.cluster.wire", "nettester.cluster.router", "nettester.cluster.replication",
    "nettester.cluster.nodes", "nettester.nat.table",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str | None = None) -> set[str]:
    """Every nettester module ``path`` (module ``name``) imports, at any depth of the file."""
    names: set[str] = set()
    name = name or module_name(path)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "nettester" or name.startswith("nettester.")}


def top(name: str) -> str:
    """``nettester.protocols.coap.layer`` -> ``protocols``; ``nettester`` -> ``""``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> dict[str, set[str]]:
    return {module_name(path): imported(path) for path in sorted(PACKAGE.rglob("*.py"))}


def upward(importer_tops: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{importer} imports {name}" for importer, names in modules().items()
                  if top(importer) in importer_tops for name in names if top(name) in forbidden)


def test_the_foundation_imports_no_layer_above_it() -> None:
    above = (*WIRING, *PROTOCOL_TREES, "plugins", "local", *ENTRY_POINTS)
    assert upward(FOUNDATION, above) == []


def test_the_wiring_imports_no_protocol_plugin_or_entry_point() -> None:
    found = upward(WIRING, (*PROTOCOL_TREES, "plugins", "local", *ENTRY_POINTS))
    assert [line for line in found if line != "nettester.module imports nettester.plugins"] == []


def test_protocols_import_no_plugin_scenario_or_entry_point() -> None:
    assert upward(PROTOCOL_TREES, ("plugins", "local", *ENTRY_POINTS)) == []


def test_plugins_are_found_by_the_registry_never_imported() -> None:
    importers = sorted(importer for importer, names in modules().items() if top(importer) != "plugins"
                       for name in names if top(name) == "plugins" and name != "nettester.plugins")
    assert importers == []
    # the registry hands the plugins package to getPlugins, and only the registry
    holders = sorted(importer for importer, names in modules().items() if "nettester.plugins" in names)
    assert holders == ["nettester.module"]


def test_the_rule_sees_late_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function counts."""
    sample = PACKAGE / "metrics.py"
    assert "nettester.logs" in imported(sample)
    late = tmp_path / "late.py"
    late.write_text("def f():\n    from nettester.tap import Options\n")
    assert "nettester.tap" in imported(late, "nettester.late")


def test_sans_io_cores_pull_in_no_twisted_internet() -> None:
    code = ("import sys\n" + "".join(f"import {core}\n" for core in CORES)
            + "print(sorted({name.split('.')[1] for name in sys.modules if name.startswith('twisted.')}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(eval(result.stdout)) & {"internet", "application", "web"} == set(), result.stdout


def test_no_import_cycles() -> None:
    if not IMPORT_CYCLES.exists():
        pytest.skip(f"{IMPORT_CYCLES} is not beside the checkout")
    result = subprocess.run([sys.executable, str(IMPORT_CYCLES), "nettester"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
