"""The coap-server role: options, and the service on loopback over coap and coaps."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from coap_testing import request
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, reactor
from twisted.python import usage

from nettester.protocols.coap.endpoint import CoapEndpoint
from nettester.protocols.coap.message import (
    Code,
    ContentFormat,
    OptionNumber,
    encode_uint,
)
from nettester.protocols.coap.options import CoapServerOptions
from nettester.protocols.coap.server import CoapServerService, local_addresses
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from nettester.udplink import UdpLink

TIMEOUT = 5.0


def parse(*argv: str) -> CoapServerOptions:
    options = CoapServerOptions()
    options.parseOptions(list(argv))
    return options


def test_options_defaults_and_negations() -> None:
    options = parse()
    assert options["port"] == 5683 and options["plugtest"] and not options["benchmark"]
    assert options["notify-interval"] == 5.0
    options = parse("--no-plugtest", "--benchmark", "--port", "6000", "--interfaces", "127.0.0.1,[::1]",
                    "--max-dedup-entries", "1000")
    assert not options["plugtest"] and options["benchmark"] and options["interfaces"] == ("127.0.0.1", "::1")
    assert options["max-dedup-entries"] == 1000


@pytest.mark.parametrize(
    "argv",
    [
        ["--plugtest", "--no-plugtest"],
        ["--no-ipv4", "--no-ipv6"],
        ["--no-loopback", "--no-external"],
        ["--dtls-only"],
        ["--cert", "c.pem"],
        ["--client-auth", "sometimes"],
        ["--port", "65500"],
        ["--interfaces", "localhost"],
    ],
)
def test_options_errors(argv: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(*argv)


def test_local_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    from nettester.protocols.coap import server as server_module

    monkeypatch.setattr(server_module, "ipv6_available", lambda: True)
    assert local_addresses(True, True, True, True) == ["::"]
    assert local_addresses(True, False, True, True) == ["0.0.0.0"]
    monkeypatch.setattr(server_module, "ipv6_available", lambda: False)
    assert local_addresses(True, True, True, True) == ["0.0.0.0"]  # a container without IPv6
    assert local_addresses(False, True, True, True) == []
    monkeypatch.undo()
    loopback_v4 = local_addresses(True, False, True, False)
    assert "127.0.0.1" in loopback_v4
    assert "127.0.0.1" not in local_addresses(True, True, False, True)


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_service_serves_coap_and_coaps_on_loopback() -> Generator[Any, Any, None]:
    store = PskStore({b"client-1": b"secret-psk"})

    def dtls_link() -> DtlsEndpoint:
        return DtlsEndpoint(reactor, server_configuration=DtlsConfiguration(is_client=False, psk_store=store,
                                                                            cid_length=None))

    service = CoapServerService(reactor, 0, ["127.0.0.1"], benchmark=True, dtls_link_factory=dtls_link)
    service.startService()
    ports = {(scheme, name): port for scheme, _, port, name in service.listening}
    assert set(ports) == {("coap", "plugtest"), ("coaps", "plugtest"), ("coap", "extended"), ("coaps", "extended")}
    udp = UdpLink()
    client = CoapEndpoint(udp, reactor)
    udp_port = reactor.listenUDP(0, udp, interface="127.0.0.1")
    dtls = DtlsEndpoint(reactor, client_configuration=DtlsConfiguration(
        is_client=True, psk_identity=b"client-1", psk=b"secret-psk", cid_length=None))
    secure = CoapEndpoint(dtls, reactor)
    dtls_port = reactor.listenUDP(0, dtls, interface="127.0.0.1")
    try:
        test = yield client.request(("127.0.0.1", ports[("coap", "plugtest")]), request("test")).addTimeout(
            TIMEOUT, reactor)
        assert test.response.code == Code.CONTENT
        bench = yield client.request(("127.0.0.1", ports[("coap", "extended")]),
                                     request("benchmark?rlen=20")).addTimeout(TIMEOUT, reactor)
        assert bench.response.payload == b"hello benchmark*****"
        context_request = request("mycontext", options=[(OptionNumber.ACCEPT, encode_uint(ContentFormat.TEXT_PLAIN))])
        context = yield secure.request_address(("127.0.0.1", ports[("coaps", "extended")]),
                                               context_request).addTimeout(TIMEOUT, reactor)
        lines = context.response.payload.decode().splitlines()
        assert "peer: client-1" in lines and any(line.startswith("cipher-suite: TLS_PSK") for line in lines)
        large = yield secure.request_address(("127.0.0.1", ports[("coaps", "plugtest")]),
                                             request("large")).addTimeout(TIMEOUT, reactor)
        assert len(large.response.payload) == 1280
        assert service.summary()["received"] >= 5 and service.summary()["malformed"] == 0
    finally:
        client.stop()
        secure.stop()
        yield defer.gatherResults([udp_port.stopListening(), dtls_port.stopListening()])
        yield service.stopService()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_roles_build_services_from_options(tmp_path: Any) -> Generator[Any, Any, None]:
    from zope.interface.verify import verifyObject

    from nettester.interfaces import IRole
    from nettester.protocols.coap.roles import ROLES, build_server

    assert [role.name for role in ROLES] == ["coap-server", "coap-client", "coap-bench", "coap-receivetest"]
    for role in ROLES:
        verifyObject(IRole, role)
    psk_file = tmp_path / "psk"
    psk_file.write_text("client-1=c2VjcmV0\n")
    options = parse("--interfaces", "127.0.0.1", "--port", "0", "--psk-file", str(psk_file), "--benchmark")
    service = build_server(reactor, options)
    assert isinstance(service, CoapServerService)
    service.startService()
    try:
        assert sorted(scheme for scheme, *_ in service.listening) == ["coap", "coap", "coaps", "coaps"]
        assert {endpoint.core.params.max_dedup_entries for endpoint in service.endpoints} == {1 << 20}
        assert service.summary()["received"] == 0
    finally:
        yield service.stopService()


def test_listen_failure_is_reported_not_raised() -> None:
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import MemoryReactorClock

    from nettester.service import exit_status_of

    class Busy(MemoryReactorClock):
        def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    busy = Busy()
    service = CoapServerService(busy, 5683, ["127.0.0.1"])
    service.startService()
    assert service.failed is not None and "Address already in use" in service.failed
    assert exit_status_of(service) == 1
    busy.run()  # the stop asked for when running
    assert busy.hasStopped
    nowhere = CoapServerService(MemoryReactorClock(), 5683, [])
    nowhere.startService()
    assert nowhere.failed is not None and "no address" in nowhere.failed


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_coaps_with_certificates_from_the_options(tmp_path: Any) -> Generator[Any, Any, None]:
    from nettester.protocols.coap.client import make_link
    from nettester.protocols.coap.options import CoapClientOptions
    from nettester.protocols.coap.roles import build_server
    from nettester.protocols.dtls.certificates import issue, make_ca

    ca = make_ca()
    issue(ca, "coap-server").pem_files(str(tmp_path / "server.pem"), str(tmp_path / "server.key"))
    issue(ca, "coap-device-7").pem_files(str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    (tmp_path / "ca.pem").write_bytes(ca.certificate.public_bytes(Encoding.PEM))
    server = build_server(reactor, parse(
        "--interfaces", "127.0.0.1", "--port", "0", "--no-plugtest", "--dtls-only",
        "--cert", str(tmp_path / "server.pem"), "--key", str(tmp_path / "server.key"),
        "--trust", str(tmp_path / "ca.pem"), "--client-auth", "NEEDED",
    ))
    server.startService()
    (port,) = [port for _, _, port, _ in server.listening]
    options = CoapClientOptions()
    options.parseOptions(["--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"),
                          "--trust", str(tmp_path / "ca.pem"), f"coaps://127.0.0.1:{port}/mycontext"])
    link = make_link(reactor, options["uri"], options["dtls"])
    client = CoapEndpoint(link, reactor)
    client_port = reactor.listenUDP(0, link, interface="127.0.0.1")
    try:
        got = yield client.request_address(options["uri"].address, request("mycontext")).addTimeout(TIMEOUT, reactor)
        lines = got.response.payload.decode().splitlines()
        assert any(line.startswith("peer:") and "coap-device-7" in line for line in lines), lines
        assert any(line.startswith("cipher-suite: TLS_ECDHE_ECDSA") for line in lines), lines
    finally:
        client.stop()
        yield client_port.stopListening()
        yield server.stopService()


class _DtlsWire:
    """Hands what each endpoint writes to the endpoint at the destination (no sockets)."""

    def __init__(self) -> None:
        self.endpoints: dict[tuple[str, int], DtlsEndpoint] = {}
        self.queue: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []

    def attach(self, endpoint: DtlsEndpoint, address: tuple[str, int]) -> None:
        wire = self

        class Transport:
            def write(self, data: bytes, destination: tuple[str, int]) -> None:
                wire.queue.append((data, address, destination))

        endpoint.transport = Transport()  # type: ignore[assignment]
        self.endpoints[address] = endpoint

    def deliver(self) -> None:
        while self.queue:
            data, source, destination = self.queue.pop(0)
            self.endpoints[destination].datagramReceived(data, source)


def test_dtls_counters_of_every_endpoint_join_the_summary_and_metrics() -> None:
    from coap_testing import UdpClock
    from prometheus_client.exposition import generate_latest

    from nettester.metrics import new_registry

    clock = UdpClock()
    store = PskStore({b"client-1": b"secret-psk"})
    service = CoapServerService(clock, 0, ["192.0.2.1"], dtls_link_factory=lambda: DtlsEndpoint(
        clock, server_configuration=DtlsConfiguration(is_client=False, psk_store=store)))
    service.startService()
    coaps = {name: port for scheme, _, port, name in service.listening if scheme == "coaps"}
    assert len(service.dtls_links) == 2
    wire = _DtlsWire()
    for link, name in zip(service.dtls_links, ("plugtest", "extended"), strict=True):
        wire.attach(link, ("192.0.2.1", coaps[name]))
    good = DtlsEndpoint(clock, client_configuration=DtlsConfiguration(
        is_client=True, psk_identity=b"client-1", psk=b"secret-psk"))
    stranger = DtlsEndpoint(clock, client_configuration=DtlsConfiguration(
        is_client=True, psk_identity=b"stranger", psk=b"nope"))
    wire.attach(good, ("198.51.100.1", 40000))
    wire.attach(stranger, ("198.51.100.2", 40000))
    connected: list[Any] = []
    good.connect(("192.0.2.1", coaps["plugtest"])).addCallback(connected.append)
    failed: list[Any] = []
    stranger.connect(("192.0.2.1", coaps["extended"])).addErrback(failed.append)
    wire.deliver()
    assert len(connected) == 1 and len(failed) == 1
    service.dtls_links[1].datagramReceived(b"\x19garbage", ("198.51.100.3", 1))  # not a DTLS record
    summary = service.summary()
    assert {key: summary[key] for key in summary if key.startswith("dtls_")} == {
        "dtls_handshakes": 1, "dtls_failures": 1, "dtls_dropped": 1, "dtls_connections": 1}
    text = generate_latest(new_registry(service.metrics)).decode()
    assert "nettester_coap_server_received_total 0.0" in text
    assert text.count("# TYPE nettester_dtls_handshakes_total counter") == 1  # one family, summed
    assert "\nnettester_dtls_handshakes_total 1.0\n" in text
    assert 'nettester_dtls_failures_total{reason="unknown_psk_identity"} 1.0' in text
    assert 'nettester_dtls_dropped_total{reason="malformed"} 1.0' in text
    assert "\nnettester_dtls_connections 1.0\n" in text
    service.stopService()


def test_summed_families_add_up_label_by_label() -> None:
    from nettester.metrics import MetricSet
    from nettester.protocols.coap.server import summed_families

    sets = []
    for drops in ({"a": 1, "b": 2}, {"b": 5}):
        metric_set = MetricSet("dtls")
        metric_set.counter("handshakes_total", "h").value = 3
        dropped = metric_set.labeled_counter("drops_total", "d", "reason")
        for reason, count in drops.items():
            dropped.inc(reason, count)
        metric_set.gauge("connections", "c", lambda: 2)
        sets.append(metric_set)
    families = {family.name: family for family in summed_families(sets)}
    assert [family.type for family in families.values()] == ["counter", "counter", "gauge"]
    assert [(s.name, s.value) for s in families["nettester_dtls_handshakes"].samples] == [
        ("nettester_dtls_handshakes_total", 6)]
    assert {s.labels["reason"]: s.value for s in families["nettester_dtls_drops"].samples} == {"a": 1, "b": 7}
    assert families["nettester_dtls_connections"].samples[0].value == 4


def test_plain_coap_server_has_no_dtls_fields() -> None:
    from coap_testing import UdpClock

    service = CoapServerService(UdpClock(), 0, ["192.0.2.1"])
    service.startService()
    assert not [key for key in service.summary() if key.startswith("dtls")]
    service.stopService()
