"""Service wiring shared by every role: ordered stop, reporting, the exit status.

``build`` turns a role and its parsed options into the service tree twistd
(or the ``nettester`` script) runs: a root that installs the log observer
and carries the process exit status, the role's summary reporter and
metrics endpoint, and the role's own service. Nothing here knows a
protocol module.

It also opens listening ports the same way for every role. A port that
cannot be opened (in use, no such address, no permission) is a user error:
one critical line in one shape, naming the option to change, and exit
status 1 (``listen_failed``)::

    [critical] cannot listen on 0.0.0.0:9100 (--metrics-port): Address already in use; choose another --metrics-port
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from nettester.interfaces import IReportingService, IRole
from nettester.logs import Logger, make_observer, parse_level
from nettester.metrics import SummaryReporter, metrics_site, new_registry
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


def host_port(host: str, port: int) -> str:
    """``host:port``, ``[v6]:port``; an empty host (every address) is ``*``."""
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def failed_address(error: BaseException, host: str, port: int) -> tuple[str, int]:
    """The address a listen failed on: the error's own where Twisted names it, else ``host``, ``port``."""
    if isinstance(error, CannotListenError):
        return error.interface or host, error.port if error.port is not None else port
    return host, port


def listen_error_reason(error: BaseException) -> str:
    """What the OS said, without Python's decoration: ``Address already in use``."""
    cause = error.socketError if isinstance(error, CannotListenError) else error
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause)


def log_listen_failure(host: str, port: int, option: str, error: BaseException) -> None:
    """The one-line port failure for ``option`` (``--port``, ``--metrics-port``...), in every role's words."""
    log.critical(
        "cannot listen on {address} ({option}): {reason}; choose another {option}",
        event="listen_failed",
        address=host_port(host, port),
        option=option,
        reason=listen_error_reason(error),
    )


def listen_failed(service: IService, reactor: Any, host: str, port: int, option: str, error: BaseException) -> None:
    """Log the port failure (``log_listen_failure``), then stop, exit status 1.

    ``service`` is any service of the role's tree: the exit status goes to
    its root. The reactor is stopped once it runs, so a failure during
    start-up ends the process with this line instead of a traceback.
    """
    log_listen_failure(host, port, option, error)
    set_exit_status(service, 1)
    reactor.callWhenRunning(reactor.stop)


class TCPListener(Service):
    """Listens on a TCP port while running; a port that cannot be opened is ``listen_failed``.

    ``on_listening(port)`` is called once listening (to log where).
    """

    def __init__(
        self,
        reactor: Any,
        port: int,
        factory: IProtocolFactory,
        interface: str,
        option: str,
        on_listening: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._port = port
        self._factory = factory
        self._interface = interface
        self._option = option
        self._on_listening = on_listening
        self.listening: IListeningPort | None = None
        self.failed = False

    def startService(self) -> None:
        super().startService()
        try:
            self.listening = self._reactor.listenTCP(self._port, self._factory, interface=self._interface)
        except CannotListenError as error:
            self.failed = True
            listen_failed(self, self._reactor, self._interface, self._port, self._option, error)
            return
        if self._on_listening is not None:
            self._on_listening(self.listening)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        listening, self.listening = self.listening, None
        return maybeDeferred(listening.stopListening) if listening is not None else succeed(None)


def metrics_endpoint(reactor: Any, options: RoleOptions, *metric_sets: Any,
                     is_ready: Callable[[], bool] | None = None) -> TCPListener:
    """``--metrics-port``: ``/metrics`` of these metric sets, logged as ``metrics on http://ADDR:PORT/metrics``."""

    def listening(port: IListeningPort) -> None:
        address = port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))  # a TCP port
        log.info("metrics on http://{address}/metrics", event="metrics_listening",
                 address=host_port(address.host, address.port))

    return TCPListener(reactor, options["metrics-port"], metrics_site(new_registry(*metric_sets), is_ready=is_ready),
                       options["metrics-interface"], "--metrics-port", listening)


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


def with_reporting(service: IService, name: str, options: RoleOptions, reactor: Any,
                   metrics: bool = True) -> MultiService:
    """Wrap ``service`` with its summary reporter and, if asked (and ``metrics``), its metrics endpoint."""
    wrapper = SequentialStopService()
    if IReportingService.providedBy(service):
        SummaryReporter(reactor, name, service.summary, options["stats-interval"],
                        refresh=getattr(service, "refresh_summary", None)).setServiceParent(wrapper)
        if metrics and options["metrics-port"]:
            # /ready: the role's own readiness where it has one (coap-server), else "it is running".
            is_ready = getattr(service, "is_ready", lambda: bool(service.running))
            metrics_endpoint(reactor, options, service.metrics, is_ready=is_ready).setServiceParent(wrapper)
    service.setServiceParent(wrapper)
    return wrapper


# Servers keep large live tables (CoAP deduplication, NAT entries, DTLS
# sessions) of objects that never form cycles. With CPython's default
# thresholds (700, 10, 10) the collector walks them over and over: CoAP
# throughput fell by a quarter once a million exchanges were remembered.
# Rarer collections keep it flat; cyclic garbage just lives a little longer.
GC_THRESHOLDS = (100_000, 50, 100)


def build(role: IRole, options: RoleOptions, reactor: Any, twistd_banners: bool = True) -> RoleRootService:
    """The whole service tree of a role: logging, reporting, the role itself.

    ``twistd_banners=False`` (the ``nettester`` launcher) shows twistd's
    start and stop banners at debug only.
    """
    gc.set_threshold(*GC_THRESHOLDS)
    root = RoleRootService(make_observer(options["log-format"], parse_level(options["log-level"]),
                                         twistd_banners=twistd_banners,
                                         connection_lines_at_debug=options.connection_lines_at_debug))
    service: IService | None = multiprocess_service(role, options, reactor, set_exit_status)  # --workers / --processes
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

    def already_stopping(signum: int, frame: FrameType | None) -> None:
        log.warn(
            "already shutting down: waiting for open connections to close, then the final summary",
            event="shutdown_pending",
            signal=signal.Signals(signum).name,
        )

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, already_stopping)
