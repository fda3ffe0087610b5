"""The DTLS engine against independent implementations on loopback:
``openssl s_server``/``s_client`` (OpenSSL 3.0), Mbed TLS 3.6
``ssl_server2``/``ssl_client2`` (the RFC 9146 reference: CID, address
change) and python-mbedtls (Mbed TLS 2.28, PSK without CID).

A missing peer skips, or fails under CI=true (.ci/install.d/40-dtls.sh
installs them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from zope.interface import implementer

from nettester.interfaces import IDatagramReceiver
from nettester.protocols.dtls.certificates import Identity, issue, make_ca
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import DtlsConfiguration, SessionCache
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.endpoint import MAX_DATAGRAM, DtlsEndpoint
from tests.interop.peers import missing_peer
from tests.loopback import free_ports, wait_until

pytestmark = pytest.mark.interop
TIMEOUT = 20.0
PSK_IDENTITY, PSK = b"Client_identity", b"secretPSK"
MBEDTLS_BIN = Path(os.environ.get("NETTESTER_MBEDTLS_CACHE", "/var/cache/nettester/mbedtls")) / "bin"


def require(path: str | None, what: str) -> str:
    """The peer's path, or skip (fail under CI=true) when it is missing."""
    if path and os.access(path, os.X_OK):
        return path
    missing_peer("%s is not installed (see .ci/install.d/40-dtls.sh)" % what)


def openssl() -> str:
    return require(shutil.which("openssl"), "openssl")


def mbedtls(program: str) -> str:
    return require(str(MBEDTLS_BIN / program), "Mbed TLS 3.6 " + program)


class Peer(ProcessProtocol):
    """A third-party peer process; its stdout and stderr are collected."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()
        self.exit_code: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        self.ended.callback(self.exit_code)

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.exit_code is None:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]


def spawn(argv: list[str]) -> Peer:
    peer = Peer()
    reactor.spawnProcess(peer, argv[0], argv, env=dict(os.environ))
    return peer


def wait_for(condition: Callable[[], bool], what: str) -> Deferred[None]:
    return wait_until(condition, TIMEOUT, step=0.02, what=what)


@implementer(IDatagramReceiver)
class Receiver:
    """Collects application data; optionally answers each datagram."""

    def __init__(self, answer: Callable[[bytes], bytes | None] = lambda data: None) -> None:
        self.received: list[tuple[bytes, Any]] = []
        self.link: DtlsEndpoint | None = None
        self.answer = answer

    def datagramReceived(self, data: bytes, peer: Any) -> None:
        self.received.append((data, peer))
        reply = self.answer(data)
        if reply is not None and self.link is not None:
            self.link.send_datagram(reply, peer)


def psk_client(suite: str, cid_length: int | None = 6) -> DtlsConfiguration:
    return DtlsConfiguration(
        is_client=True,
        cipher_suites=(suite,),
        psk_identity=PSK_IDENTITY,
        psk=PSK,
        cid_length=cid_length,
        initial_retransmit_timeout=0.3,
    )


def server_config(suite: str, identity: Identity | None = None, node_id: int = 5) -> DtlsConfiguration:
    return DtlsConfiguration(
        is_client=False,
        cipher_suites=(suite,),
        psk_store=PskStore({PSK_IDENTITY: PSK}),
        certificate_chain=identity.full_chain() if identity else [],
        private_key=identity.private_key if identity else None,
        cid_generator=NodeConnectionIdGenerator(6, node_id),
        initial_retransmit_timeout=0.3,
    )


def listen(endpoint: DtlsEndpoint, receiver: Receiver) -> Any:
    endpoint.receiver = receiver
    receiver.link = endpoint
    return reactor.listenUDP(0, endpoint, interface="127.0.0.1", maxPacketSize=MAX_DATAGRAM)


def ecdsa_files(tmp_path: Path) -> tuple[Identity, Identity, dict[str, str]]:
    """A CA, a server identity, and PEM files of both plus a client identity."""
    ca = make_ca()
    server, client = issue(ca, "localhost"), issue(ca, "client-1")
    files = {name: str(tmp_path / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    Path(files["ca.pem"]).write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    server.pem_files(files["server.pem"], files["server.key"])
    client.pem_files(files["client.pem"], files["client.key"])
    return ca, server, files


def load_identity(files: dict[str, str], role: str) -> tuple[list[Any], Any]:
    from nettester.protocols.dtls.options import load_certificates, load_private_key

    return load_certificates(files[role + ".pem"]), load_private_key(files[role + ".key"])


# --- OpenSSL 3.0 command line -------------------------------------------------------

OPENSSL_CASES = [
    ("TLS_PSK_WITH_AES_128_CCM_8", "PSK-AES128-CCM8", "X25519"),
    ("TLS_PSK_WITH_AES_128_GCM_SHA256", "PSK-AES128-GCM-SHA256", "X25519"),
    ("TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256", "ECDHE-PSK-AES128-CBC-SHA256", "X25519"),
    ("TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256", "ECDHE-PSK-AES128-CBC-SHA256", "P-256"),
    # x25519 for the key exchange; P-256 must be offered too, the certificate's curve (RFC 8422 section 5.1)
    ("TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", "ECDHE-ECDSA-AES128-CCM8", "X25519:P-256"),
    ("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256", "P-256"),
]


def _openssl_credentials(suite: str, tmp_path: Path, role: str) -> tuple[list[str], Identity | None, Any]:
    if "ECDSA" in suite:
        ca, server, files = ecdsa_files(tmp_path)
        if role == "server":
            return ["-cert", files["server.pem"], "-key", files["server.key"]], server, ca
        return ["-CAfile", files["ca.pem"], "-verify_return_error", "-verify", "1"], server, ca
    arguments = ["-psk", PSK.hex(), "-psk_identity", PSK_IDENTITY.decode()]
    return arguments + (["-nocert"] if role == "server" else []), None, None


@pytest.mark.parametrize("suite,cipher,group", OPENSSL_CASES)
@pytest_twisted.inlineCallbacks
def test_our_client_with_openssl_s_server(
    suite: str, cipher: str, group: str, tmp_path: Path
) -> Generator[Any, Any, None]:
    binary = openssl()
    (port,) = free_ports()
    arguments, _, ca = _openssl_credentials(suite, tmp_path, "server")
    server = spawn(
        [
            binary,
            "s_server",
            "-dtls1_2",
            "-accept",
            str(port),
            "-4",
            "-cipher",
            cipher + ":@SECLEVEL=0",
            "-groups",
            group,
        ]
        + arguments
    )
    receiver = Receiver()
    config = psk_client(suite)
    if ca is not None:
        config.trust_anchors, config.server_name = [ca.certificate], "localhost"
    endpoint = DtlsEndpoint(reactor, client_configuration=config)
    port_handle = listen(endpoint, receiver)
    try:
        yield wait_for(lambda: b"ACCEPT" in server.output, "s_server to listen")
        peer = yield endpoint.connect(("127.0.0.1", port))
        context = endpoint.peer_context(peer)
        assert context.cipher_suite == suite and context.write_cid is None  # OpenSSL has no CID
        endpoint.send_datagram(b"hello from nettester\n", peer)
        yield wait_for(lambda: b"hello from nettester" in server.output, "s_server to print our data")
        server.write(b"hello from openssl\n")
        yield wait_for(lambda: bool(receiver.received), "data from s_server")
        assert receiver.received[0][0] == b"hello from openssl\n"
    finally:
        server.stop()
        yield port_handle.stopListening()


@pytest.mark.parametrize("suite,cipher,group", OPENSSL_CASES)
@pytest_twisted.inlineCallbacks
def test_openssl_s_client_with_our_server(
    suite: str, cipher: str, group: str, tmp_path: Path
) -> Generator[Any, Any, None]:
    binary = openssl()
    arguments, identity, _ = _openssl_credentials(suite, tmp_path, "client")
    receiver = Receiver(answer=lambda data: b"echo:" + data)
    endpoint = DtlsEndpoint(reactor, server_configuration=server_config(suite, identity))
    port_handle = listen(endpoint, receiver)
    port = port_handle.getHost().port
    client = spawn(
        [
            binary,
            "s_client",
            "-dtls1_2",
            "-connect",
            "127.0.0.1:%d" % port,
            "-cipher",
            cipher + ":@SECLEVEL=0",
            "-groups",
            group,
            "-servername",
            "localhost",
        ]
        + arguments
    )
    try:
        yield wait_for(lambda: endpoint.counters.handshakes.value == 1, "the handshake")
        yield wait_for(
            lambda: b"Verify return code" in client.output or b"Cipher is" in client.output, "s_client ready"
        )
        client.write(b"ping from openssl\n")
        yield wait_for(lambda: b"echo:ping from openssl" in client.output, "our echo in s_client")
        ((data, peer),) = receiver.received
        assert endpoint.peer_context(peer).cipher_suite == suite
        if identity is None:
            assert endpoint.peer_context(peer).identity == PSK_IDENTITY.decode()
        assert endpoint.counters.hello_verify.value >= 1
    finally:
        client.stop()
        yield port_handle.stopListening()


def _openssl_psk_client(binary: str, port: int, *extra: str) -> Peer:
    return spawn(
        [binary, "s_client", "-dtls1_2", "-connect", "127.0.0.1:%d" % port, "-cipher", "PSK-AES128-CCM8"]
        + ["-psk", PSK.hex(), "-psk_identity", PSK_IDENTITY.decode()]
        + list(extra)
    )


@pytest_twisted.inlineCallbacks
def test_openssl_s_client_fragmented_client_hello(tmp_path: Path) -> Generator[Any, Any, None]:
    """Issue 13: ``-mtu 256`` with a long SNI and ALPN list splits the
    ClientHello (about 700 bytes) into fragments: reassembled in front of
    the cookie gate, the handshake completes."""
    binary = openssl()
    receiver = Receiver(answer=lambda data: b"echo:" + data)
    endpoint = DtlsEndpoint(reactor, server_configuration=server_config("TLS_PSK_WITH_AES_128_CCM_8"))
    port_handle = listen(endpoint, receiver)
    long_name = ".".join("label%02d" % i for i in range(20)) + ".example"
    alpn = ",".join("protocol-%02d" % i for i in range(30))
    client = _openssl_psk_client(
        binary, port_handle.getHost().port, "-mtu", "256", "-servername", long_name, "-alpn", alpn
    )
    try:
        yield wait_for(lambda: endpoint.counters.handshakes.value == 1, "the handshake")
        yield wait_for(lambda: b"Cipher is" in client.output, "s_client ready")
        client.write(b"fragmented\n")
        yield wait_for(lambda: b"echo:fragmented" in client.output, "our echo in s_client")
        assert endpoint.counters.dropped.get("not_client_hello") == 0
        assert endpoint.admission.reassembled >= 1, "the ClientHello came in fragments"
    finally:
        client.stop()
        yield port_handle.stopListening()


@pytest_twisted.inlineCallbacks
def test_openssl_s_client_renegotiation_is_refused(tmp_path: Path) -> Generator[Any, Any, None]:
    """Issue 13: ``R`` in s_client used to hang: the server resent its last
    flight forever.  Now the renegotiating ClientHello gets a no_renegotiation
    warning on the session; OpenSSL then gives up (its choice)."""
    binary = openssl()
    receiver = Receiver(answer=lambda data: b"echo:" + data)
    endpoint = DtlsEndpoint(reactor, server_configuration=server_config("TLS_PSK_WITH_AES_128_CCM_8"))
    port_handle = listen(endpoint, receiver)
    client = _openssl_psk_client(binary, port_handle.getHost().port)
    try:
        yield wait_for(lambda: b"Cipher is" in client.output, "s_client ready")
        client.write(b"R\n")
        yield wait_for(lambda: endpoint.counters.renegotiations_refused.value >= 1, "the refusal")
        yield wait_for(
            lambda: b"no renegotiation" in client.output.lower() or client.exit_code is not None,
            "s_client to take the refusal",
        )
        assert endpoint.counters.handshakes.value == 1, "no second handshake"
    finally:
        client.stop()
        yield port_handle.stopListening()


# --- Mbed TLS 3.6: RFC 9146 ----------------------------------------------------------

MBEDTLS_CASES = [
    "TLS_PSK_WITH_AES_128_CCM_8",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    # RFC 9146 section 5.1: the MAC-then-encrypt construction with a CID
    "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256",
    "TLS_PSK_WITH_AES_128_GCM_SHA256",
]


def _mbedtls_name(suite: str) -> str:
    return suite.replace("_", "-")


def _parse_peer_cid(output: bytes) -> bytes:
    """The CID Mbed TLS reports for its peer: 'Peer CID (length N Bytes): aa bb'."""
    for line in output.decode(errors="replace").splitlines():
        if "Peer CID (length" in line:
            return bytes.fromhex(line.split("):", 1)[1].replace(" ", ""))
    raise AssertionError("Mbed TLS reported no peer CID")


@pytest.mark.parametrize("suite", MBEDTLS_CASES)
@pytest_twisted.inlineCallbacks
def test_our_client_with_mbedtls_server_cid(suite: str, tmp_path: Path) -> Generator[Any, Any, None]:
    binary = mbedtls("ssl_server2")
    (port,) = free_ports()
    mbed_cid = bytes.fromhex("a1b2c3d4")
    arguments = [
        "dtls=1",
        "server_addr=127.0.0.1",
        "server_port=%d" % port,
        "force_ciphersuite=" + _mbedtls_name(suite),
        "cid=1",
        "cid_val=" + mbed_cid.hex(),
        "hs_timeout=300-5000",
    ]
    config = psk_client(suite)
    if "ECDSA" in suite:
        ca, server_identity, files = ecdsa_files(tmp_path)
        arguments += ["crt_file=" + files["server.pem"], "key_file=" + files["server.key"]]
        # Mbed TLS asks for our certificate and verifies it.
        arguments += ["auth_mode=required", "ca_file=" + files["ca.pem"]]
        config.certificate_chain, config.private_key = load_identity(files, "client")
        config.trust_anchors, config.server_name = [ca.certificate], "localhost"
    else:
        arguments += ["psk=" + PSK.hex(), "psk_identity=" + PSK_IDENTITY.decode()]
    server = spawn([binary] + arguments)
    receiver = Receiver()
    endpoint = DtlsEndpoint(reactor, client_configuration=config)
    port_handle = listen(endpoint, receiver)
    try:
        yield wait_for(lambda: b"Waiting for a remote connection" in server.output, "ssl_server2 to listen")
        peer = yield endpoint.connect(("127.0.0.1", port))
        context = endpoint.peer_context(peer)
        assert context.cipher_suite == suite
        assert context.write_cid == mbed_cid  # Mbed TLS's CID is the one we use
        endpoint.send_datagram(b"GET / HTTP/1.0\r\n\r\n", peer)
        yield wait_for(lambda: bool(receiver.received), "the HTTP response")
        assert b"Mbed TLS Test Server" in receiver.received[0][0]
        yield wait_for(lambda: b"Peer CID" in server.output, "ssl_server2 to report our CID")
        assert _parse_peer_cid(server.output) == context.read_cid
        if "ECDSA" in suite:
            assert b"CN=client-1" in server.output  # Mbed TLS verified our client certificate
    finally:
        server.stop()
        yield port_handle.stopListening()


MBEDTLS_CLIENT_CID = bytes.fromhex("0badcafe")


class Relay(DatagramProtocol):
    """Forwards a client to a server and, on request, moves the client's
    flow to a new source port (a NAT rebinding).  Records the first byte
    of every datagram after the handshake for the type-25 check."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.upstreams: list[Any] = []
        self.log: list[tuple[str, int]] = []
        self.upstream_ports: list[int] = []
        self._handle: Any = None

    def open_upstream(self) -> None:
        relay = self

        class Upstream(DatagramProtocol):
            def datagramReceived(self, data: bytes, addr: Any) -> None:
                relay.log.append(("s2c", data[0]))
                if relay.client is not None:
                    relay.transport.write(data, relay.client)  # type: ignore[union-attr]

        upstream = Upstream()
        handle = reactor.listenUDP(0, upstream, interface="127.0.0.1")
        self.upstreams.append((upstream, handle))
        self.upstream_ports.append(handle.getHost().port)

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.client = addr
        self.log.append(("c2s", data[0]))
        self.upstreams[-1][0].transport.write(data, self.server)

    def listen(self) -> int:
        """Start listening on loopback; the port the client talks to."""
        self.open_upstream()
        self._handle = reactor.listenUDP(0, self, interface="127.0.0.1")
        return int(self._handle.getHost().port)

    @pytest_twisted.inlineCallbacks
    def stop(self) -> Generator[Any, Any, None]:
        for _, handle in self.upstreams:
            yield handle.stopListening()
        yield self._handle.stopListening()


def spawn_mbedtls_cid_client(suite: str, port: int, files: dict[str, str] | None) -> Peer:
    """ssl_client2 with CID 0badcafe: three exchanges with the server at ``port`` (PSK, or ECDSA with ``files``)."""
    arguments = [
        "dtls=1",
        "server_addr=127.0.0.1",
        "server_port=%d" % port,
        "force_ciphersuite=" + _mbedtls_name(suite),
        "cid=1",
        "cid_val=" + MBEDTLS_CLIENT_CID.hex(),
        "exchanges=3",
        "hs_timeout=300-5000",
        "read_timeout=5000",
    ]
    if files is not None:
        arguments += ["ca_file=" + files["ca.pem"], "server_name=localhost", "auth_mode=required"]
    else:
        arguments += ["psk=" + PSK.hex(), "psk_identity=" + PSK_IDENTITY.decode()]
    return spawn([mbedtls("ssl_client2")] + arguments)


@pytest.mark.parametrize("suite", MBEDTLS_CASES)
@pytest_twisted.inlineCallbacks
def test_mbedtls_client_with_our_server_cid_and_address_change(suite: str, tmp_path: Path) -> Generator[Any, Any, None]:
    identity, files = None, None
    receiver = Receiver(answer=lambda data: b"HTTP/1.0 200 OK\r\n\r\nnettester")
    if "ECDSA" in suite:
        _, identity, files = ecdsa_files(tmp_path)
    endpoint = DtlsEndpoint(reactor, server_configuration=server_config(suite, identity, node_id=9))
    port_handle = listen(endpoint, receiver)
    relay = Relay(("127.0.0.1", port_handle.getHost().port))
    client = spawn_mbedtls_cid_client(suite, relay.listen(), files)

    def move_after_first_exchange(data: bytes) -> bytes:
        if len(receiver.received) == 1:
            relay.open_upstream()  # exchanges 2 and 3 come from a new source port
        return b"HTTP/1.0 200 OK\r\n\r\nnettester"

    receiver.answer = move_after_first_exchange
    try:
        exit_code = yield client.ended
        output = client.output.decode(errors="replace")
        assert exit_code == 0, output
        assert len(receiver.received) == 3
        peers = {peer for _, peer in receiver.received}
        assert len(peers) == 1  # one session survived the move
        (peer,) = peers
        context = endpoint.peer_context(peer)
        assert context.cipher_suite == suite
        assert context.write_cid == MBEDTLS_CLIENT_CID  # Mbed TLS's CID is the one we use
        assert _parse_peer_cid(client.output) == context.read_cid  # our node-prefixed CID is Mbed TLS's
        assert context.read_cid[0] == 9 and context.node_id == 9
        assert context.address[1] == relay.upstream_ports[-1]
        assert context.previous_address is not None and context.previous_address[1] == relay.upstream_ports[0]
        assert endpoint.counters.address_changes.value == 1
        # After the Finished messages every record is a tls12_cid record.
        for direction in ("c2s", "s2c"):
            types = [first for d, first in relay.log if d == direction]
            after = types[next(i for i, t in enumerate(types) if t == 25) :]
            assert set(after) == {25}, (direction, types)
    finally:
        client.stop()
        yield relay.stop()
        yield port_handle.stopListening()


@pytest.mark.parametrize("suite", MBEDTLS_CASES)
@pytest_twisted.inlineCallbacks
def test_mbedtls_client_keeps_its_session_when_another_node_takes_it_over(
        suite: str, tmp_path: Path) -> Generator[Any, Any, None]:
    """Cluster fail-over seen by an independent client: node 9 serves exchange 1, then dies; node 10 restores
    the connection from node 9's snapshot (write sequence numbers 2^32 higher) and serves exchanges 2 and 3."""
    from nettester.cluster.replication import SEQUENCE_GAP

    identity, files = None, None
    if "ECDSA" in suite:
        _, identity, files = ecdsa_files(tmp_path)
    owner = DtlsEndpoint(reactor, server_configuration=server_config(suite, identity, node_id=9))
    heir = DtlsEndpoint(reactor, server_configuration=server_config(suite, identity, node_id=10))
    owner_receiver, heir_receiver = Receiver(), Receiver(answer=lambda data: b"HTTP/1.0 200 OK\r\n\r\nheir")
    handles = [listen(owner, owner_receiver), listen(heir, heir_receiver)]
    relay = Relay(("127.0.0.1", handles[0].getHost().port))

    def answer_then_die(data: bytes) -> bytes:
        ((_, peer),) = owner_receiver.received
        snapshot = owner.snapshot(peer.connection.read_cid)
        assert snapshot is not None
        heir.adopt(snapshot, peer.address, None, SEQUENCE_GAP)  # what the heir does from its replica
        relay.server = ("127.0.0.1", handles[1].getHost().port)  # the load balancer moves to the heir
        return b"HTTP/1.0 200 OK\r\n\r\nowner"  # the owner still answers exchange 1 (after its snapshot)

    owner_receiver.answer = answer_then_die
    client = spawn_mbedtls_cid_client(suite, relay.listen(), files)
    try:
        exit_code = yield client.ended
        output = client.output.decode(errors="replace")
        assert exit_code == 0, output
        assert len(owner_receiver.received) == 1 and len(heir_receiver.received) == 2, output
        assert output.count("heir") >= 2, "Mbed TLS read the heir's answers"
        assert owner.counters.handshakes.value == 1 and heir.counters.handshakes.value == 0
        ((_, peer), _) = heir_receiver.received
        assert peer.connection.read_cid[0] == 9  # node 9's CID, served by node 10
    finally:
        client.stop()
        yield relay.stop()
        for handle in handles:
            yield handle.stopListening()


@pytest_twisted.inlineCallbacks
def test_our_client_resumes_its_session_with_mbedtls_server() -> Generator[Any, Any, None]:
    binary = mbedtls("ssl_server2")
    (port,) = free_ports()
    arguments = [
        "dtls=1",
        "server_addr=127.0.0.1",
        "server_port=%d" % port,
        "tickets=0",
        "force_ciphersuite=TLS-PSK-WITH-AES-128-CCM-8",
        "cid=1",
        "cid_val=beef",
        "hs_timeout=300-5000",
        "psk=" + PSK.hex(),
        "psk_identity=" + PSK_IDENTITY.decode(),
    ]
    server = spawn([binary] + arguments)
    receiver = Receiver()
    endpoint = DtlsEndpoint(reactor, client_configuration=psk_client("TLS_PSK_WITH_AES_128_CCM_8"))
    port_handle = listen(endpoint, receiver)
    try:
        yield wait_for(lambda: b"Waiting for a remote connection" in server.output, "ssl_server2 to listen")
        for attempt in range(2):
            peer = yield endpoint.connect(("127.0.0.1", port))
            endpoint.send_datagram(b"GET / HTTP/1.0\r\n\r\n", peer)
            yield wait_for(lambda expected=attempt + 1: len(receiver.received) == expected, "the HTTP response")
            yield wait_for(lambda: not endpoint.connections, "ssl_server2's close_notify")
        assert endpoint.counters.handshakes.value == 2 and endpoint.counters.resumptions.value == 1
        assert endpoint.peer_context(peer).write_cid == bytes.fromhex("beef")
    finally:
        server.stop()
        yield port_handle.stopListening()


@pytest_twisted.inlineCallbacks
def test_mbedtls_client_resumes_its_session_with_cid() -> Generator[Any, Any, None]:
    """ssl_client2 reconnect=1: an abbreviated handshake whose Finished
    already carries the CID negotiated in the same flight."""
    binary = mbedtls("ssl_client2")
    receiver = Receiver(answer=lambda data: b"HTTP/1.0 200 OK\r\n\r\nnettester")
    config = server_config("TLS_PSK_WITH_AES_128_CCM_8")
    config.session_cache = SessionCache()
    endpoint = DtlsEndpoint(reactor, server_configuration=config)
    port_handle = listen(endpoint, receiver)
    arguments = [
        "dtls=1",
        "server_addr=127.0.0.1",
        "server_port=%d" % port_handle.getHost().port,
        "force_ciphersuite=TLS-PSK-WITH-AES-128-CCM-8",
        "cid=1",
        "cid_val=c1d2",
        "tickets=0",
        "reconnect=1",
        "hs_timeout=300-5000",
        "read_timeout=5000",
        "psk=" + PSK.hex(),
        "psk_identity=" + PSK_IDENTITY.decode(),
    ]
    client = spawn([binary] + arguments)
    try:
        exit_code = yield client.ended
        assert exit_code == 0, client.output.decode(errors="replace")
        assert endpoint.counters.handshakes.value == 2 and endpoint.counters.resumptions.value == 1
        assert len(receiver.received) == 2
        assert endpoint.counters.hello_verify.value == 2
    finally:
        client.stop()
        yield port_handle.stopListening()


# --- python-mbedtls (Mbed TLS 2.28): PSK, no CID, in process ----------------------------


def python_mbedtls() -> Any:
    try:
        import mbedtls.tls
    except ImportError:
        require(None, "python-mbedtls")
    return mbedtls.tls


def _mbedtls_psk_configuration(tls: Any, **options: Any) -> Any:
    return tls.DTLSConfiguration(
        ciphers=["TLS-PSK-WITH-AES-128-CCM-8"],
        validate_certificates=False,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        **options,
    )


def _drain(buffer: Any) -> bytes:
    data = buffer.peek_outgoing(65536)
    buffer.consume_outgoing(len(data))
    return data


def _step(tls: Any, buffer: Any) -> None:
    """Drive python-mbedtls's handshake (one Mbed TLS step per call) until
    it needs input or is over."""
    for _ in range(40):
        if buffer._handshake_state is tls.HandshakeStep.HANDSHAKE_OVER:
            return
        try:
            buffer.do_handshake()
        except tls.WantReadError:
            return
        except tls.WantWriteError:
            continue


def test_our_client_with_python_mbedtls_server() -> None:
    from nettester.protocols.dtls.connection import ApplicationData, DtlsConnection, HandshakeCompleted

    tls = python_mbedtls()
    context = tls.ServerContext(_mbedtls_psk_configuration(tls, pre_shared_key_store={"Client_identity": PSK}))
    buffer = context.wrap_buffers()
    buffer.setcookieparam(b"127.0.0.1:5684")
    client = DtlsConnection(psk_client("TLS_PSK_WITH_AES_128_CCM_8"))
    client.connect(0.0)
    hello_verify = 0
    for _ in range(20):
        for datagram, _ in client.datagrams_to_send():
            buffer.receive_from_network(datagram)
            try:
                _step(tls, buffer)
            except tls.HelloVerifyRequest:
                hello_verify += 1
                reply = _drain(buffer)
                buffer = context.wrap_buffers()  # Mbed TLS restarts the session after a HelloVerifyRequest
                buffer.setcookieparam(b"127.0.0.1:5684")
                client.receive_datagram(reply, None, 0.0)
                continue
        out = _drain(buffer)
        if out:
            client.receive_datagram(out, None, 0.0)
        if client.is_established:
            break
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    (completed,) = [e for e in events if isinstance(e, HandshakeCompleted)]
    assert completed.cipher_suite == "TLS_PSK_WITH_AES_128_CCM_8" and completed.write_cid is None
    assert hello_verify == 1
    _step(tls, buffer)
    client.send_application_data(b"to python-mbedtls")
    for datagram, _ in client.datagrams_to_send():
        buffer.receive_from_network(datagram)
    assert buffer.read(100) == b"to python-mbedtls"
    buffer.write(b"from python-mbedtls")
    client.receive_datagram(_drain(buffer), None, 0.0)
    assert client.next_event() == ApplicationData(b"from python-mbedtls")


def test_python_mbedtls_client_with_our_server() -> None:
    from nettester.protocols.dtls.connection import ApplicationData, DtlsConnection, HandshakeCompleted
    from nettester.protocols.dtls.cookie import CookieGate, Verdict

    tls = python_mbedtls()
    buffer = tls.ClientContext(_mbedtls_psk_configuration(tls, pre_shared_key=("Client_identity", PSK))).wrap_buffers(
        None
    )
    address = ("127.0.0.1", 40000)
    gate, server = CookieGate(), None
    _step(tls, buffer)
    for _ in range(20):
        out = _drain(buffer)
        if out:
            if server is None:
                result = gate.check(out, address, 0.0)
                if result.verdict is Verdict.VERIFY:
                    buffer.receive_from_network(result.reply)
                    _step(tls, buffer)
                    continue
                server = DtlsConnection(server_config("TLS_PSK_WITH_AES_128_CCM_8"), address)
            server.receive_datagram(out, address, 0.0)
            for datagram, _ in server.datagrams_to_send():
                buffer.receive_from_network(datagram)
        _step(tls, buffer)
        if server is not None and server.is_established:
            break
    assert server is not None and server.is_established
    completed = server.next_event()
    assert isinstance(completed, HandshakeCompleted)
    assert completed.peer_identity == "Client_identity" and completed.read_cid is None
    buffer.write(b"hello")
    server.receive_datagram(_drain(buffer), address, 0.0)
    assert server.next_event() == ApplicationData(b"hello")
    server.send_application_data(b"world")
    for datagram, _ in server.datagrams_to_send():
        buffer.receive_from_network(datagram)
    assert buffer.read(100) == b"world"
