"""A client and a server DtlsConnection wired back to back, with a fake
clock and a hook to lose, duplicate or reorder datagrams (test helper)."""

from __future__ import annotations

import datetime
from collections.abc import Callable

from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import (
    ApplicationData,
    DtlsConfiguration,
    DtlsConnection,
    HandshakeCompleted,
)
from nettester.protocols.dtls.cookie import Verdict
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.peers import Admission

CLIENT_ADDRESS = ("192.0.2.1", 5684)
SERVER_ADDRESS = ("192.0.2.2", 5684)
PSK_IDENTITY, PSK = b"Client_identity", b"secretPSK"

#: when the test run started: the fake clocks' 0.0 (certificates are minted valid from an hour before)
STARTED = datetime.datetime.now(datetime.UTC)


def fake_clock_time(now: float) -> datetime.datetime:
    """The wall-clock time of a fake clock's ``now`` (certificate checks)."""
    return STARTED + datetime.timedelta(seconds=now)


#: (direction, datagrams of one pump step) -> datagrams actually delivered
Network = Callable[[str, list[bytes]], list[bytes]]


def psk_configs(node_id: int = 0, **client_overrides: object) -> tuple[DtlsConfiguration, DtlsConfiguration]:
    """A PSK CCM-8 client (with ``client_overrides``) and a server issuing 6-byte CIDs of node ``node_id``."""
    client = DtlsConfiguration(
        is_client=True,
        cipher_suites=("TLS_PSK_WITH_AES_128_CCM_8",),
        psk_identity=PSK_IDENTITY,
        psk=PSK,
    )
    for name, value in client_overrides.items():
        setattr(client, name, value)
    server = DtlsConfiguration(
        is_client=False,
        psk_store=PskStore({PSK_IDENTITY: PSK}),
        cid_generator=NodeConnectionIdGenerator(6, node_id),
    )
    return client, server


class Pair:
    def __init__(
        self, client_config: DtlsConfiguration, server_config: DtlsConfiguration, network: Network | None = None
    ) -> None:
        self.now = 0.0
        self.client = DtlsConnection(client_config, SERVER_ADDRESS)
        self.server_config = server_config
        self.server: DtlsConnection | None = None
        self.admission = Admission()  # the cookie gate, with fragmented ClientHellos reassembled
        self.gate = self.admission.gate
        self.network = network or (lambda direction, datagrams: datagrams)
        self.client_events: list[object] = []
        self.server_events: list[object] = []
        self.client_address = CLIENT_ADDRESS
        self.hello_verify_requests = 0
        self.wire: list[tuple[str, bytes]] = []

    def start(self) -> None:
        self.client.connect(self.now)

    def to_server(self, datagram: bytes) -> None:
        if self.server is None:
            result = self.admission.check(datagram, self.client_address, self.now)
            if result.verdict is Verdict.VERIFY:
                self.hello_verify_requests += 1
                self._pending_to_client.append(result.reply)
                return
            if result.verdict is Verdict.DROP:
                return
            self.server = DtlsConnection(self.server_config, self.client_address)
            datagram = result.datagram
        self.server.receive_datagram(datagram, self.client_address, self.now)

    def pump(self, rounds: int = 30) -> None:
        """Exchange datagrams until both sides are quiet."""
        for _ in range(rounds):
            self._pending_to_client: list[bytes] = []
            outgoing = [d for d, _ in self.client.datagrams_to_send()]
            self.wire += [("c2s", d) for d in outgoing]
            for datagram in self.network("c2s", outgoing):
                self.to_server(datagram)
            from_server = self._pending_to_client
            if self.server is not None:
                from_server = from_server + [d for d, _ in self.server.datagrams_to_send()]
            self.wire += [("s2c", d) for d in from_server]
            for datagram in self.network("s2c", from_server):
                self.client.receive_datagram(datagram, SERVER_ADDRESS, self.now)
            self._collect()
            if not outgoing and not from_server:
                return

    def _collect(self) -> None:
        for connection, events in ((self.client, self.client_events), (self.server, self.server_events)):
            while connection is not None and (event := connection.next_event()) is not None:
                events.append(event)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.client.handle_timer(self.now)
        if self.server is not None:
            self.server.handle_timer(self.now)
        self.pump()

    def next_timer(self) -> float | None:
        timers = [t for t in (self.client.get_timer(), self.server and self.server.get_timer()) if t is not None]
        return min(timers) if timers else None

    def run(self, limit: float = 300.0) -> None:
        """Pump and fire timers until both sides are established or closed."""
        self.pump()
        while not (self.done(self.client) and self.server is not None and self.done(self.server)):
            timer = self.next_timer()
            if timer is None or timer > limit:
                return
            self.advance(max(0.0, timer - self.now))

    @staticmethod
    def done(connection: DtlsConnection) -> bool:
        return connection.is_established or connection.is_closed

    def completed(self, side: str) -> HandshakeCompleted:
        events = self.client_events if side == "client" else self.server_events
        (event,) = [e for e in events if isinstance(e, HandshakeCompleted)]
        return event

    def app_data(self, side: str) -> list[bytes]:
        events = self.client_events if side == "client" else self.server_events
        return [e.data for e in events if isinstance(e, ApplicationData)]
