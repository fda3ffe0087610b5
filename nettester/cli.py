"""The ``nettester`` console script: ``twistd -n nettester`` without the boilerplate.

It runs exactly the service ``twistd -n nettester <role>`` runs (same
options, same signal handling, same shutdown), in the foreground, without a
pid file, so it can be a container's entrypoint.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from twisted.application.service import ServiceMaker
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions, runApp

from nettester import tap

SERVICE_MAKER = ServiceMaker("nettester", "nettester.tap", "nettester roles", "nettester")


class _ForegroundOptions(ServerOptions):
    """twistd's options, offering only the nettester plugin.

    Looking the plugin up directly (not through twisted.plugins discovery)
    makes the script work the same from an installed wheel, an editable
    install or a source checkout.
    """

    synopsis = "Usage:"

    @property
    def subCommands(self) -> Iterator[tuple[str, None, Any, str]]:  # type: ignore[override]
        self.loadedPlugins = {SERVICE_MAKER.tapname: SERVICE_MAKER}
        yield (SERVICE_MAKER.tapname, None, SERVICE_MAKER.options, SERVICE_MAKER.description)


def main(argv: list[str] | None = None) -> NoReturn:
    """Parse C{argv} as ``nettester <role> [options]`` and run the role until stopped."""
    args = sys.argv[1:] if argv is None else argv
    config = _ForegroundOptions()
    try:
        config.parseOptions(["--nodaemon", "--pidfile=", SERVICE_MAKER.tapname, *args])
    except UsageError as error:
        tap_options = getattr(config, "subOptions", None)
        role = getattr(tap_options, "subCommand", None)
        hint = f"nettester {role} --help" if role else "nettester --help"
        sys.stderr.write(f"nettester: error: {error}\nTry '{hint}' for the options.\n")
        sys.exit(2)
    runApp(config)
    sys.exit(tap.exit_status())
