"""The ``coap-receivetest`` role: Californium's ReceivetestClient.

The device keeps a UUID in a file, so successive runs show up as one device
in the server's ``requests`` resource. Each run POSTs
``requests?dev=<uuid>&rid=<id>&ep`` and prints the history the server
returns (which of our earlier requests arrived, when, from which address),
with the RTT of this request: lost requests show as gaps in the history.

With ``--duration S`` it repeats the POST (one second after each answer or
failure) until S, and attributes each failed request by the histories that
follow: a request the server recorded lost its answer on the way back
(``lost_return``); one missing from a history that reaches back past it was
lost on the way out (``lost_forward``); one the 24-entry history no longer
covers, or still open at the end, is ``lost_unattributed``. A summary line
with the three keys and a verdict line follow the last history.

With ``--log-format json`` every one of these result lines is a JSON log
line instead (event ``coap_receivetest_*``, with its values as fields), so
stdout holds nothing else.
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
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from nettester.interfaces import IDatagramLink
from nettester.logs import ALWAYS, Logger
from nettester.protocols.coap.client import (
    EXIT_ERROR_RESPONSE,
    EXIT_SUCCESS,
    CoapUri,
    OneServerService,
    build_request,
    end_process,
    link_for_options,
    server_text,
)
from nettester.protocols.coap.endpoint import CoapRequestError
from nettester.protocols.coap.events import ResponseReceived
from nettester.protocols.coap.message import Code, ContentFormat, Message, code_name
from nettester.protocols.coap.options import MAX_TRANSMIT_WAIT
from nettester.protocols.coap.resources.extended import REQUESTS_HISTORY
from nettester.report import (
    FORWARD,
    RETURN,
    UNATTRIBUTED,
    LossEpisode,
    ReportError,
    RttHistogram,
    RunRecorder,
    judge,
    write_report,
)
from nettester.report.options import ResultSettings

log = Logger()

LOOP_DELAY = 1.0  # seconds between an answer (or a failure) and the next POST with --duration

DEFAULT_UUID_FILE = os.path.join(os.path.expanduser("~"), ".nettester", "coap-receivetest.uuid")

log = Logger()


def device_uuid(path: str, reset: bool) -> str:
    """The device's UUID from ``path``; a new one (saved) when absent or ``reset``.

    When ``path`` cannot be written (a read-only ``HOME``, as in a container with
    ``readOnlyRootFilesystem``), the new UUID lives in memory for this run, with a warning.
    """
    if not reset:
        try:
            with open(path) as stored:
                text = stored.read().strip()
            return str(uuid.UUID(text))
        except (OSError, ValueError):
            pass
    fresh = str(uuid.uuid4())
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as stored:
            stored.write(fresh + "\n")
    except OSError as error:
        log.warn("Cannot keep the device UUID in {path} ({error}): using {device} for this run only, so its "
                 "history starts afresh; choose a writable --uuid-file", event="receivetest_uuid_unsaved",
                 path=path, error=error.strerror or error, device=fresh)
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


def attribute(rid: str, sequence: int, run: str, entries: list[HistoryEntry]) -> str:
    """Where failed request ``rid`` (our ``sequence``-th of ``run``) was lost, by a later history.

    The history is the newest arrivals of the device, without gaps. Recorded:
    the answer was lost on the way back. Not recorded, while the history
    also holds an arrival older than it would be (a request of an earlier
    run or an earlier one of ours), or holds every arrival (fewer than the
    server keeps): lost on the way out. Otherwise the later requests pushed
    it out of the history: unattributed.
    """
    if any(entry.rid == rid for entry in entries):
        return RETURN
    prefix = run + "-"
    later = sum(1 for entry in entries if entry.rid.startswith(prefix) and entry.rid[len(prefix):].isdigit()
                and int(entry.rid[len(prefix):]) > sequence)
    if later < len(entries) or len(entries) < REQUESTS_HISTORY:
        return FORWARD
    return UNATTRIBUTED


class ReceiveTestService(OneServerService):
    """One POST to ``requests`` (or one a second for ``--duration``); prints the device's history; then done."""

    def __init__(self, reactor: Any, uri: CoapUri, device: str, link: IDatagramLink, stdout: IO[str],
                 content_format: int = ContentFormat.TEXT_PLAIN, timeout: float = MAX_TRANSMIT_WAIT,
                 results: ResultSettings | None = None, json_lines: bool = False) -> None:
        self.device = device
        self.json_lines = json_lines
        self.run = f"r{int(reactor.seconds() * 1000)}"
        self.rid = self.run
        self.results = results if results is not None else ResultSettings()
        self.looping = self.results.duration > 0
        super().__init__(reactor, uri, link, stdout, timeout)
        self.content_format = content_format
        self.recorder = RunRecorder("coap-receivetest", {"target": server_text(uri.address), "scheme": uri.scheme,
                                                         "device": device, "duration_s": self.results.duration,
                                                         "timeout_s": timeout}, reactor.seconds())
        self.rtt = RttHistogram()
        self.sent = 0
        self.answers = 0
        self.failures = 0
        self.pending: dict[str, LossEpisode] = {}
        self._peer: Any = None
        self._final: defer.Deferred[ResponseReceived] = defer.Deferred()
        self._last: ResponseReceived | None = None
        self._last_failure: Failure | None = None
        self._finishing = False
        self._next: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._concluded = False

    def print(self, text: str, event: str = "coap_receivetest_output", **fields: Any) -> None:
        """A result line: plain text on stdout, or with ``--log-format json`` a JSON log line (at every level)."""
        if self.json_lines:
            log.info("{text}", event=event, text=text, **{ALWAYS: True}, **fields)
            return
        super().print(text)

    def request(self) -> Message:
        """The POST to ``requests`` for the current rid, asking for the history in the chosen format."""
        query = (f"dev={self.device}", f"rid={self.rid}", "ep")
        uri = CoapUri(self.uri.scheme, self.uri.host, self.uri.port, self.uri.path, query)
        return build_request(uri, "POST", accept=self.content_format)

    def rearm_watchdog(self) -> None:
        """With ``--duration``, once connected, each request has its own ``--timeout``: no watchdog."""
        if self.looping and self._peer is not None:
            if self._watchdog is not None and self._watchdog.active():
                self._watchdog.cancel()
            self._watchdog = None
            return
        super().rearm_watchdog()

    def exchange(self, peer: Any) -> defer.Deferred[ResponseReceived]:
        assert self.endpoint is not None
        if not self.looping:
            self.sent = 1
            return self.endpoint.request(peer, self.request()).addCallback(self._counted)
        self._peer = peer
        self.rearm_watchdog()
        self._deadline = self._reactor.callLater(self.results.duration, self._finish)
        self._send()
        return self._final

    def _counted(self, event: ResponseReceived) -> ResponseReceived:
        self.answers += 1
        if event.rtt is not None:
            self.rtt.record(event.rtt)
        return event

    def _send(self) -> None:
        assert self.endpoint is not None
        self._next = None
        self.sent += 1
        self.rid = f"{self.run}-{self.sent}"
        sending = self.endpoint.request(self._peer, self.request(), timeout=self.timeout)
        sending.addCallbacks(self._loop_answered, self._loop_failed,
                             errbackArgs=(self.rid, self.sent, self._reactor.seconds()))

    def _loop_answered(self, event: ResponseReceived) -> None:
        if self._final.called:
            return
        self._counted(event)
        self._last = event
        try:
            if event.response.code != Code.CHANGED:
                raise ValueError("not 2.04")
            _, entries = parse_history(event.response.payload, event.response.content_format)
        except ValueError:
            self._final.callback(event)  # answered() says what the server sent
            return
        now = self._reactor.seconds()
        for rid, episode in list(self.pending.items()):
            direction = attribute(rid, int(episode.detail["sequence"]), self.run, entries)
            del self.pending[rid]
            self.recorder.episode(LossEpisode(episode.client, rid, episode.start, now, direction,
                                              episode.transmissions, 1 if direction == RETURN else 0, episode.detail))
        self._continue()

    def _loop_failed(self, failure: Failure, rid: str, sequence: int, started: float) -> None:
        if self._final.called:
            return
        error = failure.value
        if not isinstance(error, CoapRequestError):
            self._final.errback(failure)
            return
        self.failures += 1
        self._last_failure = failure
        error = failure.value
        assert isinstance(error, CoapRequestError)  # check() matched its type
        outgoing, token = error.request, error.request.token.hex()
        self.pending[rid] = LossEpisode(self.device, rid, started, None, UNATTRIBUTED, 1, None,
                                        {"sequence": sequence, "reason": error.reason, "mid": outgoing.mid,
                                         "token": token})
        self.print(f"request rid={rid} to {self.server} failed: {error.reason} (MID {outgoing.mid}, token {token})",
                   "coap_receivetest_failed", rid=rid, server=self.server, reason=error.reason, mid=outgoing.mid,
                   token=token)
        self._continue()

    def _continue(self) -> None:
        if self._finishing:
            self._finish()
        else:
            self._next = self._reactor.callLater(LOOP_DELAY, self._send)

    def _finish(self) -> None:
        """``--duration`` is over: end with the last answer (the request in flight, if any, first ends)."""
        self._finishing = True
        if self._next is not None and self._next.active():
            self._next.cancel()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._final.called:
            return
        if self._last is not None:
            self._final.callback(self._last)
        elif self._last_failure is not None:
            self._final.errback(self._last_failure)

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
        self.print(f"device {self.device}", "coap_receivetest_device", device=self.device)
        self.print(format_history(systemstart, entries, self.rid, event.rtt), "coap_receivetest_history",
                   systemstart=systemstart, rid=self.rid,
                   history=[{"rid": entry.rid, "time_ms": entry.time_ms, "endpoint": entry.endpoint}
                            for entry in entries],
                   rtt_ms=None if event.rtt is None else round(event.rtt * 1000, 3))
        return EXIT_SUCCESS

    def _end(self, status: int) -> None:
        if not self._concluded:
            self._concluded = True
            status = self._conclude(status)
        super()._end(status)

    def _conclude(self, status: int) -> int:
        """Unresolved failures are unattributed; the summary and verdict (``--duration``), the report."""
        now = self._reactor.seconds()
        for call in (self._next, self._deadline):
            if call is not None and call.active():
                call.cancel()
        for episode in self.pending.values():
            self.recorder.episode(episode)
        self.pending.clear()
        thresholds = self.results.thresholds
        verdict = judge(thresholds, self.sent, self.failures if self.looping else self.sent - self.answers,
                        self.answers)
        loss = self.recorder.loss_fields()
        rtt = self.rtt.percentiles_ms((50.0, 90.0, 99.0))
        if self.looping:
            shown = ("no responses" if rtt is None
                     else f"p50={rtt['p50']:.1f}, p99={rtt['p99']:.1f}, max={rtt['max']:.1f}")
            self.print(f"{self.sent} requests, {self.answers} answered, {self.failures} failed: "
                       + " ".join(f"{key}={value}" for key, value in loss.items()) + f"; RTT ms: {shown}",
                       "coap_receivetest_summary", requests=self.sent, answered=self.answers,
                       failed=self.failures, **loss, rtt_ms=rtt)
            self.print(verdict.line(), "verdict", passed=verdict.passed, reasons=list(verdict.reasons))
        if status == EXIT_SUCCESS:
            status = verdict.exit_status
        if self.results.report:
            counters = {"requests": self.sent, "answered": self.answers, "failed": self.failures, **loss}
            try:
                write_report(self.results.report, self.recorder.document(now, counters, rtt, thresholds, verdict))
            except ReportError as error:
                self.print(str(error))
                if status == EXIT_SUCCESS:
                    status = EXIT_ERROR_RESPONSE
        return status


def make_receivetest_service(reactor: Any, options: Any, stdout: IO[str]) -> ReceiveTestService:
    """The role's service from parsed :class:`CoapReceiveTestOptions`; ends the process when done."""
    uri = options["uri"]
    content_format = ContentFormat.CBOR if options["cbor"] else ContentFormat.JSON if options["json"] else 0
    device = device_uuid(options["uuid-file"], bool(options["reset-uuid"]))
    service = ReceiveTestService(reactor, uri, device, link_for_options(reactor, options), stdout,
                                 content_format, options["timeout"], ResultSettings.from_options(options),
                                 json_lines=options["log-format"] == "json")
    service.done.addCallback(lambda status: end_process(service, reactor, status))
    return service
