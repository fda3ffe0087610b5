"""Interop with aiocoap (PyPI): its client against our plugtest and extended
resources, over coap and over coaps (aiocoap's tinydtls transport, PSK).

aiocoap runs on asyncio, so it runs in a child Python process while our
server runs on the test's Twisted reactor.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from nettester.protocols.coap.resources.plugtest import large_body
from nettester.protocols.coap.server import CoapServerService
from nettester.protocols.dtls.connection import DtlsConfiguration
from nettester.protocols.dtls.credentials import PskStore
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from tests.interop.peers import missing_peer

pytestmark = pytest.mark.interop

CLIENT_SCRIPT = r"""
import asyncio, json, sys
import aiocoap

async def main(plugtest, extended):
    context = await aiocoap.Context.create_client_context()
    results = {}
    large = await context.request(aiocoap.Message(code=aiocoap.GET, uri=plugtest + "/large")).response
    results["large"] = large.payload.decode()
    bench = await context.request(aiocoap.Message(code=aiocoap.GET, uri=extended + "/benchmark?rlen=40")).response
    results["benchmark"] = [str(bench.code), bench.payload.decode()]
    post = aiocoap.Message(code=aiocoap.POST, uri=extended + "/requests?dev=aio&rid=7&ep")
    post.opt.accept = 50
    history = await context.request(post).response
    results["requests"] = json.loads(history.payload)
    filtered = aiocoap.Message(code=aiocoap.GET, uri=plugtest + "/.well-known/core?rt=Type2")
    core = await context.request(filtered).response
    results["core"] = core.payload.decode()
    observation = context.request(aiocoap.Message(code=aiocoap.GET, uri=plugtest + "/obs-pumping", observe=0))
    first = await observation.response
    notes = [first.payload.decode()]
    async for note in observation.observation:
        notes.append(note.payload.decode())
        if len(notes) == 4:
            observation.observation.cancel()
            break
    results["observe"] = notes
    print(json.dumps(results))
    await context.shutdown()

asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 20))
"""


def require(module: str) -> None:
    """Skip without ``module``, fail without it on CI."""
    try:
        __import__(module)
    except ImportError:
        missing_peer(f"{module} not installed (pip install -e .[interop]: aiocoap[tinydtls] builds DTLSSocket, "
                     "which needs autoconf, automake and libtool)")


@pytest_twisted.inlineCallbacks
def test_aiocoap_client_against_our_server() -> Generator[Any, Any, None]:
    require("aiocoap")
    service = CoapServerService(reactor, 0, ["127.0.0.1"], benchmark=True, notify_interval=1.0)
    service.startService()
    ports = {name: port for _, _, port, name in service.listening}
    try:
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-c", CLIENT_SCRIPT, f"coap://127.0.0.1:{ports['plugtest']}", f"coap://127.0.0.1:{ports['extended']}"],
            env=os.environ,
        )
        assert code == 0, err.decode()
        results = json.loads(out)
        assert results["large"].encode() == large_body()  # block-wise
        assert results["benchmark"] == ["2.05 Content", "hello benchmark" + "*" * 25]
        # Californium's shape: [{"systemstart"}, {"rid", "time", "ep", "port"}]
        assert results["requests"][1]["rid"] == "7"
        assert results["requests"][1]["ep"] == "127.0.0.1" and results["requests"][1]["port"] > 0
        assert results["core"].count("<") == 2 and "</link1>" in results["core"]
        assert len(results["observe"]) == 4  # the registration answer and three notifications
    finally:
        yield service.stopService()


COAPS_SCRIPT = r"""
import asyncio, json, sys
import aiocoap

async def main(uri_base, credentials):
    context = await aiocoap.Context.create_client_context()
    context.client_credentials.load_from_dict(json.loads(credentials))
    results = {}
    mine = aiocoap.Message(code=aiocoap.GET, uri=uri_base + "/mycontext")
    results["mycontext"] = (await context.request(mine).response).payload.decode()
    bench = aiocoap.Message(code=aiocoap.GET, uri=uri_base + "/benchmark?rlen=20")
    results["benchmark"] = (await context.request(bench).response).payload.decode()
    print(json.dumps(results))
    await context.shutdown()

asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 20))
"""


@pytest_twisted.inlineCallbacks
def test_aiocoap_coaps_client_against_our_server() -> Generator[Any, Any, None]:
    require("aiocoap")
    require("DTLSSocket")
    store = PskStore({b"client-1": b"secretPSK"})
    service = CoapServerService(
        reactor, 0, ["127.0.0.1"], benchmark=True, plugtest=False, dtls_only=True,
        dtls_link_factory=lambda: DtlsEndpoint(reactor, server_configuration=DtlsConfiguration(
            is_client=False, psk_store=store)),
    )
    service.startService()
    (port,) = [port for _, _, port, _ in service.listening]
    base = f"coaps://127.0.0.1:{port}"
    credentials = {base + "/*": {"dtls": {"psk": {"ascii": "secretPSK"}, "client-identity": {"ascii": "client-1"}}}}
    try:
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-W", "ignore", "-c", COAPS_SCRIPT, base, json.dumps(credentials)], env=os.environ)
        assert code == 0, err.decode()
        results = json.loads(out)
        lines = results["mycontext"].splitlines()
        assert "peer: client-1" in lines and "cipher-suite: TLS_PSK_WITH_AES_128_CCM_8" in lines
        assert results["benchmark"] == "hello benchmark*****"
    finally:
        yield service.stopService()
