"""twistd Options with one sub-command per role, and makeService.

Roles come from the protocol modules found under ``nettester.plugins`` with
``twisted.plugin.getPlugins``, plus the built-in ``local`` role.
"""

from __future__ import annotations

import gc
import signal
import sys
from collections.abc import Generator
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import ILogObserver
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.components import Componentized

import nettester
from nettester.interfaces import IProtocolModule, IReportingService, IRole
from nettester.logs import Logger, make_observer, parse_level
from nettester.metrics import SummaryReporter, metrics_http_service, new_registry
from nettester.options import RoleOptions

log = Logger()

_exit_status = [0]


def set_exit_status(status: int) -> None:
    """Record the status the ``nettester`` console script exits with."""
    _exit_status[0] = status


def exit_status() -> int:
    return _exit_status[0]


def discover_modules() -> list[IProtocolModule]:
    """Every installed protocol module, sorted by name."""
    import nettester.plugins

    return sorted(getPlugins(IProtocolModule, nettester.plugins), key=lambda module: module.name)


def discover_roles() -> dict[str, IRole]:
    """Role name -> role, for every installed module plus ``local``."""
    from nettester.local import local_role

    roles: dict[str, IRole] = {}
    for module in discover_modules():
        for role in module.roles:
            roles[role.name] = role
    roles[local_role.name] = local_role
    return roles


class Options(usage.Options):
    """``nettester <role> [options]``; ``nettester <role> --help`` for a role's options."""

    @property
    def synopsis(self) -> str:  # type: ignore[override]
        """``<role> [options]`` at the top; the role's own synopsis follows its name."""
        return "" if self.subCommand else "<role> [options]"

    def getSynopsis(self) -> str:
        return super().getSynopsis().rstrip()

    longdesc = (
        "Run one nettester role in the foreground. Every role prints a summary line "
        "every --stats-interval seconds and a final one when stopped (Ctrl-C / SIGTERM). "
        "'nettester <role> --help' lists the role's options."
    )

    def __init__(self) -> None:
        super().__init__()
        self.roles = discover_roles()

    @property
    def subCommands(self) -> list[tuple[str, None, type[RoleOptions], str]]:  # type: ignore[override]
        return [(role.name, None, role.options, role.summary) for role in self.roles.values()]

    def opt_version(self) -> None:
        """Display nettester's version and exit."""
        sys.stdout.write(f"nettester {nettester.__version__}\n")
        sys.exit(0)

    def postOptions(self) -> None:
        if not self.subCommand:
            raise usage.UsageError(f"name a role: one of {', '.join(self.roles)}")


class SequentialStopService(MultiService):
    """Stops its children one after the other, last added first.

    The summary reporter is added first, so the final summary is printed
    only after the role has really stopped (its connections closed).
    """

    @inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
        Service.stopService(self)
        for child in reversed(list(self)):
            yield maybeDeferred(child.stopService)


class RoleRootService(SequentialStopService):
    """The root of a running role: installs its log observer into twistd's application."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def with_reporting(service: IService, name: str, options: RoleOptions, clock: Any) -> MultiService:
    """Wrap C{service} with its summary reporter and, if asked, its metrics endpoint."""
    wrapper = SequentialStopService()
    if IReportingService.providedBy(service):
        SummaryReporter(clock, name, service.summary, options["stats-interval"]).setServiceParent(wrapper)
        if options["metrics-port"]:
            registry = new_registry(service.metrics)
            # /ready: the role's own readiness where it has one (coap-server), else "it is running".
            is_ready = getattr(service, "is_ready", lambda: bool(service.running))
            metrics_http_service(options["metrics-port"], registry, options["metrics-interface"],
                                 is_ready=is_ready).setServiceParent(wrapper)
    service.setServiceParent(wrapper)
    return wrapper


# Servers keep large live tables (CoAP deduplication, NAT entries, DTLS
# sessions) of objects that never form cycles. With CPython's default
# thresholds (700, 10, 10) the collector walks them over and over: CoAP
# throughput fell by a quarter once a million exchanges were remembered.
# Rarer collections keep it flat; cyclic garbage just lives a little longer.
GC_THRESHOLDS = (100_000, 50, 100)


def build(role: IRole, options: RoleOptions, clock: Any = None) -> RoleRootService:
    """The whole service tree of a role: logging, reporting, the role itself."""
    if clock is None:
        from twisted.internet import reactor as clock
    gc.set_threshold(*GC_THRESHOLDS)
    root = RoleRootService(make_observer(options["log-format"], parse_level(options["log-level"])))
    with_reporting(role.makeService(options), role.name, options, clock).setServiceParent(root)
    if IReactorCore.providedBy(clock):
        clock.addSystemEventTrigger("before", "shutdown", answer_repeated_stop_signals)
    return root


def answer_repeated_stop_signals() -> None:
    """Once shutdown has begun, a second Ctrl-C or SIGTERM gets a line, not a traceback.

    Twisted's own handler would call reactor.stop() again, which raises
    ReactorNotRunning while the role is still closing its connections.
    """

    def already_stopping(signum: int, frame: Any) -> None:
        log.warn(
            "already shutting down: waiting for open connections to close, then the final summary",
            event="shutdown_pending",
            signal=signal.Signals(signum).name,
        )

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, already_stopping)


def makeService(options: Options) -> IService:
    """twistd entry point."""
    return build(options.roles[options.subCommand], options.subOptions)
