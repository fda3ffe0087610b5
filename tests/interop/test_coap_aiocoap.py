"""Interop with aiocoap (PyPI): its client against our plugtest and extended resources.

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


def require_aiocoap() -> None:
    try:
        import aiocoap  # noqa: F401
    except ImportError:
        message = "aiocoap not installed (pip install aiocoap, part of the test extras)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest_twisted.inlineCallbacks
def test_aiocoap_client_against_our_server() -> Generator[Any, Any, None]:
    require_aiocoap()
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
        assert results["requests"]["requests"][0]["rid"] == "7"
        assert results["requests"]["requests"][0]["ep"].startswith("127.0.0.1:")
        assert results["core"].count("<") == 2 and "</link1>" in results["core"]
        assert len(results["observe"]) == 4  # the registration answer and three notifications
    finally:
        yield service.stopService()
