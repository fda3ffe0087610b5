"""``keepalive-client``: a fleet of long-lived keep-alive connections.

Each client number holds one connection at a time (a :class:`ClientSlot`), sends
``Establish Session``, keep-alives and dummies through a :class:`ClientConnection`
core, tells a FIN from a RST from a missing response, and reconnects after
``--reconnect-delay``. Every connection has a conn id unique across runs and
replicas (``<run>-<client>-<attempt>``) that the server logs too.

With result settings (``--duration``, ``--report``, ``--max-loss``,
``--max-resets``) the fleet records every outage as a loss episode (from
the drop to the next connection, by cause and conn id), samples the open
connections and keep-alive RTTs every second, marks every close by cause,
and at the end logs its verdict, writes the report and sets the exit status.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.keepalive.adapter import (
    PEER_CLOSED,
    PEER_RESET,
    TLS_ERROR,
    CoreProtocol,
    OpenConnections,
    address_text,
)
from nettester.protocols.keepalive.backoff import DEFAULT_MAX_DELAY, Backoff, RepeatedFailures, Repeats
from nettester.protocols.keepalive.runlines import ERRORS, duration_line, log_verdict, start_line, summary_of, target
from nettester.protocols.keepalive.transport import connect_tcp
from nettester.protocols.keepalive.wire import (
    ClientConnection,
    ClientPlan,
    ClientTiming,
    DummyReceived,
    Event,
    KeepAliveAnswered,
    ProtocolError,
    ResponseMissing,
)
from nettester.report import (
    CLOSE,
    UNATTRIBUTED,
    LossEpisode,
    ReportError,
    RttHistogram,
    RunRecorder,
    Verdict,
    judge,
    write_report,
)
from nettester.report.options import ResultSettings
from nettester.service import set_exit_status
from nettester.tally import Tally
from nettester.workers import current_worker

log = Logger()

CLOSED_BY_CLIENT = "closed_by_client"
SERVER_UNAVAILABLE = "server_unavailable"
SHUTDOWN = "shutdown"
SAMPLE_INTERVAL = 1.0  # seconds between time-series samples of the report
RTT_PERCENTILES = (50.0, 90.0, 99.0)


class Outage:
    """A client number without a connection since ``start``: a loss episode once it ends."""

    __slots__ = ("attempts", "cause", "conn", "detail", "start")

    def __init__(self, start: float, cause: str, conn: str, detail: str) -> None:
        self.start = start
        self.cause = cause
        self.conn = conn
        self.detail = detail
        self.attempts = 0

    def episode(self, client: int, end: float | None) -> LossEpisode:
        """The episode: keyed by the conn id that dropped; over TCP the direction is not known."""
        return LossEpisode(str(client), self.conn, self.start, end, UNATTRIBUTED, self.attempts, None,
                           {"cause": self.cause, "detail": self.detail})

# Seconds during which the same failure again is counted instead of logged (see backoff.py).
REPEAT_WINDOW = 10.0


class KeepAliveClientProtocol(CoreProtocol):
    """One client connection."""

    core: ClientConnection

    def __init__(self, slot: ClientSlot, conn_id: str) -> None:
        super().__init__(slot.fleet.clock)
        self.slot = slot
        self.conn = conn_id
        self.local = "-"
        self.peer = "-"

    def connectionMade(self) -> None:
        fleet = self.slot.fleet
        assert self.transport is not None
        self.local = address_text(self.transport.getHost())
        self.peer = address_text(self.transport.getPeer())
        log.info("Client {client}: connected {local} -> {peer}, conn={conn}", event="conn_open",
                 client=self.slot.number, local=self.local, peer=self.peer, conn=self.conn)
        self.core = ClientConnection(fleet.plan, str(self.slot.number), self.conn, self.clock.seconds())
        self.slot.connection_made(self)
        self.pump()
        if not fleet.running:
            self.close("shutdown")

    def handle_event(self, event: Event) -> None:
        fleet = self.slot.fleet
        if type(event) is KeepAliveAnswered:
            self.slot.backoff.succeeded()
            fleet.answered.value += 1
            fleet.interval_rtt.record(event.rtt)
        elif type(event) is DummyReceived:
            fleet.dummies.value += 1
        elif isinstance(event, ResponseMissing):
            fleet.responses_missing.value += 1
            log.error("Client {client}: Keep alive response not received, conn={conn}", event="response_missing",
                      client=self.slot.number, conn=self.conn, seq=event.seq, waited=round(event.waited, 3))
            self.close("response_missing")
        elif isinstance(event, ProtocolError):
            fleet.protocol_errors.value += 1
            log.error("Client {client}: invalid message from server, conn={conn}: {reason}: {excerpt}",
                      event="protocol_error", client=self.slot.number, conn=self.conn, reason=event.reason,
                      excerpt=event.excerpt)
            self.close("protocol_error")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cause, detail = self.connection_lost_cause(reason, CLOSED_BY_CLIENT)
        fields = {"event": "conn_closed", "client": self.slot.number, "conn": self.conn, "cause": cause,
                  "detail": detail, "local": self.local, "peer": self.peer}
        if cause == PEER_CLOSED:
            log.error("Client {client}: Server terminated TCP connection, conn={conn}", **fields)
        elif cause == PEER_RESET:
            log.error("Client {client}: TCP connection reset, conn={conn}", **fields)
        elif cause == TLS_ERROR:
            log.emit(self.slot.fleet.failure_level(f"TLS failed: {detail}", self.conn),
                     "Client {client}: TLS failed, conn={conn}: {detail}", **fields)
        else:
            log.info("Client {client}: closed TCP connection, conn={conn} :{detail}", **fields)
        self.slot.connection_lost(self, cause, detail)


class ClientSlot(ClientFactory):
    """Client number ``number``: one connection at a time, reconnecting after a drop."""

    noisy = False

    def __init__(self, fleet: KeepAliveClientService, number: int) -> None:
        self.fleet = fleet
        self.number = number
        self.attempt = 0
        self.conn_id = ""
        self.connector: IConnector | None = None
        self.protocol_instance: KeepAliveClientProtocol | None = None
        self.pending: IDelayedCall | None = None
        self.outage: Outage | None = None
        self.backoff = Backoff(fleet.reconnect_delay, fleet.reconnect_max_delay, fleet.rng)

    def schedule(self, delay: float) -> None:
        """Connect after ``delay`` seconds."""
        self.pending = self.fleet.clock.callLater(delay, self.connect)

    def connect(self) -> None:
        self.pending = None
        self.attempt += 1
        self.conn_id = f"{self.fleet.run_id}-{self.number}-{self.attempt}"
        self.fleet.connect_attempts.value += 1
        if self.outage is not None:
            self.outage.attempts += 1
        self.connector = self.fleet.connect(self)

    def buildProtocol(self, addr: IAddress | None) -> KeepAliveClientProtocol:
        return KeepAliveClientProtocol(self, self.conn_id)

    def connection_made(self, protocol: KeepAliveClientProtocol) -> None:
        self.protocol_instance = protocol
        if self.outage is not None:
            self.fleet.outage_ended(self.number, self.outage)
            self.outage = None
        self.fleet.connected(protocol)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.connector = None
        if not self.fleet.running:
            return
        self.fleet.connect_failures.value += 1
        text = reason.getErrorMessage().rstrip(".")
        if self.outage is None:
            self.outage = Outage(self.fleet.clock.seconds(), SERVER_UNAVAILABLE, self.conn_id, text)
            self.outage.attempts = 1
        delay = round(self.backoff.failed(), 1)
        log.emit(self.fleet.failure_level(f"Server unavailable {text}", self.conn_id),
                 "Client {client}: Server unavailable {reason} (is keepalive-server running at {server}? "
                 "retrying in {delay:g} s), conn={conn}", event="server_unavailable", client=self.number,
                 conn=self.conn_id, server=self.fleet.address, reason=text, delay=delay)
        self.schedule(delay)

    def connection_lost(self, protocol: KeepAliveClientProtocol, cause: str, detail: str = "") -> None:
        self.connector = None
        self.protocol_instance = None
        # The client closes on a missing response or garbage too: that close is the loss, named by its reason.
        why = detail if cause == CLOSED_BY_CLIENT else cause
        if why != SHUTDOWN and self.fleet.running:
            self.outage = Outage(self.fleet.clock.seconds(), why, protocol.conn, detail)
        self.fleet.disconnected(protocol, cause, why)
        if self.fleet.running:
            self.schedule(self.backoff.failed())

    def stop(self) -> None:
        """Cancel a pending (re)connect or connection attempt; close an open connection with a FIN."""
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None
        if self.protocol_instance is not None:
            self.protocol_instance.close("shutdown")
        elif self.connector is not None:
            try:
                self.connector.stopConnecting()
            except NotConnectingError:
                pass  # already connected: connectionMade sees the stopped fleet and closes it


@implementer(IReportingService)
class KeepAliveClientService(Service):
    """``clients`` clients spread over ``ramp_up`` seconds against one server, numbered from ``first_client + 1``
    (a ``--processes`` child's share starts there, so every client has one number in the run)."""

    def __init__(self, reactor: Any, host: str, port: int, clients: int, timing: ClientTiming,
                 ramp_up: float = 10.0, reconnect_delay: float = 1.0,
                 tls: IOpenSSLClientConnectionCreator | None = None, rng: random.Random | None = None,
                 run_id: str | None = None, connect_timeout: float = 10.0,
                 results: ResultSettings | None = None, stop: Callable[[], None] | None = None,
                 reconnect_max_delay: float = DEFAULT_MAX_DELAY, first_client: int = 0) -> None:
        """``results``: judge the run, write the report, set the exit status (None: the caller judges).
        ``stop``: ends the process at ``--duration`` (default ``reactor.stop``)."""
        self.reactor = reactor
        self.clock = reactor
        self.host = host
        self.port = port
        self.address = target(host, port)
        self.plan = ClientPlan(timing)
        self.ramp_up = ramp_up
        self.reconnect_delay = reconnect_delay
        self.reconnect_max_delay = reconnect_max_delay
        self.repeats = RepeatedFailures(REPEAT_WINDOW)
        self.tls = tls
        self.rng = rng if rng is not None else random.Random()
        self.run_id = run_id if run_id is not None else secrets.token_hex(3)
        self.connect_timeout = connect_timeout
        self.slots = [ClientSlot(self, number) for number in range(first_client + 1, first_client + clients + 1)]
        self.open = OpenConnections(reactor)
        self.rtt = RttHistogram()
        self.interval_rtt = RttHistogram()
        self.results = results
        self._stop = stop if stop is not None else getattr(reactor, "stop", None)
        self.recorder: RunRecorder | None = None
        self.verdict: Verdict | None = None
        self.worker_result: dict[str, Any] | None = None  # under --processes: the run for the parent to merge
        self._sampler: LoopingCall | None = None
        self._time_up: IDelayedCall | None = None
        self.metrics = MetricSet("keepalive_client")
        self.connect_attempts = self.metrics.counter("connect_attempts_total", "Connection attempts.")
        self.connections = self.metrics.counter("connections_total", "Connections established.")
        self.connect_failures = self.metrics.counter("server_unavailable_total", "Failed connection attempts.")
        self.answered = self.metrics.counter("keepalives_total", "Keep-alive round trips completed.")
        self.dummies = self.metrics.counter("dummies_total", "Dummy echoes received.")
        self.responses_missing = self.metrics.counter("responses_missing_total", "Keep-alive responses not received.")
        self.protocol_errors = self.metrics.counter("protocol_errors_total", "Invalid messages from the server.")
        self.closes = self.metrics.labeled_counter("closes_total", "Closed connections by cause.", "cause")
        self.metrics.gauge("open", "Connections open now.", lambda: len(self.open))
        self.metrics.gauge("clients", "Configured clients.", lambda: len(self.slots))

    def startService(self) -> None:
        super().startService()
        start_line(self.run_id, len(self.slots), self.address, self.tls is not None, self.ramp_up).log()
        for slot in self.slots:
            slot.schedule(self.rng.uniform(0.0, self.ramp_up))
        if self.results is not None:
            self._start_recording()

    def _start_recording(self) -> None:
        assert self.results is not None
        configuration = {"target": self.address, "clients": len(self.slots),
                         "transport": "TLS" if self.tls is not None else "TCP", "run": self.run_id,
                         "keepalive_interval_s": self.plan.timing.keepalive_interval,
                         "response_timeout_s": self.plan.timing.response_timeout, "ramp_up_s": self.ramp_up,
                         "reconnect_delay_s": self.reconnect_delay, "duration_s": self.results.duration}
        self.recorder = RunRecorder("keepalive-client", configuration, self.clock.seconds())
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = self.clock
        self._sampler.start(SAMPLE_INTERVAL, now=False)
        if self.results.duration:
            self._time_up = self.clock.callLater(self.results.duration, self._duration_reached)

    def _duration_reached(self) -> None:
        self._time_up = None
        duration_line(self.run_id, self.results.duration if self.results else 0).log()
        if self._stop is not None:
            self._stop()

    def _sample(self) -> None:
        interval, self.interval_rtt = self.interval_rtt, RttHistogram()
        self.rtt.merge(interval)
        if self.recorder is None:
            return
        p50, p99 = interval.percentile(50), interval.percentile(99)
        self.recorder.sample(self.clock.seconds(), open_connections=len(self.open),
                             rtt_p50_ms=None if p50 is None else round(p50 * 1000, 3),
                             rtt_p99_ms=None if p99 is None else round(p99 * 1000, 3))

    def outage_ended(self, client: int, outage: Outage) -> None:
        """A client number is connected again: its outage is a loss episode."""
        if self.recorder is not None:
            self.recorder.episode(outage.episode(client, self.clock.seconds()))

    def failure_level(self, kind: str, conn: str) -> LogLevel:
        """error for the first failure of a kind in a while; debug for its repeats, counted and said later."""
        full, finished = self.repeats.record(kind, conn, self.clock.seconds())
        if finished is not None:
            self._say_repeats(kind, finished)
        return LogLevel.error if full else LogLevel.debug

    def _say_repeats(self, kind: str, run: Repeats) -> None:
        log.error("Client fleet: {count} more connections failed the same way in the last {seconds:g} s "
                  "({kind}), last conn={conn}", event="failures_repeated", count=run.count, kind=kind,
                  seconds=round(self.clock.seconds() - run.since, 1), conn=run.last_conn)

    def connect(self, slot: ClientSlot) -> IConnector:
        factory: ClientFactory[Any] = slot
        if self.tls is not None:
            factory = TLSMemoryBIOFactory(self.tls, True, slot)
            factory.noisy = False
        return connect_tcp(self.reactor, self.host, self.port, factory, self.connect_timeout)

    def connected(self, protocol: KeepAliveClientProtocol) -> None:
        self.connections.value += 1
        self.open.add(protocol)

    def disconnected(self, protocol: KeepAliveClientProtocol, cause: str, why: str) -> None:
        """A connection closed by ``cause`` (``why``: the reason when we closed it, else the cause)."""
        self.closes.inc(cause)
        self.open.discard(protocol)
        if self.recorder is not None and why != SHUTDOWN:
            self.recorder.mark(self.clock.seconds(), CLOSE, str(protocol.slot.number), cause=why, conn=protocol.conn)

    @property
    def errors(self) -> int:
        """Failures a healthy path never shows: unreachable server, resets, FINs, timeouts, garbage."""
        tally = self.tally()
        return sum(tally.count(name) for name in ERRORS)

    def summary(self) -> dict[str, int | float]:
        return summary_of(self.tally())

    def tally(self) -> Tally:
        """The run so far, as the summary line and a ``--processes`` parent read it."""
        rtt = RttHistogram()
        rtt.merge(self.rtt)
        rtt.merge(self.interval_rtt)
        counts = {"connections": self.connections.value, "keepalives": self.answered.value,
                  "dummies": self.dummies.value, "server_unavailable": self.connect_failures.value,
                  "server_closed": self.closes.get(PEER_CLOSED), "resets": self.closes.get(PEER_RESET),
                  "responses_missing": self.responses_missing.value, TLS_ERROR: self.closes.get(TLS_ERROR),
                  "protocol_errors": self.protocol_errors.value}
        return Tally(counts, {"clients": len(self.slots), "open": len(self.open)}, {"rtt": rtt})

    def worker_report(self, final: bool) -> dict[str, Any]:
        """What a ``--processes`` child adds to its report lines (see ``nettester.supervisor``)."""
        report: dict[str, Any] = {"tally": self.tally().to_dict()}
        if final and self.worker_result is not None:
            report["result"] = self.worker_result
        return report

    def stopService(self) -> Deferred[None]:
        """Stop reconnecting, close every connection with a FIN, fire when they are gone; then judge."""
        super().stopService()
        if self._time_up is not None and self._time_up.active():
            self._time_up.cancel()
        if self._sampler is not None and self._sampler.running:
            self._sampler.stop()
        for slot in self.slots:
            slot.stop()
        for kind, run in self.repeats.flush():
            self._say_repeats(kind, run)
        closed = self.open.when_empty()
        if self.results is not None:
            closed.addCallback(lambda _: self._conclude())
        return closed

    def _conclude(self) -> None:
        """Outages still open are episodes without an end; the verdict, the report, the exit status."""
        assert self.results is not None and self.recorder is not None
        now = self.clock.seconds()
        self._sample()
        for slot in self.slots:
            if slot.outage is not None:
                self.recorder.episode(slot.outage.episode(slot.number, None))
                slot.outage = None
        answered, missing = self.answered.value, self.responses_missing.value
        thresholds = self.results.thresholds
        # Loss: keep-alives without a response. Resets: connections the path or the server ended (RST, FIN,
        # TLS failure) or refused: a healthy path shows none.
        dropped = (self.closes.get(PEER_RESET) + self.closes.get(PEER_CLOSED) + self.closes.get(TLS_ERROR)
                   + self.connect_failures.value)
        self.verdict = verdict = judge(thresholds, answered + missing, missing, answered, dropped)
        status = verdict.exit_status
        if current_worker() is not None:  # one of --processes: the parent judges, logs and reports the whole run
            document = self.recorder.document(now, self.summary(), self.rtt.percentiles_ms(RTT_PERCENTILES),
                                              thresholds, verdict)
            self.worker_result = {"document": document, "judged": [answered + missing, missing, answered, dropped]}
            set_exit_status(self, status)
            return
        log_verdict(self.run_id, verdict)
        if self.results.report:
            rtt = self.rtt.percentiles_ms(RTT_PERCENTILES)
            try:
                write_report(self.results.report, self.recorder.document(now, self.summary(), rtt, thresholds, verdict))
            except ReportError as error:
                log.error("{reason}", event="report_failed", reason=str(error))
                status = 1
        set_exit_status(self, status)
