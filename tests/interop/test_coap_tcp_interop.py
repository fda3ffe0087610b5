"""Interop over CoAP over TCP and TLS (RFC 8323): libcoap's clients and aiocoap's TCP client against
``coap-server --tcp``, and our TCP/TLS client against libcoap's servers. TLS uses certificates (with
client authentication): this pyOpenSSL has no PSK callbacks, so PSK over TLS is not tested."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from nettester.protocols.coap.linkformat import parse_links
from nettester.protocols.coap.message import Code, Message, OptionNumber
from nettester.protocols.coap.options import CoapServerOptions
from nettester.protocols.coap.resources.plugtest import large_body
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.coap.tcplink import CoapTcpConnection, ReliableCoapEndpoint, TcpLink
from nettester.protocols.coap.tls import client_tls, server_tls
from nettester.protocols.dtls.certificates import issue, make_ca
from tests.interop.peers import missing_peer
from tests.interop.test_coap_libcoap import LibcoapServer, require
from tests.loopback import wait_until

pytestmark = pytest.mark.interop
TIMEOUT = 10.0

AIOCOAP_SCRIPT = r"""
import asyncio, json, sys
import aiocoap

async def main(base):
    context = await aiocoap.Context.create_client_context(transports=["tcpclient"])
    results = {}
    large = await context.request(aiocoap.Message(code=aiocoap.GET, uri=base + "/large")).response
    results["large"] = [str(large.code), large.payload.decode()]
    observation = context.request(aiocoap.Message(code=aiocoap.GET, uri=base + "/obs-pumping", observe=0))
    first = await observation.response
    notes = [first.payload.decode()]
    async for note in observation.observation:
        notes.append(note.payload.decode())
        if len(notes) == 3:
            observation.observation.cancel()
            break
    results["observe"] = notes
    print(json.dumps(results))
    await context.shutdown()

asyncio.run(asyncio.wait_for(main(sys.argv[1]), 20))
"""


@defer.inlineCallbacks
def tcp_server() -> Generator[Any, Any, tuple[CoapServerService, str]]:
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True, notify_interval=0.5)
    service.startService()
    port = next(entry[2] for entry in service.listening if entry[0] == "coap+tcp" and entry[3] == "plugtest")
    yield defer.succeed(None)
    return service, f"coap+tcp://127.0.0.1:{port}"


@pytest_twisted.inlineCallbacks
def test_libcoap_client_over_tcp_against_our_server() -> Generator[Any, Any, None]:
    client = require("coap-client-notls")
    service, base = yield tcp_server()
    try:
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{base}/test"], env=os.environ)
        assert code == 0, err
        assert b"Type:" in out  # /test describes the request
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", f"{base}/large"], env=os.environ)
        assert code == 0, err
        assert out.strip() == large_body().strip()
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", "-s", "2", f"{base}/obs"],
                                                        env=os.environ)
        assert code == 0, err
        assert out.count(b":") >= 4, out  # two or more hh:mm:ss notifications
        # BERT asked for (RFC 8323 section 6, -b 2048): served in 1024-byte blocks. (libcoap 4.3.1's BERT
        # upload sends the whole body with M=0 in block 0, then its tail again as block 4: that gets 4.08.)
        out, err, code = yield getProcessOutputAndValue(client, ["-m", "get", "-b", "2048", f"{base}/large"],
                                                        env=os.environ)
        assert code == 0, err
        assert out.strip() == large_body().strip()
        assert sum(link.refused for link in service.tcp_links) == 0
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_aiocoap_tcp_client_against_our_server() -> Generator[Any, Any, None]:
    try:
        import aiocoap  # noqa: F401
    except ImportError:
        missing_peer("aiocoap is not installed (pip install -e '.[test]')")
    service, base = yield tcp_server()
    try:
        out, err, code = yield getProcessOutputAndValue(sys.executable, ["-c", AIOCOAP_SCRIPT, base],
                                                        env=os.environ)
        assert code == 0, err.decode()
        results = json.loads(out)
        assert results["large"] == ["2.05 Content", large_body().decode()]
        assert len(results["observe"]) == 3
    finally:
        yield service.stopService()


def get(path: str, payload: bytes = b"", code: int = Code.GET) -> Message:
    options = [(OptionNumber.URI_PATH, segment.encode()) for segment in path.split("/") if segment]
    return Message(0, code, 0, b"", options, payload)


@defer.inlineCallbacks
def connect_when_up(link: TcpLink, port: int) -> Generator[Any, Any, CoapTcpConnection]:
    """A connection to the freshly started server, retried while it binds."""
    for _ in range(25):
        try:
            connection = yield link.connect(("127.0.0.1", port)).addTimeout(2.0, reactor)
            return connection
        except (ConnectError, ConnectionError, defer.TimeoutError):
            yield deferLater(reactor, 0.2, lambda: None)
    raise AssertionError(f"no coap+tcp server on port {port}")


@pytest_twisted.inlineCallbacks
def test_our_tcp_client_against_libcoap_server() -> Generator[Any, Any, None]:
    server = LibcoapServer(require("coap-server-notls"))
    link = TcpLink(reactor)
    endpoint = ReliableCoapEndpoint(link, reactor)
    try:
        peer = yield connect_when_up(link, server.port)
        got = yield endpoint.request(peer, get(".well-known/core")).addTimeout(TIMEOUT, reactor)
        assert got.response.code == Code.CONTENT
        targets = {entry.target for entry in parse_links(got.response.payload.decode())}
        assert "/time" in targets
        body = bytes(ord("A") + i % 26 for i in range(3000))
        put = yield endpoint.request(peer, get("example_data", body, Code.PUT)).addTimeout(TIMEOUT, reactor)
        assert put.response.code in (Code.CREATED, Code.CHANGED)
        back = yield endpoint.request(peer, get("example_data")).addTimeout(TIMEOUT, reactor)
        assert back.response.payload == body
        notifications: list[bytes] = []
        observation = endpoint.observe(peer, get("time"), lambda event: notifications.append(event.response.payload))
        yield wait_until(lambda: len(notifications) >= 2, timeout=TIMEOUT)  # /time notifies once a second
        assert len(notifications) >= 2, notifications
        observation.cancel()
        final = yield observation.finished.addTimeout(TIMEOUT, reactor)
        assert final.response.observe is None
        peer.release("done")
    finally:
        endpoint.stop()
        yield server.stop()


def tls_files(tmp_path: Path) -> dict[str, str]:
    """A CA, a server certificate and a client certificate (CN=client-7) as PEM files."""
    ca = make_ca()
    files = {name: str(tmp_path / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    Path(files["ca.pem"]).write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    issue(ca, "localhost").pem_files(files["server.pem"], files["server.key"])
    issue(ca, "client-7").pem_files(files["client.pem"], files["client.key"])
    return files


@pytest_twisted.inlineCallbacks
def test_libcoap_openssl_client_over_tls_against_our_server(tmp_path: Path) -> Generator[Any, Any, None]:
    client = require("coap-client-openssl")
    files = tls_files(tmp_path)
    options = CoapServerOptions()
    options.parseOptions(["--tcp", "--cert", files["server.pem"], "--key", files["server.key"], "--trust",
                          files["ca.pem"], "--client-auth", "needed"])
    service = CoapServerService(reactor, 0, ["127.0.0.1"], tcp=True, tls=server_tls(options))
    service.startService()
    ports = {entry[3]: entry[2] for entry in service.listening if entry[0] == "coaps+tcp"}
    credentials = ["-c", files["client.pem"], "-j", files["client.key"], "-R", files["ca.pem"]]
    try:
        out, err, code = yield getProcessOutputAndValue(
            client, [*credentials, "-m", "get", f"coaps+tcp://127.0.0.1:{ports['extended']}/mycontext"],
            env=os.environ)
        assert code == 0, err
        assert b"peer: CN=client-7" in out and b"cipher-suite: TLS_" in out, out
        out, err, code = yield getProcessOutputAndValue(
            client, [*credentials, "-m", "get", f"coaps+tcp://127.0.0.1:{ports['plugtest']}/large"], env=os.environ)
        assert code == 0, err
        assert out.strip() == large_body().strip()
    finally:
        yield service.stopService()


@pytest_twisted.inlineCallbacks
def test_our_tls_client_against_libcoap_openssl_server(tmp_path: Path) -> Generator[Any, Any, None]:
    files = tls_files(tmp_path)
    server = LibcoapServer(require("coap-server-openssl"), "-c", files["server.pem"], "-j", files["server.key"],
                           "-R", files["ca.pem"])
    link = TcpLink(reactor, tls_client=client_tls("localhost", {"trust": files["ca.pem"], "cert": files["client.pem"],
                                                                "key": files["client.key"]}))
    endpoint = ReliableCoapEndpoint(link, reactor)
    try:
        peer = yield connect_when_up(link, server.port + 1)  # libcoap: coaps+tcp on port + 1
        got = yield endpoint.request(peer, get("")).addTimeout(TIMEOUT, reactor)
        assert got.response.code == Code.CONTENT and b"libcoap" in got.response.payload
        peer.release("done")
    finally:
        endpoint.stop()
        yield server.stop()
