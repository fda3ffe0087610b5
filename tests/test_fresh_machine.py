"""Both README quick-start commands pass on a fresh Debian 12 that has python3 and python3-venv only.

The committed checkout (``git archive HEAD``) is copied into a fresh Debian 12
container (tests/debian12.py) and the two commands are run there exactly as
the README writes them, one after the other, as a new user would.

The README's test command runs the whole suite inside, this file included:
there it skips, because the fresh machine has neither mmdebstrap nor buildah
and ``CI`` is not set inside (only ``PIP_*`` variables are passed in), so
there is no recursion. Each command runs with a time bound.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.debian12 import ROOT, base_image, host_options, pip_environment, require_tools, run, working_container
from tests.test_readme import _quick_start_commands

CHECKOUT = "/root/nettester"
# Bounds (seconds): the run command installs and runs `nettester local` (30 s);
# the test command installs the test extras and runs the suite without peers.
RUN_COMMAND_BOUND = 600
TEST_COMMAND_BOUND = 1200


@pytest.mark.timeout(RUN_COMMAND_BOUND + TEST_COMMAND_BOUND + 900)
def test_both_quick_start_commands_pass_on_a_fresh_debian_12(tmp_path: Path) -> None:
    require_tools()
    run_command, test_command = _quick_start_commands()
    archive = tmp_path / "checkout.tar"
    run(["git", "-C", str(ROOT), "archive", "--format=tar", f"--output={archive}", "HEAD"], timeout=120,
        what="git archive HEAD")
    image = base_image()
    with working_container(image) as container:
        run(["buildah", "add", "--quiet", container, str(archive), CHECKOUT], timeout=300,
            what="buildah add (checkout)")
        for number, (command, bound, proof) in enumerate(((run_command, RUN_COMMAND_BOUND, "local verdict"),
                                                          (test_command, TEST_COMMAND_BOUND, " passed"))):
            started = time.monotonic()
            log = tmp_path / f"readme-command-{number + 1}.log"
            try:
                result = subprocess.run(["buildah", "run", *host_options(), *pip_environment(), "--workingdir",
                                         CHECKOUT, container, "--", "sh", "-c", command],
                                        capture_output=True, text=True, timeout=bound)
            except subprocess.TimeoutExpired as expired:
                log.write_text(_text(expired.stdout) + _text(expired.stderr))
                pytest.fail(f"README command {command!r} took more than {bound} s on a fresh Debian 12 "
                            f"(its output: {log}):\n{digest(_text(expired.stdout) + _text(expired.stderr))}")
            output = result.stdout + result.stderr
            log.write_text(output)
            assert result.returncode == 0 and proof in output, (
                f"README command {command!r} ended with status {result.returncode} on a fresh Debian 12 "
                f"(its whole output: {log}):\n{digest(output)}")
            print(f"fresh Debian 12: {command!r} passed in {time.monotonic() - started:.0f} s: "
                  f"{digest(result.stdout, tail=1).strip()}")


def _text(output: str | bytes | None) -> str:
    """What a timed-out run had written (bytes, text or nothing)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def digest(output: str, tail: int = 30) -> str:
    """What a CI log must show even when it is cut: pip's errors, pytest's failure summary, the last lines."""
    lines = output.splitlines()
    wanted = [line for line in lines if line.startswith(("ERROR", "FAILED", "error:"))][:40]
    return "\n".join([*wanted, "...", *lines[-tail:]] if wanted else lines[-tail:])
