"""The extended plugtest server's own resources: benchmark, receive test, peer context.

``benchmark`` is the hot path of the load test: its answers are cached per
requested length, so a GET costs a dictionary lookup once the query is read.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import cbor2

from nettester.link import PeerContext
from nettester.protocols.coap.endpoint import Answer
from nettester.protocols.coap.message import Code, ContentFormat, OptionNumber, response
from nettester.protocols.coap.resources.base import Exchange, Resource

BENCHMARK_BODY = b"hello benchmark"
MAX_RESPONSE_LENGTH = 8192
REQUESTS_HISTORY = 24
REQUESTS_MAX_DEVICES = 16384
_ACCEPTED = (ContentFormat.TEXT_PLAIN, ContentFormat.JSON, ContentFormat.CBOR)


def _format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _negotiate(exchange: Exchange) -> int | None:
    """The Accept-ed format among text, JSON, CBOR (text when absent), None -> 4.06."""
    accept = exchange.request.accept
    if accept is None:
        return ContentFormat.TEXT_PLAIN
    return accept if accept in _ACCEPTED else None


def _render(fields: dict[str, object], content_format: int) -> bytes:
    """``name: value`` lines, a JSON object or a CBOR map."""
    if content_format == ContentFormat.JSON:
        return json.dumps(fields).encode()
    if content_format == ContentFormat.CBOR:
        return cbor2.dumps(fields)
    return "\n".join(f"{name}: {value}" for name, value in fields.items()).encode()


class Benchmark(Resource):
    """``benchmark``: POST -> 2.04 ``hello benchmark``, GET -> observable 2.05.

    ``rlen=N`` pads (with ``*``) or truncates the answer to N bytes; ``ack``
    forces a separate response. Without ``--benchmark`` every request gets
    5.01 Not Implemented.
    """

    observable = True

    def __init__(self, enabled: bool) -> None:
        super().__init__("benchmark", (("rt", "benchmark"), ("title", "Benchmark resource")))
        self.enabled = enabled
        self._bodies: dict[int, bytes] = {}

    def _answer(self, exchange: Exchange, code: int) -> Answer:
        if not self.enabled:
            return response(Code.NOT_IMPLEMENTED)
        length = len(BENCHMARK_BODY)
        separate = False
        for number, value in exchange.request.options:
            if number == OptionNumber.URI_QUERY:
                if value.startswith(b"rlen="):
                    try:
                        length = int(value[5:])
                    except ValueError:
                        return response(Code.BAD_REQUEST, b"rlen must be a number")
                    if not 0 <= length <= MAX_RESPONSE_LENGTH:
                        return response(Code.BAD_REQUEST, b"rlen out of range")
                elif value == b"ack":
                    separate = True
        body = self._bodies.get(length)
        if body is None:
            body = self._bodies[length] = BENCHMARK_BODY.ljust(length, b"*")[:length]
        if separate:
            exchange.accept()
        return response(code, body, ContentFormat.TEXT_PLAIN)

    def get(self, exchange: Exchange) -> Answer:
        return self._answer(exchange, Code.CONTENT)

    def post(self, exchange: Exchange) -> Answer:
        return self._answer(exchange, Code.CHANGED)


class Echo(Resource):
    """``echo``: answers the request body with its Content-Format."""

    def _echo(self, exchange: Exchange, code: int) -> Answer:
        request = exchange.request
        return response(code, request.payload, request.content_format)

    def get(self, exchange: Exchange) -> Answer:
        return self._echo(exchange, Code.CONTENT)

    def post(self, exchange: Exchange) -> Answer:
        return self._echo(exchange, Code.CHANGED)

    def put(self, exchange: Exchange) -> Answer:
        return self._echo(exchange, Code.CHANGED)


class MyIp(Resource):
    """``myip``: the source address the server saw, ``ip:port``."""

    def get(self, exchange: Exchange) -> Answer:
        context = exchange.peer_context()
        return response(Code.CONTENT, _format_address(context.address).encode(), ContentFormat.TEXT_PLAIN)


class MyContext(Resource):
    """``mycontext``: the peer's address and security context (text, JSON or CBOR)."""

    def __init__(self, server_name: str) -> None:
        super().__init__("mycontext", (("title", "Your context as the server sees it"),))
        self.server_name = server_name

    def get(self, exchange: Exchange) -> Answer:
        content_format = _negotiate(exchange)
        if content_format is None:
            return response(Code.NOT_ACCEPTABLE)
        return response(Code.CONTENT, _render(self.fields(exchange.peer_context()), content_format), content_format)

    def fields(self, context: PeerContext) -> dict[str, object]:
        """The context as ordered name -> value, absent values left out."""
        fields: dict[str, object] = {"ip": context.address[0], "port": context.address[1]}
        optional: dict[str, object | None] = {
            "node-id": context.node_id,
            "peer": context.identity,
            "cipher-suite": context.cipher_suite,
            "read-cid": context.read_cid.hex() if context.read_cid is not None else None,
            "write-cid": context.write_cid.hex() if context.write_cid is not None else None,
            "via": context.via,
            "prev-ip": context.previous_address[0] if context.previous_address else None,
            "prev-port": context.previous_address[1] if context.previous_address else None,
        }
        fields.update((name, value) for name, value in optional.items() if value is not None)
        fields["server"] = self.server_name
        return fields


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One entry of a device's history in the receive test."""

    rid: str
    time_ms: int
    endpoint: str | None


class Requests(Resource):
    """``requests``: the receive test (Californium's ``ReceivetestClient`` server side).

    POST with ``dev=<uuid>&rid=<id>[&ep]``: the request is recorded for the
    device (newest 24 kept, 16,384 devices at most, the least recently
    updated evicted), and the answer is 2.04 with ``systemstart`` and the
    device's history as text, JSON or CBOR.
    """

    def __init__(self, clock: Callable[[], float], started: float,
                 max_devices: int = REQUESTS_MAX_DEVICES, history: int = REQUESTS_HISTORY) -> None:
        super().__init__("requests", (("title", "Receive test: records and reports requests per device"),))
        self._clock = clock
        self.system_start_ms = int(started * 1000)
        self.max_devices = max_devices
        self.history = history
        self.devices: OrderedDict[str, deque[ReceivedRequest]] = OrderedDict()

    def post(self, exchange: Exchange) -> Answer:
        query = exchange.query()
        device, rid = query.get("dev"), query.get("rid")
        if not device or not rid or ":" in rid:
            return response(Code.BAD_OPTION, b"query needs dev=<uuid>&rid=<id> (no ':' in rid)")
        content_format = _negotiate(exchange)
        if content_format is None:
            return response(Code.NOT_ACCEPTABLE)
        endpoint = None
        if "ep" in query:
            endpoint = _format_address(exchange.peer_context().address)
        entries = self.devices.pop(device, None)
        if entries is None:
            entries = deque(maxlen=self.history)
            if len(self.devices) >= self.max_devices:
                self.devices.popitem(last=False)
        self.devices[device] = entries
        entries.append(ReceivedRequest(rid, int(self._clock() * 1000), endpoint))
        return response(Code.CHANGED, self._report(entries, content_format), content_format)

    def _report(self, entries: deque[ReceivedRequest], content_format: int) -> bytes:
        if content_format == ContentFormat.TEXT_PLAIN:
            lines = [f"systemstart: {self.system_start_ms}"]
            for entry in reversed(entries):
                line = f"{entry.rid}: {entry.time_ms}"
                lines.append(line if entry.endpoint is None else f"{line} {entry.endpoint}")
            return "\n".join(lines).encode()
        history = []
        for entry in reversed(entries):
            item: dict[str, object] = {"rid": entry.rid, "time": entry.time_ms}
            if entry.endpoint is not None:
                item["ep"] = entry.endpoint
            history.append(item)
        document = {"systemstart": self.system_start_ms, "requests": history}
        return json.dumps(document).encode() if content_format == ContentFormat.JSON else cbor2.dumps(document)


def extended_resources(benchmark: bool, server_name: str, clock: Callable[[], float], started: float) -> list[Resource]:
    """The extended server's resources (on the ``BASE+100`` ports)."""
    return [
        Benchmark(benchmark),
        Requests(clock, started),
        MyContext(server_name),
        MyIp("myip", (("title", "Your IP address and port"),)),
        Echo("echo", (("title", "Echoes the request body"),)),
    ]
