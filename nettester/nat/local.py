"""The NAT part of ``nettester local``: three echo destinations, the NAT, a client fleet.

Halfway through, the console's ``rebalance`` and then ``clear`` break every
mapping on purpose; the clients must not notice anything but new NAT ports:
every datagram is answered (except those in flight when the run stops).
"""

from __future__ import annotations

import random
from collections.abc import Generator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.module import Verdict
from nettester.logs import Logger
from nettester.nat.console import NatRoleService
from nettester.nat.proxy import NatProxy
from nettester.nat.table import DropPolicy, NatTable

log = Logger()

LOCAL_CLIENTS = 24
LOCAL_INTERVAL = 0.1
DESTINATIONS = 3


class _Echo(DatagramProtocol):
    """A destination: echoes every datagram, counts them."""

    noisy = False

    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received += 1
        self.transport.write(datagram, addr)


class _Client(DatagramProtocol):
    """Sends a numbered datagram every interval; counts the matching answers."""

    noisy = False

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self.sent = 0
        self.answered = 0
        self.wrong = 0

    def send(self) -> None:
        self.sent += 1
        self.transport.write(b"%d" % self.sent, self._target)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        if addr == self._target and datagram.isdigit() and int(datagram) <= self.sent:
            self.answered += 1
        else:
            self.wrong += 1


@implementer(IReportingService)
class _NatLab(Service):
    """Echo destinations, the NAT in front of them, and the client fleet."""

    def __init__(self, reactor: Any, duration: float) -> None:
        self._reactor = reactor
        self._duration = duration
        self._echoes = [_Echo() for _ in range(DESTINATIONS)]
        self._ports: list[Any] = []
        proxy = NatProxy(reactor, NatTable([], rng=random.Random()), DropPolicy(), ("127.0.0.1", 0))
        self.nat = NatRoleService(reactor, proxy)
        self.metrics = proxy.metrics
        self.clients: list[_Client] = []
        self._loops: list[LoopingCall] = []
        self._timers: list[Any] = []
        self.rebalanced = ""

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor
        self.nat.startService()
        proxy = self.nat.proxy
        for echo in self._echoes:
            port = reactor.listenUDP(0, echo, interface="127.0.0.1")
            self._ports.append(port)
            proxy.add_destination(f"127.0.0.1:{port.getHost().port}")
        target = ("127.0.0.1", proxy.port)
        for index in range(LOCAL_CLIENTS):
            client = _Client(target)
            self.clients.append(client)
            self._ports.append(reactor.listenUDP(0, client, interface="127.0.0.1"))
            loop = LoopingCall(client.send)
            loop.clock = reactor
            self._loops.append(loop)
            # Spread the clients over the first interval.
            self._timers.append(reactor.callLater(index * LOCAL_INTERVAL / LOCAL_CLIENTS, loop.start, LOCAL_INTERVAL))
        self._timers.append(reactor.callLater(self._duration / 2, self._break_mappings, "rebalance"))
        self._timers.append(reactor.callLater(self._duration * 3 / 4, self._break_mappings, "clear"))

    def _break_mappings(self, command: str) -> None:
        def answered(answer: str) -> None:
            if command == "rebalance":
                self.rebalanced = answer
            log.info("local nat: {command}: {answer}", event="nat_local_command", command=command, answer=answer)

        self.nat.console.execute(command).addCallback(answered)

    @inlineCallbacks
    def stopService(self) -> Generator[Any, Any, None]:
        super().stopService()
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        yield gatherResults([maybeDeferred(port.stopListening) for port in self._ports])
        if self.nat.running:
            yield self.nat.stopService()

    def summary(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "clients": len(self.clients),
            "sent": sum(client.sent for client in self.clients),
            "answered": sum(client.answered for client in self.clients),
            "wrong": sum(client.wrong for client in self.clients),
            "destinations_used": sum(1 for echo in self._echoes if echo.received),
        }
        fields.update(self.nat.summary())
        return fields


@implementer(ILocalScenario)
class NatLocalScenario:
    """24 clients through the NAT to 3 echo servers; rebalance and clear halfway; every datagram answered."""

    name = "nat"

    def __init__(self, reactor: Any, duration: float) -> None:
        self.service = _NatLab(reactor, duration)

    def verdict(self) -> Verdict:
        summary = self.service.summary()
        in_flight = summary["clients"]
        passed = (
            summary["sent"] > 0
            and summary["answered"] >= summary["sent"] - in_flight
            and summary["wrong"] == 0
            and summary.get("dropped", 0) == 0
            and summary["destinations_used"] >= 2
        )
        evidence = {key: summary.get(key) for key in ("clients", "sent", "answered", "wrong", "destinations_used",
                                                        "dropped")}
        evidence["rebalance"] = self.service.rebalanced or "not reached"
        return Verdict(passed, evidence)
