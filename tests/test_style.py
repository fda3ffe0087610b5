"""The tree passes ruff and mypy (both configured in pyproject.toml), and no module grows past 800 lines.

The tools run as the README's test command installs them (the ``test``
extra), from the checkout's root: ruff over the whole repository, mypy over
the files its configuration names (``nettester`` and ``twisted/plugins``),
with its incremental cache in ``.mypy_cache`` (about 20 s cold, 2 s warm).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 800


def _run_tool(*arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_ruff_finds_nothing() -> None:
    result = _run_tool("ruff", "check", "--no-cache", "--output-format", "concise", ".", timeout=120)
    assert result.returncode == 0, f"ruff check:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing() -> None:
    result = _run_tool("mypy", timeout=240)
    assert result.returncode == 0, f"mypy:\n{result.stdout}{result.stderr}"


def test_no_module_over_800_lines() -> None:
    too_long = {}
    for path in sorted((ROOT / "nettester").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long[str(path.relative_to(ROOT))] = lines
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them along a seam): {too_long}"


def test_docstrings_use_rest_markup_only() -> None:
    """One docstring markup (reST): no epytext fields or inline markup left in any Python file of the tree."""
    epytext = re.compile(r"\b[CLIBU]\{[A-Za-z_]|^\s*@(param|type|return|rtype|raise|ivar|cvar)\b", re.MULTILINE)
    found = []
    for tree in ("nettester", "tests", "benchmarks", "twisted"):
        for path in sorted((ROOT / tree).rglob("*.py")):
            for match in epytext.finditer(path.read_text()):
                found.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert not found, "epytext markup (write ``code`` and :param name: instead):\n" + "\n".join(found)
