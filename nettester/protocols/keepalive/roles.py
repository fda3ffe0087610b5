"""The ``keepalive`` module's roles: builders on a reactor passed in, and their table.

Heavy imports (TLS, the protocol code) happen inside the builders, so listing
roles stays fast and twistd can install its reactor first.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.application.service import IService

from nettester.interfaces import ILocalScenario
from nettester.module import CommandRole, Role
from nettester.options import RoleOptions
from nettester.protocols.keepalive.options import ClientOptions, ReportOptions, ServerOptions

SUMMARY = "TCP/TLS keep-alive server and client fleet: who resets long-lived connections?"


def build_server(reactor: Any, options: RoleOptions) -> IService:
    """The keepalive-server service for parsed ``options``."""
    from nettester.protocols.keepalive import tls
    from nettester.protocols.keepalive.server import KeepAliveServerService

    certificate = options["certificate"]
    return KeepAliveServerService(reactor, options["port"], options["interface"], options["keepalive-timeout"],
                                  tls=tls.server_options(certificate) if certificate is not None else None,
                                  tls_note=tls.describe(certificate) if certificate is not None else "")


def build_client(reactor: Any, options: RoleOptions) -> IService:
    """The keepalive-client fleet for parsed ``options``."""
    from nettester.protocols.keepalive.client import KeepAliveClientService
    from nettester.protocols.keepalive.wire import ClientTiming
    from nettester.report.options import ResultSettings
    from nettester.workers import shared_run_id

    assert isinstance(options, ClientOptions)
    timing = ClientTiming(options["keepalive-interval"], options["response-timeout"], options["dummy-interval"])
    return KeepAliveClientService(reactor, options["server"], options["port"], options["clients"], timing,
                                  ramp_up=options["ramp-up"], reconnect_delay=options["reconnect-delay"],
                                  reconnect_max_delay=options["reconnect-max-delay"],
                                  tls=options["tls-creator"], connect_timeout=options["response-timeout"],
                                  results=ResultSettings.from_options(options), run_id=shared_run_id(),
                                  first_client=options.first_client)


def _report(options: RoleOptions, stdout: IO[str]) -> int:
    from nettester.protocols.keepalive.report import run_report

    return run_report(options["server_log"], options["client_logs"], stdout)


def local(reactor: Any, options: RoleOptions) -> ILocalScenario:
    from nettester.protocols.keepalive.local import KeepAliveLocalScenario

    return KeepAliveLocalScenario(reactor, options["duration"])


ROLES = (
    Role("keepalive-server", "Answer keep-alives; close connections whose keep-alive is missing.",
         ServerOptions, build_server),
    Role("keepalive-client", "Hold many keep-alive connections to a keepalive-server; log every drop.",
         ClientOptions, build_client),
    CommandRole("keepalive-report", "Join server and client JSON logs: who closed or reset each connection.",
                ReportOptions, _report),
)
