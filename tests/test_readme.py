"""The README's two quick-start commands stay true, and CI runs the same test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_quick_start_has_a_run_command_and_a_test_command() -> None:
    run_command, test_command = _quick_start_commands()
    assert run_command.endswith("nettester local")
    assert "pip install" in run_command
    assert "pip install" in test_command and test_command.endswith("-m pytest")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    _, test_command = _quick_start_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_every_role_is_documented() -> None:
    from nettester.module import discover_roles

    readme = (ROOT / "README.md").read_text()
    for role in discover_roles():
        assert f"nettester {role}" in readme, f"README does not show 'nettester {role}'"
