"""Service wiring shared by every role: ordered stop, reporting, the exit status.

``build`` turns a role and its parsed options into the service tree twistd
(or the ``nettester`` script) runs: a root that installs the log observer
and carries the process exit status, the role's summary reporter and
metrics endpoint, and the role's own service. Nothing here knows a
protocol module.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Generator
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorCore
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from nettester.interfaces import IReportingService, IRole
from nettester.logs import Logger, make_observer, parse_level
from nettester.metrics import SummaryReporter, metrics_http_service, new_registry
from nettester.options import RoleOptions
from nettester.supervisor import multiprocess_service

log = Logger()


def set_exit_status(service: IService, status: int) -> None:
    """Record ``status`` as the exit status of the process running ``service``.

    The status lives on the root of the service tree (a ``RoleRootService``
    when the role runs for real); a service built alone, as in a unit test,
    is its own root.
    """
    _root_of(service).exit_status = status


def exit_status_of(service: IService) -> int:
    """The exit status recorded for the tree ``service`` belongs to (0 when none was)."""
    return int(getattr(_root_of(service), "exit_status", 0))


def _root_of(service: IService) -> Any:
    node: Any = service
    while getattr(node, "parent", None) is not None:
        node = node.parent
    return node


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
    """The root of a running role: installs its log observer, carries the exit status."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        self.exit_status = 0

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def with_reporting(service: IService, name: str, options: RoleOptions, clock: Any) -> MultiService:
    """Wrap ``service`` with its summary reporter and, if asked, its metrics endpoint."""
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


def build(role: IRole, options: RoleOptions, reactor: Any) -> RoleRootService:
    """The whole service tree of a role: logging, reporting, the role itself."""
    gc.set_threshold(*GC_THRESHOLDS)
    root = RoleRootService(make_observer(options["log-format"], parse_level(options["log-level"])))
    service = multiprocess_service(role, options, reactor, set_exit_status)  # --workers / --processes
    if service is None or IReportingService.providedBy(service):
        service = with_reporting(service or role.makeService(reactor, options), role.name, options, reactor)
    service.setServiceParent(root)
    if IReactorCore.providedBy(reactor):
        reactor.addSystemEventTrigger("before", "shutdown", answer_repeated_stop_signals)
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
