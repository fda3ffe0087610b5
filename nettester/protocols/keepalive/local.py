"""The keepalive part of ``nettester local``: plain and TLS servers, a small fleet each.

Intervals are short (a keep-alive every second, less for runs under five
seconds) so even a short run makes round trips over both transports; the
verdict passes when every client connected, keep-alives flowed over both
transports, and no side saw a reset, a FIN it did not ask for, a missing
keep-alive or response, a TLS failure or an invalid message.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from zope.interface import implementer

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.metrics import MetricSet
from nettester.module import Verdict
from nettester.protocols.keepalive import tls
from nettester.protocols.keepalive.adapter import PEER_RESET, TLS_ERROR
from nettester.protocols.keepalive.client import KeepAliveClientService
from nettester.protocols.keepalive.server import KeepAliveServerService
from nettester.protocols.keepalive.wire import ClientTiming

PLAIN_CLIENTS = 20
TLS_CLIENTS = 10


# Timeouts stay generous however short the run: a loaded machine must not fail the verdict.
RESPONSE_TIMEOUT = 3.0
SERVER_TIMEOUT = 5.0


def timing_for(duration: float) -> ClientTiming:
    """Intervals that fit ``duration``: at least four keep-alives per connection."""
    interval = min(1.0, duration / 5)
    return ClientTiming(keepalive_interval=interval, response_timeout=RESPONSE_TIMEOUT, dummy_interval=2.5 * interval)


@implementer(IReportingService)
class LocalKeepAliveService(Service):
    """Starts both servers, then their fleets on the servers' real ports; stops clients first."""

    def __init__(self, reactor: Any, duration: float) -> None:
        self._reactor = reactor
        self._ramp_up = min(2.0, duration / 10)
        self._timing = timing_for(duration)
        certificate = tls.self_signed_certificate()
        self.servers = [
            KeepAliveServerService(reactor, 0, "127.0.0.1", SERVER_TIMEOUT),
            KeepAliveServerService(reactor, 0, "127.0.0.1", SERVER_TIMEOUT, tls=tls.server_options(certificate),
                                   tls_note=tls.describe(certificate)),
        ]
        self._client_tls = [None, tls.client_creator("localhost", None, insecure=True)]
        self.clients: list[KeepAliveClientService] = []
        self.metrics = MetricSet("keepalive_local")
        self.metrics.gauge("keepalives", "Keep-alive round trips.", lambda: self.summary()["keepalives"])
        self.metrics.gauge("errors", "Errors on either side.", lambda: self.summary()["errors"])

    def startService(self) -> None:
        super().startService()
        for server, creator, count in zip(self.servers, self._client_tls, (PLAIN_CLIENTS, TLS_CLIENTS), strict=True):
            server.startService()
            client = KeepAliveClientService(self._reactor, "127.0.0.1", server.port_number, count, self._timing,
                                            ramp_up=self._ramp_up, tls=creator)
            client.startService()
            self.clients.append(client)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        clients_gone = DeferredList([client.stopService() for client in self.clients])
        return clients_gone.addCallback(lambda _: DeferredList([server.stopService() for server in self.servers]))

    def summary(self) -> dict[str, int]:
        server_errors = sum(server.closes.get(PEER_RESET) + server.closes.get(TLS_ERROR) + server.missing.value
                            + server.protocol_errors.value for server in self.servers)
        return {
            "clients": PLAIN_CLIENTS + TLS_CLIENTS,
            "connections": sum(client.connections.value for client in self.clients),
            "open": sum(len(client.open) for client in self.clients),
            "keepalives": sum(client.answered.value for client in self.clients),
            "tls_keepalives": self.clients[1].answered.value if len(self.clients) > 1 else 0,
            "dummies": sum(client.dummies.value for client in self.clients),
            "errors": server_errors + sum(client.errors for client in self.clients),
        }


@implementer(ILocalScenario)
class KeepAliveLocalScenario:
    """What ``nettester local`` runs and judges for the keepalive module."""

    name = "keepalive"

    def __init__(self, reactor: Any, duration: float) -> None:
        self.service = LocalKeepAliveService(reactor, duration)

    def verdict(self) -> Verdict:
        evidence = self.service.summary()
        passed = (evidence["connections"] >= evidence["clients"] and evidence["errors"] == 0
                  and evidence["tls_keepalives"] > 0 and evidence["keepalives"] > evidence["tls_keepalives"])
        return Verdict(passed, evidence)
