"""Server and client fleet on real loopback sockets: plain, TLS, a silent client, a middlebox reset."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.logger import LogLevel

from nettester.logs import json_record
from nettester.protocols.keepalive import tls
from nettester.protocols.keepalive.client import KeepAliveClientService
from nettester.protocols.keepalive.local import KeepAliveLocalScenario
from nettester.protocols.keepalive.report import build_report
from nettester.protocols.keepalive.server import KeepAliveServerService
from nettester.protocols.keepalive.wire import ClientTiming
from tests.loopback import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 10.0
FAST = ClientTiming(keepalive_interval=0.2, response_timeout=1.5, dummy_interval=0.5)
SILENT = ClientTiming(keepalive_interval=60.0, response_timeout=60.0, dummy_interval=0.0)


def _until(condition: Callable[[], bool]) -> Deferred[None]:
    """The shared bounded wait: poll ``condition`` every 20 ms, fail after TIMEOUT seconds."""
    return wait_until(condition, timeout=TIMEOUT, step=0.02)


def _report_of(logged: Any) -> Any:
    """Feed the events of this run, as JSON lines split by side, to keepalive-report."""
    import json

    sides: dict[str, list[str]] = {"server": [], "client": []}
    for event in logged.events:
        side = str(event.get("log_namespace", "")).rsplit(".", 1)[-1]
        if side in sides:
            sides[side].append(json.dumps(json_record(event), default=str))
    return build_report(sides["server"], [sides["client"]])


def _errors(logged: Any) -> list[str]:
    return [str(event.get("event")) for event in logged.events
            if event.get("log_level") in (LogLevel.error, LogLevel.critical)]


@pytest.mark.parametrize("use_tls", [False, True], ids=["tcp", "tls"])
@pytest_twisted.inlineCallbacks
def test_fifty_clients_keep_alive_without_a_single_error(use_tls: bool, tmp_path: Path,
                                                        logged: Any) -> Generator[Any, Any, None]:
    server_tls = client_tls = None
    if use_tls:
        certificate = tls.self_signed_certificate()
        ca = tmp_path / "ca.pem"
        ca.write_bytes(certificate.chain_pem[0])
        server_tls = tls.server_options(certificate)
        client_tls = tls.client_creator("localhost", str(ca), insecure=False)
    server = KeepAliveServerService(reactor, 0, "127.0.0.1", keepalive_timeout=1.0, tls=server_tls)
    server.startService()
    fleet = KeepAliveClientService(reactor, "127.0.0.1", server.port_number, 50, FAST, ramp_up=0.3, tls=client_tls)
    fleet.startService()
    try:
        # Run until every connection made its round trips (at least five keep-alives and two dummy pairs each).
        yield _until(lambda: fleet.summary()["connections"] == 50 and fleet.summary()["keepalives"] >= 50 * 5
                     and fleet.summary()["dummies"] >= 50 * 2)
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield _until(lambda: server.summary()["open"] == 0)
    finally:
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield server.stopService().addTimeout(TIMEOUT, reactor)
    client_summary, server_summary = fleet.summary(), server.summary()
    assert client_summary["connections"] == 50 and client_summary["errors"] == 0
    assert client_summary["keepalives"] >= 50 * 5 and client_summary["dummies"] >= 50 * 2
    assert server_summary["accepted"] == 50 and server_summary["peer_closed"] == 50
    # Every answer the clients counted was a keep-alive the server counted; at
    # most one per connection can still be in flight when the fleet stops.
    assert client_summary["keepalives"] <= server_summary["keepalives"] <= client_summary["keepalives"] + 50
    assert _errors(logged) == []
    assert _report_of(logged).classes["still_open"].count == 50


@pytest_twisted.inlineCallbacks
def test_tls_with_the_wrong_server_name_fails_verification(tmp_path: Path, logged: Any) -> Generator[Any, Any, None]:
    certificate = tls.self_signed_certificate()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certificate.chain_pem[0])
    server = KeepAliveServerService(reactor, 0, "127.0.0.1", tls=tls.server_options(certificate))
    server.startService()
    fleet = KeepAliveClientService(reactor, "127.0.0.1", server.port_number, 1, FAST, ramp_up=0.0,
                                   reconnect_delay=60.0, tls=tls.client_creator("example.org", str(ca), False))
    fleet.startService()
    try:
        yield _until(lambda: fleet.summary()["tls_error"] == 1)
    finally:
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield server.stopService().addTimeout(TIMEOUT, reactor)
    assert fleet.summary()["keepalives"] == 0
    [client_close] = [event for event in logged.named("conn_closed") if event["log_namespace"].endswith("client")]
    assert client_close["cause"] == "tls_error"
    assert (f"Client 1: TLS failed, conn={client_close['conn']}: the server's certificate does not name "
            "example.org: use --server-name with a name it has, or --insecure") in logged.lines("conn_closed")


@pytest_twisted.inlineCallbacks
def test_a_self_signed_server_untrusted_by_the_client_is_tls_error_on_both_ends_as_the_readme_says(
        logged: Any) -> Generator[Any, Any, None]:
    """Issue 16: both ends say what to do, and the README's close-cause table shows these very details."""
    server = KeepAliveServerService(reactor, 0, "127.0.0.1", tls=tls.server_options(tls.self_signed_certificate()))
    server.startService()
    fleet = KeepAliveClientService(reactor, "127.0.0.1", server.port_number, 1, FAST, ramp_up=0.0,
                                   reconnect_delay=60.0, tls=tls.client_creator("localhost", None, False))
    fleet.startService()
    try:
        yield _until(lambda: fleet.summary()["tls_error"] == 1 and server.summary()["tls_error"] == 1)
    finally:
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield server.stopService().addTimeout(TIMEOUT, reactor)
    client_detail = "the server's certificate is not trusted (self-signed?): use --ca FILE or --insecure"
    server_detail = ("the client does not trust this server's certificate (unknown CA): give the clients --ca "
                     "with the CA, or --insecure")
    client_address = logged.named("conn_open")[0]["local"]
    conn = logged.named("conn_open")[0]["conn"]
    assert sorted(logged.lines("conn_closed")) == sorted([
        f"Client 1: TLS failed, conn={conn}: {client_detail}",
        f"TCP connection from {client_address} closed, conn=-: tls_error ({server_detail})",
    ])
    [row] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `tls_error` |")]
    assert f"`{server_detail}`" in row and f"`{client_detail}`" in row


@pytest_twisted.inlineCallbacks
def test_a_silent_client_is_closed_by_the_server_with_the_original_lines(logged: Any) -> Generator[Any, Any, None]:
    server = KeepAliveServerService(reactor, 0, "127.0.0.1", keepalive_timeout=0.5)
    server.startService()
    fleet = KeepAliveClientService(reactor, "127.0.0.1", server.port_number, 1, SILENT, ramp_up=0.0,
                                   reconnect_delay=60.0, run_id="silent")
    fleet.startService()
    try:
        yield _until(lambda: fleet.summary()["server_closed"] == 1)
    finally:
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield server.stopService().addTimeout(TIMEOUT, reactor)
    client_address = logged.named("conn_open")[0]["local"]
    assert logged.lines("keepalive_missing") == [f"Keep alive request not received {client_address}, conn=silent-1-1"]
    assert logged.lines("conn_terminating") == [f"Terminating TCP connection from {client_address} :keep_alive_missing"]
    assert logged.lines("conn_closed") == [
        f"TCP connection from {client_address} closed, conn=silent-1-1: closed_by_server (keep_alive_missing)",
        "Client 1: Server terminated TCP connection, conn=silent-1-1",
    ]
    report = _report_of(logged)
    assert report.classes["closed_by_server"].count == 1
    assert report.classes["closed_by_server"].reasons == {"keep_alive_missing": 1}


class _RelaySide(Protocol):
    """One side of a relayed connection; forwards bytes to the other side."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.other: _RelaySide | None = None
        self.pending = b""

    def connectionMade(self) -> None:
        self.relay.sides.append(self)
        if self.other is not None and self.other.pending:
            self.transport.write(self.other.pending)
            self.other.pending = b""

    def dataReceived(self, data: bytes) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending += data


class _Relay(Factory):
    """A TCP relay (the middlebox) that can vanish with a RST to both ends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sides: list[_RelaySide] = []

    def buildProtocol(self, addr: Any) -> _RelaySide:
        inbound = _RelaySide(self)
        relay = self

        class Outbound(ClientFactory):
            def buildProtocol(self, addr: Any) -> _RelaySide:
                outbound = _RelaySide(relay)
                outbound.other, inbound.other = inbound, outbound
                return outbound

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                inbound.transport.loseConnection()

        reactor.connectTCP("127.0.0.1", self.target_port, Outbound())
        return inbound

    def close_both_ends(self) -> None:
        """Close every relayed socket with a plain TCP FIN (below any TLS)."""
        for side in self.sides:
            side.transport.loseConnection()
        self.sides = []

    def reset_both_ends(self) -> None:
        """Close every relayed socket with SO_LINGER {1, 0}: the kernel sends a RST to each end."""
        for side in self.sides:
            side.transport.stopReading()
            side.transport.stopWriting()
            handle = side.transport.getHandle()
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handle.close()
        self.sides = []


@pytest_twisted.inlineCallbacks
def test_a_reset_from_a_middlebox_is_peer_reset_on_both_ends(logged: Any) -> Generator[Any, Any, None]:
    server = KeepAliveServerService(reactor, 0, "127.0.0.1", keepalive_timeout=5.0)
    server.startService()
    relay = _Relay(server.port_number)
    relay_port = reactor.listenTCP(0, relay, interface="127.0.0.1")
    fleet = KeepAliveClientService(reactor, "127.0.0.1", relay_port.getHost().port, 1, FAST, ramp_up=0.0,
                                   reconnect_delay=60.0)
    fleet.startService()
    try:
        yield _until(lambda: fleet.summary()["keepalives"] >= 2)
        relay.reset_both_ends()
        yield _until(lambda: fleet.summary()["resets"] == 1 and server.summary()["peer_reset"] == 1)
    finally:
        yield relay_port.stopListening()
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield server.stopService().addTimeout(TIMEOUT, reactor)
    causes = [(event["cause"], event["conn"], event["detail"]) for event in logged.named("conn_closed")]
    conn = logged.named("conn_open")[0]["conn"]
    reset = "ECONNRESET (104: Connection reset by peer)"
    assert sorted(causes) == [("peer_reset", conn, reset), ("peer_reset", conn, reset)]
    assert f"Client 1: TCP connection reset, conn={conn}" in logged.lines("conn_closed")
    report = _report_of(logged)
    assert report.classes["middlebox_reset"].count == 1
    assert report.classes["middlebox_reset"].reasons == {"seen by both ends": 1}


@pytest_twisted.inlineCallbacks
def test_the_local_scenario_passes_on_a_healthy_loopback() -> Generator[Any, Any, None]:
    scenario = KeepAliveLocalScenario(reactor, duration=4.0)
    scenario.service.startService()
    evidence = scenario.service.summary
    try:
        # Until what the verdict needs has happened: every client connected, keep-alives over both transports.
        yield _until(lambda: evidence()["connections"] == 30 and evidence()["tls_keepalives"] > 0
                     and evidence()["keepalives"] > evidence()["tls_keepalives"])
    finally:
        yield scenario.service.stopService().addTimeout(TIMEOUT, reactor)
    verdict = scenario.verdict()
    assert verdict.passed, verdict.evidence
    assert verdict.evidence["connections"] == 30 and verdict.evidence["tls_keepalives"] > 0


class _Collect(Protocol):
    """Keeps the first bytes received and counts the rest."""

    def __init__(self) -> None:
        self.head = b""
        self.count = 0
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if len(self.head) < 16:
            self.head = (self.head + data)[:16]
        self.count += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


@pytest_twisted.inlineCallbacks
def test_lean_transports_send_at_once_and_queue_only_what_the_kernel_refuses() -> Generator[Any, Any, None]:
    from nettester.protocols.keepalive.transport import connect_tcp, listen_tcp

    accepted: list[_Collect] = []
    server_factory = Factory.forProtocol(_Collect)
    server_factory.buildProtocol = lambda addr: accepted.append(_Collect()) or accepted[-1]  # type: ignore[method-assign]
    port = listen_tcp(reactor, 0, server_factory, 50, "127.0.0.1")
    connected: Deferred[_Collect] = Deferred()

    class Connect(ClientFactory):
        def buildProtocol(self, addr: Any) -> _Collect:
            protocol = _Collect()
            reactor.callLater(0, connected.callback, protocol)
            return protocol

    connect_tcp(reactor, "127.0.0.1", port.getHost().port, Connect(), 5.0)
    try:
        client = yield connected.addTimeout(TIMEOUT, reactor)
        client.transport.write(b"Keep Alive 1\n")
        assert client.transport not in reactor.getWriters()  # sent, not queued
        big = b"x" * (16 << 20)  # more than the socket buffers hold: the rest is queued
        client.transport.write(big)
        assert client.transport in reactor.getWriters()
        yield _until(lambda: bool(accepted) and accepted[0].count == len(big) + 13)
        assert accepted[0].head == b"Keep Alive 1\nxxx"
        client.transport.loseConnection()
        yield client.lost.addTimeout(TIMEOUT, reactor)
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_middlebox_fin_under_tls_is_peer_closed_on_both_ends(logged: Any) -> Generator[Any, Any, None]:
    certificate = tls.self_signed_certificate()
    server = KeepAliveServerService(reactor, 0, "127.0.0.1", keepalive_timeout=5.0,
                                    tls=tls.server_options(certificate))
    server.startService()
    relay = _Relay(server.port_number)
    relay_port = reactor.listenTCP(0, relay, interface="127.0.0.1")
    fleet = KeepAliveClientService(reactor, "127.0.0.1", relay_port.getHost().port, 1, FAST, ramp_up=0.0,
                                   reconnect_delay=60.0, tls=tls.client_creator("localhost", None, insecure=True))
    fleet.startService()
    try:
        yield _until(lambda: fleet.summary()["keepalives"] >= 2)
        relay.close_both_ends()
        yield _until(lambda: fleet.summary()["server_closed"] == 1 and server.summary()["peer_closed"] == 1)
    finally:
        yield relay_port.stopListening()
        yield fleet.stopService().addTimeout(TIMEOUT, reactor)
        yield server.stopService().addTimeout(TIMEOUT, reactor)
    details = [(event["cause"], event["detail"]) for event in logged.named("conn_closed")]
    assert details == [("peer_closed", "FIN without TLS close_notify")] * 2
    report = _report_of(logged)
    assert report.classes["middlebox_fin"].count == 1
    assert report.classes["middlebox_fin"].reasons == {"seen by both ends": 1}
