"""The extended plugtest server's own resources: benchmark, receive test, peer context.

``benchmark`` is the hot path of the load test: its answers are cached per
requested length, so a GET costs a dictionary lookup once the query is read.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from xml.sax.saxutils import quoteattr

import cbor2

from nettester.addresses import address_text
from nettester.link import PeerContext
from nettester.protocols.coap.endpoint import Answer
from nettester.protocols.coap.message import Code, ContentFormat, OptionNumber, response
from nettester.protocols.coap.resources.base import Exchange, Resource
from nettester.protocols.coap.resources.reverse import ReverseObserve, ReverseRequest

BENCHMARK_BODY = b"hello benchmark"
MAX_RESPONSE_LENGTH = 8192
REQUESTS_HISTORY = 24
REQUESTS_MAX_DEVICES = 16384
_ACCEPTED = (ContentFormat.TEXT_PLAIN, ContentFormat.JSON, ContentFormat.CBOR)
_CONTEXT_FORMATS = (*_ACCEPTED, ContentFormat.XML)
#: Californium's receive test: the answer's length limit (``rlen``), 1..1023, default 500.
REQUESTS_MAX_RLEN = 1023
REQUESTS_DEFAULT_LENGTH = 500


def _negotiate(exchange: Exchange) -> int | None:
    """The Accept-ed format among text, JSON, CBOR (text when absent), None -> 4.06."""
    accept = exchange.request.accept
    if accept is None:
        return ContentFormat.TEXT_PLAIN
    return accept if accept in _ACCEPTED else None


def _render(fields: dict[str, object], content_format: int) -> bytes:
    """``name: value`` lines, a JSON object, a CBOR map or one XML element (Californium's ``<context .../>``)."""
    if content_format == ContentFormat.JSON:
        return json.dumps(fields).encode()
    if content_format == ContentFormat.CBOR:
        return cbor2.dumps(fields)
    if content_format == ContentFormat.XML:
        attributes = "".join(f"{name}={quoteattr(str(value))} " for name, value in fields.items())
        return f"<context {attributes}/>".encode()
    return "\n".join(f"{name}: {value}" for name, value in fields.items()).encode()


class Benchmark(Resource):
    """``benchmark``: POST -> 2.04 ``hello benchmark``, GET -> observable 2.05.

    ``rlen=N`` pads (with ``*``) or truncates the answer to N bytes; ``ack``
    forces a separate response. Without ``--benchmark`` every request gets
    5.01 Not Implemented.
    """

    observable = True
    static = True  # the answer depends on the query alone (and ``enabled``, fixed at start)

    def __init__(self, enabled: bool) -> None:
        super().__init__("benchmark", (("rt", "benchmark"), ("title", "Benchmark resource")))
        self.enabled = enabled
        self._bodies: dict[int, bytes] = {}

    def _answer(self, exchange: Exchange, code: int) -> Answer:
        if not self.enabled:
            return response(Code.NOT_IMPLEMENTED, b"benchmark is not supported on this host!")
        length = len(BENCHMARK_BODY)
        separate = False
        for number, value in exchange.request.options:
            if number == OptionNumber.URI_QUERY:
                # Californium answers a query it does not support, or a bad rlen, with 4.02.
                if value.startswith(b"rlen="):
                    try:
                        wanted = int(value[5:])
                    except ValueError:
                        return response(Code.BAD_OPTION, b"rlen must be a number")
                    if not 0 <= wanted <= MAX_RESPONSE_LENGTH:
                        return response(Code.BAD_OPTION, f"rlen must be 0..{MAX_RESPONSE_LENGTH}".encode())
                    length = wanted or len(BENCHMARK_BODY)  # rlen=0: the default answer
                elif value == b"ack":
                    separate = True
                else:
                    return response(Code.BAD_OPTION, b"query " + value[:40] + b" is not supported (rlen=N, ack)")
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
        return response(Code.CONTENT, address_text(context.address).encode(), ContentFormat.TEXT_PLAIN)


class MyContext(Resource):
    """``mycontext``: the peer's address and security context (text, JSON or CBOR)."""

    def __init__(self, server_name: str) -> None:
        super().__init__("mycontext", (("ct", "0 41 50 60"), ("title", "Communication Context")))
        self.server_name = server_name

    def get(self, exchange: Exchange) -> Answer:
        accept = exchange.request.accept
        content_format = ContentFormat.TEXT_PLAIN if accept is None else accept
        if content_format not in _CONTEXT_FORMATS:
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
    """One entry of a device's history in the receive test; ``source`` when ``ep`` was asked."""

    rid: str
    time_ms: int
    source: tuple[str, int] | None


class Requests(Resource):
    """``requests``: the receive test, answered as Californium's ``RequestStatistic`` does.

    POST with ``dev=<uuid>&rid=<id>[&ep][&rlen=N]``: the request is recorded
    for the device (newest 24 kept, 16,384 devices at most, the least
    recently updated evicted), and the answer is 2.04 with the history,
    newest first, as many entries as fit into ``rlen`` bytes (1..1023,
    default 500):

    - text: ``systemstart:<ms>`` then one ``<rid>:<ms>`` line per request;
    - JSON: an array, ``{"systemstart": ms}`` first, then
      ``{"rid", "time"[, "ep", "port"]}`` maps (``ep`` the address as text);
    - CBOR: the same array, ``ep`` the address's bytes (4 or 16).

    A missing ``dev`` or ``rid``, a ``:`` in ``rid``, a bad ``rlen`` or any
    other query gets 4.02 naming it.
    """

    def __init__(self, clock: Callable[[], float], started: float,
                 max_devices: int = REQUESTS_MAX_DEVICES, history: int = REQUESTS_HISTORY) -> None:
        super().__init__("requests", (("ct", "0 50 60"),
                                      ("title", "Resource that collects requests for client statistics")))
        self._clock = clock
        self.system_start_ms = int(started * 1000)
        self.max_devices = max_devices
        self.history = history
        self.devices: OrderedDict[str, deque[ReceivedRequest]] = OrderedDict()

    @staticmethod
    def _read_query(exchange: Exchange) -> tuple[str, str, bool, int] | str:
        """(device, rid, ep, rlen) or what is wrong with the query."""
        device = rid = None
        source = False
        length = REQUESTS_DEFAULT_LENGTH
        for argument in exchange.request.uri_query:
            if argument.startswith("rid="):
                rid = argument[4:]
                if ":" in rid:
                    return "rid must not contain ':'"
            elif argument.startswith("dev="):
                device = argument[4:]
            elif argument.startswith("rlen="):
                try:
                    length = int(argument[5:])
                except ValueError:
                    return "rlen is no number"
                if not 1 <= length <= REQUESTS_MAX_RLEN:
                    return f"rlen must be 1..{REQUESTS_MAX_RLEN}"
            elif argument == "ep":
                source = True
            else:
                return f"query {argument[:40]!r} is not supported (dev, rid, ep, rlen)"
        if not device or not rid:
            return "query needs dev=<uuid>&rid=<id>"
        return device, rid, source, length

    def post(self, exchange: Exchange) -> Answer:
        query = self._read_query(exchange)
        if isinstance(query, str):
            return response(Code.BAD_OPTION, query.encode(), ContentFormat.TEXT_PLAIN)
        device, rid, source, length = query
        content_format = _negotiate(exchange)
        if content_format is None:
            return response(Code.NOT_ACCEPTABLE)
        address = exchange.peer_context().address if source else None
        entries = self.devices.pop(device, None)
        if entries is None:
            entries = deque(maxlen=self.history)
            if len(self.devices) >= self.max_devices:
                self.devices.popitem(last=False)
        self.devices[device] = entries
        entries.append(ReceivedRequest(rid, int(self._clock() * 1000), address))
        return response(Code.CHANGED, self._report(list(reversed(entries)), content_format, length), content_format)

    def _report(self, entries: list[ReceivedRequest], content_format: int, limit: int) -> bytes:
        """The history, newest first, cut after the last entry that fits into ``limit`` bytes."""
        if content_format == ContentFormat.TEXT_PLAIN:
            text = f"systemstart:{self.system_start_ms}\n"
            for entry in entries:
                line = f"{entry.rid}:{entry.time_ms}\n"
                if len(text) + len(line) > limit:
                    break
                text += line
            return text.encode()
        items: list[dict[str, object]] = [{"systemstart": self.system_start_ms}]
        encode: Callable[[object], bytes] = (
            (lambda value: json.dumps(value).encode()) if content_format == ContentFormat.JSON else cbor2.dumps
        )
        payload = encode(items)
        for entry in entries:
            item: dict[str, object] = {"rid": entry.rid, "time": entry.time_ms}
            if entry.source is not None:
                host, port = entry.source
                item["ep"] = host if content_format == ContentFormat.JSON else ip_address(host).packed
                item["port"] = port
            items.append(item)
            longer = encode(items)
            if len(longer) > limit:
                break
            payload = longer
        return payload


def extended_resources(benchmark: bool, server_name: str, clock: Callable[[], float], started: float) -> list[Resource]:
    """The extended server's resources (on the ``BASE+100`` ports)."""
    return [
        Benchmark(benchmark),
        Requests(clock, started),
        MyContext(server_name),
        MyIp("myip", (("title", "Your IP address and port"),)),
        Echo("echo", (("title", "Echoes the request body"),)),
        ReverseRequest(),
        ReverseObserve(),
    ]
