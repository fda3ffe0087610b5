"""The ``nettester`` console script: ``twistd -n nettester`` without the boilerplate.

It runs exactly the service ``twistd -n nettester <role>`` runs (same
options, same signal handling, same shutdown), in the foreground, without a
pid file, so it can be a container's entrypoint.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from twisted.application.service import ServiceMaker
from twisted.logger import globalLogBeginner
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions, runApp

from nettester.interfaces import ICommandRole
from nettester.logs import make_observer, parse_level
from nettester.options import RoleOptions
from nettester.service import exit_status_of

SERVICE_MAKER = ServiceMaker("nettester", "nettester.tap", "nettester roles", "nettester")


class _ForegroundOptions(ServerOptions):
    """twistd's options, offering only the nettester plugin.

    Looking the plugin up directly (not through twisted.plugins discovery)
    makes the script work the same from an installed wheel, an editable
    install or a source checkout.
    """

    synopsis = "Usage:"

    @property
    def subCommands(self) -> Iterator[tuple[str, None, Any, str]]:
        self.loadedPlugins = {SERVICE_MAKER.tapname: SERVICE_MAKER}
        yield (SERVICE_MAKER.tapname, None, SERVICE_MAKER.options, SERVICE_MAKER.description)


def main(argv: list[str] | None = None) -> NoReturn:
    """Parse ``argv`` as ``nettester <role> [options]`` and run the role until stopped."""
    args = sys.argv[1:] if argv is None else argv
    config = _ForegroundOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", SERVICE_MAKER.tapname, *args])
    except SystemExit:
        _flush_stdout()  # --help: a reader that stopped early (``| head``) is not an error
        raise
    except BrokenPipeError:
        _flush_stdout()
        sys.exit(0)
    except UsageError as error:
        tap_options = getattr(config, "subOptions", None)
        role = getattr(tap_options, "subCommand", None)
        hint = f"nettester {role} --help" if role else "nettester --help"
        sys.stderr.write(f"nettester: error: {error}\nTry '{hint}' for the options.\n")
        sys.exit(2)
    tap_options = config.subOptions
    tap_options.twistd_banners = False
    role = tap_options.roles[tap_options.subCommand]
    if ICommandRole.providedBy(role):
        sys.exit(_run_command(role, tap_options.subOptions))
    _install_reactor()
    runApp(config)
    sys.exit(exit_status_of(tap_options.root) if tap_options.root is not None else 1)


def _flush_stdout() -> None:
    """Flush stdout; when its reader has gone, send the rest to /dev/null (no BrokenPipeError at exit)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _install_reactor() -> None:
    """The lean datagram reactor (``nettester.reactor``) where epoll exists, unless one is installed already."""
    if hasattr(select, "epoll") and "twisted.internet.reactor" not in sys.modules:
        from nettester.reactor import install

        install()


def _run_command(role: ICommandRole, options: RoleOptions) -> int:
    """A one-shot role needs no reactor: its result on stdout, its log lines on stderr."""
    observer = make_observer(options["log-format"], parse_level(options["log-level"]), sys.stderr)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    return role.run(options, sys.stdout)
