"""The STUN part of ``nettester local``: a server on 127.0.0.1 and a small client fleet against it."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from zope.interface import implementer

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.module import Verdict
from nettester.protocols.stun.client import StunClientService
from nettester.protocols.stun.fleet import FleetConfig
from nettester.protocols.stun.server import StunServerService

LOCAL_CLIENTS = 20
LOCAL_INTERVAL = 1.0


@implementer(IReportingService)
class _ServerAndClients(Service):
    """Starts the server, then the clients against the port it really got."""

    def __init__(self, reactor: Any) -> None:
        self.server = StunServerService(reactor, port=0, interface="127.0.0.1", stop_on_failure=False)
        config = FleetConfig(clients=LOCAL_CLIENTS, interval=LOCAL_INTERVAL, start_delay=(0.0, 0.2))
        self.client = StunClientService(reactor, "127.0.0.1", 0, config)
        self.metrics = self.client.metrics

    def startService(self) -> None:
        super().startService()
        self.server.startService()
        if self.server.failed is None:
            self.client.server_port = self.server.port
            self.client.startService()

    @inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
        super().stopService()
        if self.client.running:
            yield maybeDeferred(self.client.stopService)
        yield maybeDeferred(self.server.stopService)

    def summary(self) -> dict[str, Any]:
        fields = dict(self.client.summary())
        fields["server_responses"] = self.server.counters.responses.value
        return fields


@implementer(ILocalScenario)
class StunLocalScenario:
    """20 clients (all started within 0.2 s), one request a second each: every request must be answered."""

    name = "stun"

    def __init__(self, reactor: Any) -> None:
        self.service = _ServerAndClients(reactor)

    def verdict(self) -> Verdict:
        service = self.service
        summary = service.summary()
        if service.server.failed is not None:
            return Verdict(False, {"error": service.server.failed})
        counters = service.client.counters
        passed = counters.responses.value > 0 and counters.timeouts.value == 0 and counters.unexpected.value == 0
        evidence = {key: summary[key] for key in ("clients", "requests", "responses", "timeouts", "rtt_p99_ms")}
        return Verdict(passed, evidence)
