"""CoAP clients and one extended server endpoint on a Clock, with chosen losses each way."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from coap_testing import MemoryLink, UdpClock

from nettester.protocols.coap.attribution import SessionTable, attach
from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.message import Message, decode
from nettester.protocols.coap.resources import build_site
from nettester.protocols.coap.resources.extended import extended_resources

SERVER_ADDRESS = ("192.0.2.1", 5783)


def never(message: Message) -> bool:
    return False


class Net:
    """The extended resources (benchmark, requests...) behind one endpoint; clients get links from ``new_client_link``.

    ``drop_forward`` / ``drop_return`` decide, per decoded datagram, whether
    it is lost on the way to the server / back to the client. Datagrams move
    only in :meth:`run`, in 50 ms steps of the clock.
    """

    def __init__(self, attributing: bool = True) -> None:
        self.clock = UdpClock()
        self.clock.advance(1000)
        self.queue: list[tuple[Any, bytes, Any, bool]] = []
        self.clients: dict[Any, MemoryLink] = {}
        self.drop_forward: Callable[[Message], bool] = never
        self.drop_return: Callable[[Message], bool] = never
        net = self

        class ServerLink(MemoryLink):
            def send_datagram(self, data: bytes, peer: Any) -> None:
                net.queue.append((net.clients[peer], data, SERVER_ADDRESS, False))

        class ClientLink(MemoryLink):
            def send_datagram(self, data: bytes, peer: Any) -> None:
                net.queue.append((net.server_link, data, self.me, True))

        self._client_link_class = ClientLink
        self.server_link = ServerLink(SERVER_ADDRESS)
        site = build_site(self.clock, extended_resources(True, "nettester", self.clock.seconds, 1000.0))
        self.server = CoapEndpoint(self.server_link, self.clock, rng=random.Random(1))
        site.attach(self.server)
        self.table: SessionTable | None = attach(site) if attributing else None

    def new_client_link(self) -> MemoryLink:
        link = self._client_link_class(("192.0.2.50", 40000 + len(self.clients)))
        self.clients[link.me] = link
        return link

    def deliver(self) -> None:
        queue, self.queue = self.queue, []
        for link, data, source, forward in queue:
            if (self.drop_forward if forward else self.drop_return)(decode(data)):
                continue
            link.receiver.datagramReceived(data, source)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / 0.05)):
            self.clock.advance(0.05)
            self.deliver()
