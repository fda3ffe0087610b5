"""The ``stun-client`` role: the Twisted adapter driving a ``ClientFleet``.

Each client owns one connected UDP socket (its own NAT mapping). The fleet
is a ``DatagramCore`` run by the shared ``nettester.pump.CorePump``: one
``IDelayedCall``, re-armed at the fleet's ``get_timer()``, drives the
fleet's timer wheel (at most one wake-up per 10 ms tick, so 10,000 clients
cost 100 wake-ups a second, not 10,000 drifting timers). Events from the
fleet become socket actions and the original tool's log lines; at the end
the run is judged (``--max-loss``) and, with ``--report``, written as JSON.
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.protocols.stun.counters import FleetCounters
from nettester.protocols.stun.fleet import (
    AT_STOP,
    FORWARD,
    RETURN,
    UNATTRIBUTED,
    AttributionInvalid,
    ClientFleet,
    ConsecutiveFailures,
    ErrorResponse,
    FleetConfig,
    FleetEvent,
    LossResolved,
    MappingChanged,
    OpenSocket,
    RequestUnanswered,
    UnexpectedResponse,
)
from nettester.protocols.stun.message import Address, format_transaction_id
from nettester.protocols.stun.runlines import duration_line, log_open_at_stop, log_verdict, start_line, summary_of
from nettester.pump import CorePump
from nettester.reactor import DatagramSocket
from nettester.report import (
    MAPPING_CHANGE,
    LossEpisode,
    ReportError,
    RunRecorder,
    Thresholds,
    Verdict,
    judge,
    write_report,
)
from nettester.service import set_exit_status
from nettester.tally import Tally
from nettester.workers import current_worker

log = Logger()

def format_mapped(mapped: Address | None) -> str:
    """``ip:port`` of the last known mapping, ``:`` when none is known yet (the original's form)."""
    return ":" if mapped is None else str(mapped)


class ClientSocket(DatagramSocket):
    """One client's connected UDP socket, read by the reactor directly.

    Lighter than a ``udp.Port`` (10,000 of them stay within the memory
    budget) and silent: no log line per socket opened or closed.
    """

    __slots__ = ("_service", "_index")

    MAX_READS = 16  # a bounded batch per wake-up keeps one chatty socket from starving the others

    def __init__(self, service: StunClientService, index: int, local: str, server: tuple[str, int]) -> None:
        super().__init__(socket.AF_INET6 if ":" in server[0] else socket.AF_INET, local)
        try:
            self.socket.connect(server)
        except OSError:
            self.socket.close()
            raise
        self._service = service
        self._index = index

    @property
    def local_port(self) -> int:
        return int(self.socket.getsockname()[1])

    def logPrefix(self) -> str:
        return "stun-client"

    def datagram_received(self, datagram: bytes, source: Any) -> None:
        self._service.received(self._index, datagram)

    def read_failed(self, error: OSError) -> bool:
        if isinstance(error, ConnectionRefusedError):  # ICMP port unreachable, reported on this socket
            self._service.refused(self._index)
        else:
            self._service.socket_error(self._index, error, "receive on")
        return False

    def write(self, data: bytes) -> None:
        try:
            self.socket.send(data)
        except ConnectionRefusedError:
            self._service.refused(self._index)
        except OSError as error:
            self._service.socket_error(self._index, error, "send on")


# Time-series points for the report's plots: one every this many seconds.
SAMPLE_INTERVAL = 10.0
RTT_PERCENTILES = (50.0, 90.0, 99.0)  # the report's rtt_ms


@implementer(IReportingService)
class StunClientService(Service):
    """Runs ``config.clients`` testers against ``server``:``port``.

    ``server_port`` may be changed until the service starts (``nettester local``
    learns its server's port only then). ``duration`` > 0 stops the reactor
    after that many seconds; at stop the run is judged by ``thresholds``
    (None: not judged, for an embedding service) and written to ``report``.
    ``first_client``: the number of client 0 in the lines (a ``--processes``
    child's share starts there, so every client has one number in the run).
    """

    def __init__(
        self,
        reactor: Any,
        server: str,
        port: int,
        config: FleetConfig,
        local_address: str = "",
        rng: random.Random | None = None,
        duration: float = 0.0,
        report: str | None = None,
        thresholds: Thresholds | None = None,
        configuration: Mapping[str, Any] | None = None,
        first_client: int = 0,
    ) -> None:
        self._reactor = reactor
        self.first_client = first_client
        self._open_at_stop = 0
        self._duration = duration
        self._report_path = report
        self._thresholds = thresholds
        self._configuration = dict(configuration or {})
        self.recorder: RunRecorder | None = None
        self.verdict: Verdict | None = None
        self.worker_result: dict[str, Any] | None = None  # under --processes: the run for the parent to merge
        self._invalid_logged = False
        self._next_sample = 0.0
        self._server = server
        self.server_port = port
        self._config = config
        self._local = local_address
        self._rng = rng or random.SystemRandom()
        self.metrics = MetricSet("stun_client")
        self.counters = FleetCounters(self.metrics)
        self.refused_count = self.metrics.counter("refused", "ICMP port unreachable reports (server not listening)")
        self.socket_errors = self.metrics.counter(
            "socket_errors", "Failed socket opens, sends and receives (a send without a socket included)"
        )
        self.metrics.gauge("clients", "Clients started", lambda: self.fleet.started if self.fleet else 0)
        self.metrics.histogram("rtt_seconds", "Binding round-trip times",
                               lambda: self.fleet.rtt if self.fleet else None)
        self.fleet: ClientFleet | None = None
        self._server_ip: str | None = None
        self._ports: list[ClientSocket | None] = []
        self._pump: CorePump | None = None
        self._stopper: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        now = self._reactor.seconds()
        self.recorder = RunRecorder("stun-client", self._configuration, now)
        self._next_sample = now + SAMPLE_INTERVAL
        if self._duration > 0:
            self._stopper = self._reactor.callLater(self._duration, self._duration_over)
        try:
            ipaddress.ip_address(self._server)
        except ValueError:
            self._reactor.resolve(self._server).addCallbacks(self._start, self._unresolved)
        else:
            self._start(self._server)

    def _unresolved(self, failure: Failure) -> None:
        log.critical(
            "Cannot resolve STUN server {server}: {reason}; check --server / STUN_SERVER_IP",
            event="resolve_failed",
            server=self._server,
            reason=failure.getErrorMessage(),
        )
        set_exit_status(self, 1)
        self._reactor.stop()

    def _start(self, server_ip: str) -> None:
        if not self.running:
            return
        self._server_ip = server_ip
        if not self._local and ":" in server_ip:
            self._local = "::"
        now = self._reactor.seconds()
        self._ports = [None] * self._config.clients
        self.fleet = ClientFleet(self._config, self.counters, now, self._rng)
        # Events first: an OpenSocket makes the socket the client's next request is written to.
        self._pump = CorePump(self._reactor, self.fleet, self._write, self._dispatch, events_first=True,
                              after_timer=self._sample)
        config = self._config
        start_line(config.clients, str(Address(server_ip, self.server_port)), config.interval, config.start_delay,
                   config.rfc_retransmit).log()
        self._pump.run_timer()

    def _duration_over(self) -> None:
        self._stopper = None
        duration_line(self._duration).log()
        self._reactor.stop()

    def _sample(self, now: float) -> None:
        """After each timer run: one point of the report's time series every ``SAMPLE_INTERVAL``."""
        fleet = self.fleet
        assert fleet is not None
        if now >= self._next_sample and self.recorder is not None:
            self._next_sample = now + SAMPLE_INTERVAL
            self.recorder.sample(
                now,
                rtt_p50_ms=fleet.rtt.field("rtt_p50_ms"),
                rtt_p99_ms=fleet.rtt.field("rtt_p99_ms"),
                loss_pct=round(fleet.loss_percent(), 3),
            )

    def received(self, index: int, datagram: bytes) -> None:
        """A datagram on client ``index``'s socket."""
        if self._pump is not None:
            self._pump.receive(datagram, index)

    def refused(self, index: int) -> None:
        """ICMP port unreachable on client ``index``'s socket: nobody listens at the server address."""
        self.refused_count.value += 1
        if self.refused_count.value == 1:
            log.error(
                "Client {client}: STUN server {server} refused (ICMP port unreachable): is stun-server running there?",
                event="server_refused",
                client=self.number(index),
                server=str(Address(self._server_ip or self._server, self.server_port)),
            )

    def _dispatch(self, event: FleetEvent) -> None:
        """The pump's dispatcher: socket actions, then findings to log."""
        if type(event) is OpenSocket:
            self._open(event)
        else:
            self._report(event)

    def _write(self, data: bytes, index: int) -> None:
        """The pump's writer: on client ``index``'s socket (counted as a socket error when it has none)."""
        port = self._ports[index]
        if port is None:
            self.socket_errors.value += 1
        else:
            port.write(data)

    def number(self, index: int) -> int:
        """Client ``index``'s number in the lines: one number per client in the whole run."""
        return self.first_client + index

    def local_port(self, index: int) -> int | None:
        """The local UDP port client ``index`` currently sends from (None before it starts)."""
        port = self._ports[index] if index < len(self._ports) else None
        return port.local_port if port is not None else None

    def socket_error(self, index: int, error: OSError, action: str) -> None:
        """Opening, sending on or receiving on client ``index``'s socket failed (no route, ENOBUFS...).

        The first failure is logged as an error (usually a wrong address or a
        missing route, the same for every client); the others are counted.
        """
        self.socket_errors.value += 1
        if self.socket_errors.value == 1:
            log.error(
                "Client {client}: cannot {action} a UDP socket to {server}: {reason}; "
                "further socket errors are only counted (socket_errors in the summary)",
                event="socket_error",
                client=self.number(index),
                action=action,
                server=str(Address(self._server_ip or self._server, self.server_port)),
                reason=str(error),
            )

    def _open(self, event: OpenSocket) -> None:
        self._close(event.client)
        assert self._server_ip is not None
        try:
            port = ClientSocket(self, event.client, self._local, (self._server_ip, self.server_port))
        except OSError as error:
            self.socket_error(event.client, error, "open")
            return
        self._ports[event.client] = port
        self._reactor.addReader(port)
        if event.reason != "start":
            log.info(
                "Client {client}: new UDP socket, local port {local_port} ({reason})",
                event="socket_reopened",
                client=self.number(event.client),
                local_port=port.local_port,
                reason=event.reason,
            )

    def _close(self, index: int) -> None:
        port = self._ports[index]
        if port is not None:
            self._reactor.removeReader(port)
            port.close()
            self._ports[index] = None

    def _report(self, event: FleetEvent) -> None:
        """Log one finding with the original tool's wording."""
        if type(event) is RequestUnanswered:
            log.warn(
                'Client {client}: Failed to receive STUN response for TrID "{trid}", mapped addr: {mapped}',
                event="response_missing",
                client=self.number(event.client),
                trid=format_transaction_id(event.transaction_id),
                mapped=format_mapped(event.mapped),
                consecutive=event.consecutive,
                sent=event.sent,
            )
        elif type(event) is ConsecutiveFailures:
            log.error(
                'Client {client}: Failed to receive {count} consecutive STUN response for TrID "{trid}", '
                "mapped addr: {mapped}",
                event="consecutive_failures",
                client=self.number(event.client),
                count=event.count,
                trid=format_transaction_id(event.transaction_id),
                mapped=format_mapped(event.mapped),
            )
        elif type(event) is UnexpectedResponse:
            log.warn(
                'Client {client}: Received STUN response with unexpected TrID "{trid}"',
                event="unexpected_response",
                client=self.number(event.client),
                trid=format_transaction_id(event.transaction_id),
            )
        elif type(event) is LossResolved:
            self._loss_resolved(event)
        elif type(event) is AttributionInvalid:
            if not self._invalid_logged:
                self._invalid_logged = True
                log.warn(
                    'Client {client}: TrID "{trid}": ignoring an invalid NETTESTER-RECEIVED attribute ({reason}); '
                    "further ones are only counted (attribution_invalid in the summary)",
                    event="attribution_invalid",
                    client=self.number(event.client),
                    trid=format_transaction_id(event.transaction_id),
                    reason=event.reason,
                )
        elif type(event) is MappingChanged:
            log.warn(
                "Client {client}: mapped address changed from {old} to {new}",
                event="mapping_changed",
                client=self.number(event.client),
                old=str(event.old),
                new=str(event.new),
            )
            if self.recorder is not None:
                self.recorder.mark(self._reactor.seconds(), MAPPING_CHANGE, str(self.number(event.client)),
                                   old=str(event.old), new=str(event.new))
        elif type(event) is ErrorResponse:
            log.warn(
                'Client {client}: STUN error response {code} {reason} for TrID "{trid}"',
                event="error_response",
                client=self.number(event.client),
                code=event.code,
                reason=event.reason,
                trid=format_transaction_id(event.transaction_id),
            )

    def _loss_resolved(self, event: LossResolved) -> None:
        """One line per resolved loss episode (those still open at stop are summed up in one line)."""
        trid = format_transaction_id(event.transaction_id)
        lost = event.sent - event.answered
        fields = {
            "client": self.number(event.client),
            "trid": trid,
            "sent": event.sent,
            "lost": lost,
            "reached": event.reached,
            "answered": bool(event.answered),
            "mapped": format_mapped(event.mapped),
            "directions": ",".join(event.directions),
        }
        if event.reached is None:
            if event.reason != AT_STOP:
                log.warn(
                    'Client {client}: TrID "{trid}": direction unknown for {lost} lost requests: {reason}, '
                    "mapped addr: {mapped}",
                    event="loss_unattributed",
                    reason=event.reason,
                    **fields,
                )
        elif event.lost_forward and event.lost_return:
            log.warn(
                'Client {client}: TrID "{trid}": {lost_return} of {lost} requests reached the server; their '
                "responses were lost on the way back, the other {lost_forward} were lost on the way out, "
                "mapped addr: {mapped}",
                event="loss_attributed",
                lost_return=event.lost_return,
                lost_forward=event.lost_forward,
                **fields,
            )
        elif event.lost_return:
            log.warn(
                'Client {client}: TrID "{trid}": {lost_return} of {lost} requests reached the server; their '
                "responses were lost on the way back, mapped addr: {mapped}",
                event="loss_attributed",
                lost_return=event.lost_return,
                lost_forward=0,
                **fields,
            )
        else:
            log.warn(
                'Client {client}: TrID "{trid}": 0 of {lost} requests reached the server; they were lost on the '
                "way out, mapped addr: {mapped}",
                event="loss_attributed",
                lost_return=0,
                lost_forward=event.lost_forward,
                **fields,
            )
        if self.recorder is None:
            return
        end = None if event.reason == AT_STOP else event.end
        detail = {"mapped": format_mapped(event.mapped), "answered": bool(event.answered)}
        if event.reason:
            detail["reason"] = event.reason
        counts = {FORWARD: event.lost_forward, RETURN: event.lost_return, UNATTRIBUTED: lost}
        for direction in event.directions:
            self.recorder.episode(
                LossEpisode(str(self.number(event.client)), trid, event.start, end, direction, counts[direction],
                            event.reached, detail)
            )

    def summary(self) -> dict[str, int | float]:
        return summary_of(self.tally())

    def tally(self) -> Tally:
        """The run so far, as the summary line and a ``--processes`` parent read it."""
        counters, fleet = self.counters, self.fleet
        counts = {name: metric.value for name, metric in (
            ("requests", counters.requests), ("responses", counters.responses),
            ("error_responses", counters.error_responses), ("timeouts", counters.timeouts),
            ("consecutive_failure_errors", counters.failures), ("mapping_changes", counters.mapping_changes),
            ("unexpected", counters.unexpected), ("refused", self.refused_count),
            ("socket_errors", self.socket_errors), ("attribution_invalid", counters.attribution_invalid))}
        for direction in (FORWARD, RETURN, UNATTRIBUTED):
            counts[f"lost_{direction}"] = counters.lost.get(direction)
        counts["open_at_stop"] = self._open_at_stop
        histograms = {"rtt": fleet.rtt, "timer_lag": fleet.timer_lag} if fleet is not None else {}
        return Tally(counts, {"clients": fleet.started if fleet else 0}, histograms)

    def worker_report(self, final: bool) -> dict[str, Any]:
        """What a ``--processes`` child adds to its report lines (see ``nettester.supervisor``)."""
        report: dict[str, Any] = {"tally": self.tally().to_dict()}
        if final and self.worker_result is not None:
            report["result"] = self.worker_result
        return report

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._pump is not None:
            self._pump.stop()
        if self._stopper is not None and self._stopper.active():
            self._stopper.cancel()
        self._stopper = None
        for index in range(len(self._ports)):
            self._close(index)
        if self.fleet is not None:
            self._end_run()
        return succeed(None)

    def _end_run(self) -> None:
        """Episodes still open are unattributed; judge the run, write the report."""
        fleet = self.fleet
        assert fleet is not None and self.recorder is not None
        now = self._reactor.seconds()
        still_open = fleet.close(now)
        while (event := fleet.next_event()) is not None:
            self._report(event)
        self._open_at_stop = still_open
        worker = current_worker() is not None  # one of --processes: the parent judges, logs and reports the whole run
        if still_open and not worker:
            log_open_at_stop(still_open)
        if self._thresholds is None:
            return
        counters = self.counters
        ended = counters.responses.value + counters.error_responses.value + counters.timeouts.value
        self.verdict = verdict = judge(
            self._thresholds, sent=ended, lost=counters.timeouts.value, answered=counters.responses.value,
            refused=self.refused_count.value,
        )
        document = self.recorder.document(now, self.summary(), fleet.rtt.percentiles_ms(RTT_PERCENTILES),
                                          self._thresholds, verdict)
        if worker:
            self.worker_result = {"document": document, "judged": [ended, counters.timeouts.value,
                                                                   counters.responses.value, None]}
            set_exit_status(self, verdict.exit_status)
            return
        if self._report_path:
            try:
                write_report(self._report_path, document)
            except ReportError as error:
                log.error("{error}", event="report_failed", error=str(error))
                set_exit_status(self, 1)
                return
        log_verdict(verdict)
        set_exit_status(self, verdict.exit_status)
