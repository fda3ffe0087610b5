"""The ``coap-receivetest`` role: Californium's ReceivetestClient.

The device keeps a UUID in a file, so successive runs show up as one device
in the server's ``requests`` resource. Each run POSTs
``requests?dev=<uuid>&rid=<id>&ep`` and prints the history the server
returns (which of our earlier requests arrived, when, from which address),
with the RTT of this request: lost requests show as gaps in the history.
"""

from __future__ import annotations

import ipaddress
import json
import os
import uuid
from dataclasses import dataclass
from typing import IO, Any

import cbor2
from twisted.internet import defer

from nettester.interfaces import IDatagramLink
from nettester.protocols.coap.client import (
    EXIT_ERROR_RESPONSE,
    EXIT_SUCCESS,
    CoapUri,
    OneServerService,
    build_request,
    end_process,
    make_link,
)
from nettester.protocols.coap.layer import ResponseReceived
from nettester.protocols.coap.message import Code, ContentFormat, Message, code_name
from nettester.protocols.coap.options import MAX_TRANSMIT_WAIT

DEFAULT_UUID_FILE = os.path.join(os.path.expanduser("~"), ".nettester", "coap-receivetest.uuid")


def device_uuid(path: str, reset: bool) -> str:
    """The device's UUID from ``path``; a new one (saved) when absent or ``reset``."""
    if not reset:
        try:
            with open(path) as stored:
                text = stored.read().strip()
            return str(uuid.UUID(text))
        except (OSError, ValueError):
            pass
    fresh = str(uuid.uuid4())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as stored:
        stored.write(fresh + "\n")
    return fresh


@dataclass(frozen=True)
class HistoryEntry:
    """One request the server recorded for this device."""

    rid: str
    time_ms: int
    endpoint: str | None


def parse_history(payload: bytes, content_format: int | None) -> tuple[int, list[HistoryEntry]]:
    """``systemstart`` and the entries, newest first, from a text, JSON or CBOR answer.

    :raises ValueError: when the payload is not what the ``requests`` resource sends.
    """
    try:
        if content_format in (ContentFormat.JSON, ContentFormat.CBOR):
            document = json.loads(payload) if content_format == ContentFormat.JSON else cbor2.loads(payload)
            if isinstance(document, list):
                # Californium's shape: [{"systemstart": ms}, {"rid", "time"[, "ep", "port"]}, ...]
                entries = [HistoryEntry(str(item["rid"]), int(item["time"]), _endpoint(item))
                           for item in document[1:]]
                return int(document[0]["systemstart"]), entries
            entries = [HistoryEntry(str(item["rid"]), int(item["time"]), item.get("ep"))
                       for item in document["requests"]]
            return int(document["systemstart"]), entries
        lines = [line for line in payload.decode().splitlines() if line]
        name, _, start = lines[0].partition(":")
        if name != "systemstart":
            raise ValueError("no systemstart line")
        entries = []
        for line in lines[1:]:
            rid, _, rest = line.partition(":")  # a rid never holds ':' (the server refuses it)
            time_text, _, endpoint = rest.strip().partition(" ")
            entries.append(HistoryEntry(rid, int(time_text), endpoint or None))
        return int(start), entries
    except (KeyError, TypeError, IndexError, UnicodeDecodeError, cbor2.CBORDecodeError) as error:
        raise ValueError(f"not a receive-test history: {error}") from None


def _endpoint(item: dict[str, object]) -> str | None:
    """``host:port`` of a Californium-shaped entry (``ep`` text in JSON, address bytes in CBOR)."""
    host, port = item.get("ep"), item.get("port")
    if host is None:
        return None
    if isinstance(host, bytes):
        host = str(ipaddress.ip_address(host))
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def format_history(systemstart: int, entries: list[HistoryEntry], ours: str, rtt: float | None) -> str:
    """The history as lines, this run's request marked, times relative to the newest."""
    lines = [f"server started at {systemstart} ms, {len(entries)} requests recorded for this device"]
    newest = entries[0].time_ms if entries else 0
    for entry in entries:
        marker = "*" if entry.rid == ours else " "
        where = f" from {entry.endpoint}" if entry.endpoint else ""
        lines.append(f"{marker} rid={entry.rid} at -{(newest - entry.time_ms) / 1000:.3f} s{where}")
    if rtt is not None:
        lines.append(f"RTT of this request: {rtt * 1000:.1f} ms")
    return "\n".join(lines)


class ReceiveTestService(OneServerService):
    """One POST to ``requests``; prints the device's history; then done."""

    def __init__(self, reactor: Any, uri: CoapUri, device: str, link: IDatagramLink, stdout: IO[str],
                 content_format: int = ContentFormat.TEXT_PLAIN, timeout: float = MAX_TRANSMIT_WAIT) -> None:
        self.device = device
        self.rid = f"r{int(reactor.seconds() * 1000)}"
        query = (f"dev={device}", f"rid={self.rid}", "ep")
        super().__init__(reactor, CoapUri(uri.scheme, uri.host, uri.port, uri.path, query), link, stdout, timeout)
        self.content_format = content_format

    def request(self) -> Message:
        """The POST to ``requests`` asking for the history in the chosen format."""
        return build_request(self.uri, "POST", accept=self.content_format)

    def exchange(self, peer: Any) -> defer.Deferred[ResponseReceived]:
        assert self.endpoint is not None
        return self.endpoint.request(peer, self.request())

    def answered(self, event: ResponseReceived) -> int:
        response = event.response
        if response.code != Code.CHANGED:
            self.print(f"server answered {code_name(response.code)}: {response.payload.decode('utf-8', 'replace')}")
            return EXIT_ERROR_RESPONSE
        try:
            systemstart, entries = parse_history(response.payload, response.content_format)
        except ValueError as error:
            self.print(f"unreadable answer: {error}")
            return EXIT_ERROR_RESPONSE
        self.print(f"device {self.device}")
        self.print(format_history(systemstart, entries, self.rid, event.rtt))
        return EXIT_SUCCESS


def make_receivetest_service(reactor: Any, options: Any, stdout: IO[str]) -> ReceiveTestService:
    """The role's service from parsed :class:`CoapReceiveTestOptions`; ends the process when done."""
    uri = options["uri"]
    content_format = ContentFormat.CBOR if options["cbor"] else ContentFormat.JSON if options["json"] else 0
    device = device_uuid(options["uuid-file"], bool(options["reset-uuid"]))
    service = ReceiveTestService(reactor, uri, device, make_link(reactor, uri, options["dtls"]), stdout,
                                 content_format, options["timeout"])
    service.done.addCallback(lambda status: end_process(service, reactor, status))
    return service
