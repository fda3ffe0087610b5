"""The processes of ``--workers`` / ``--processes`` (see ``nettester.workers``): parent and child sides.

Parent (``SupervisorService``): spawns server workers one after the other
(each once the previous one is listening, so every reuseport group orders
their sockets the same way) and load-generator processes together, reads their JSON report lines from descriptor
3, is the role's reporting service (merged summary and ``/metrics``),
restarts a worker that dies after it started, and on stop sends every child
SIGTERM and waits for it (SIGKILL after ``STOP_TIMEOUT``). It also keeps the
kernel's order of each reuseport group (``steering.ReuseportSlots``) and
tells every worker the CID steering program's slots whenever they change.

Child (``WorkerChildService``): runs the role as usual, but instead of
summary lines and a metrics port it writes a report line every
``REPORT_INTERVAL`` and a final one on stop; it reads slot updates on its
standard input and stops when that closes (the parent is gone). Children run in their own
process group: a terminal's Ctrl-C is the parent's to handle. A server
worker reports ready once its role says every socket is open
(``when_listening()``, when the role has it: a cluster node may resolve
names first), so the next worker binds after it and every reuseport group
keeps one order. A server role with ``join_workers(context)`` gets the
worker's ``workers.WorkerContext``: values shared with its siblings, and
other steering programs for some of its sockets (a cluster node's
management port, ``steering.management_program``).

Shared values: a server worker's ``{"share": {key: value}}`` line goes, as
``{"shared": {key: value}}``, to every other worker; the parent keeps the
last value of each key and sends them all as the first line a worker reads
(``{"shared": {...}}``, empty at first), so a worker started later, or
again, begins from its siblings' state (a cluster node's table of nodes,
``nettester.cluster.siblings``).

Report lines (child -> parent), one JSON object each::

    {"ready": true, "pid": 123}
    {"summary": {...}, "metrics": [[name, type, help, [[sample, labels, value], ...]], ...], "final": false}
    {"share": {key: value}}

A load generator's report lines also carry its tally (``"tally"``,
``nettester.tally.Tally.to_dict``: counts, levels, RTT histograms, requests
per client) and, in the final one, its ``"result"``: the report document it
would have written and its ``"judged"`` counts ``[sent, lost, answered,
resets]``. The parent hands them to the role's ``MergedRun``
(``nettester.interfaces``), which prints the lines one process prints,
merged (the start line before any child starts, so it comes first), and
writes the merged ``--report``. The children print only their lines about
single clients and transactions, straight to the shared stdout.

Command lines (parent -> child): ``{"slots": [slot of worker 0, ...]}``,
``{"shared": {key: value, ...}}``, and ``{"report": N}``, asking for a
report line now, which answers with ``"answer": N``: before each periodic
line the parent asks every child, so the line merges counts taken at the
same moment, not up to ``REPORT_INTERVAL`` old (it waits at most
``REFRESH_TIMEOUT``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import abstract, base, defer, fdesc
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import alsoProvides

from nettester import steering
from nettester.interfaces import IReportingService, MergedRun
from nettester.logs import Logger
from nettester.metrics import MetricSet
from nettester.options import RoleOptions
from nettester.tally import Tally
from nettester.workers import (
    COOKIE_SECRET_ENV,
    REPORT_FD,
    RUN_ENV,
    WORKER_ENV,
    ProcessesOptionsMixin,
    WorkerContext,
    WorkersOptionsMixin,
    _MultiProcessOptions,
    current_worker,
    merge_exit_statuses,
    merge_metric_families,
    merge_summaries,
    metric_families,
    prometheus_families,
    report_line,
)

log = Logger()

REPORT_INTERVAL = 1.0  # seconds between a child's report lines
RESTART_DELAY = 0.5  # seconds before a dead worker is started again
STOP_TIMEOUT = 30.0  # seconds a child gets to stop after SIGTERM before SIGKILL
REFRESH_TIMEOUT = 1.0  # seconds a periodic line waits for the children's fresh reports
GO_TIMEOUT = 10.0  # seconds a load generator's processes wait for their siblings to be ready, then start anyway

ExitStatusSetter = Callable[[Any, int], None]  # nettester.service.set_exit_status

# ``python -c CHILD_MAIN <role> <arguments>``: ``python -m nettester`` in a
# process group of its own, so a terminal's Ctrl-C (sent to the foreground
# group) reaches only the parent, which stops the children with SIGTERM.
CHILD_MAIN = "import os, runpy; os.setpgid(0, 0); runpy.run_module('nettester', run_name='__main__')"


def multiprocess_service(role: Any, options: RoleOptions, reactor: Any, set_exit_status: ExitStatusSetter) -> Any:
    """The supervisor (a parent of N > 1), the worker wrapper (a child), or None (one process, as before)."""
    if not isinstance(options, _MultiProcessOptions):
        return None
    worker = current_worker()
    is_server = isinstance(options, WorkersOptionsMixin)
    if worker is not None:
        if is_server:
            install_reuseport()
        return WorkerChildService(role.makeService(reactor, options), reactor, worker=worker if is_server else None)
    if options.process_count() <= 1:
        return None
    output = options.merged_run() if isinstance(options, ProcessesOptionsMixin) else None
    return SupervisorService(reactor, role.name, options.role_argv, options.process_count(), is_server,
                             options.live_fields, set_exit_status, output=output,
                             agreed_fields=options.agreed_fields)


# -- child side ---------------------------------------------------------------------------------------------

# Every reuseport UDP socket of this process -> the program its group is steered with.
_reuseport_udp: weakref.WeakKeyDictionary[socket.socket, steering.ProgramFactory] = weakref.WeakKeyDictionary()


def install_reuseport() -> None:
    """Every listening port this process opens on a fixed port number gets SO_REUSEPORT.

    ``BasePort.createInternetSocket`` is the one place every Twisted port
    passes through before ``bind`` (``udp.Port``, ``tcp.Port`` and the
    project's ``DrainingPort`` and ``LeanPort``), so no listen helper needs to
    know about workers. Ports on port 0 (clients' sockets) are left alone.
    """
    original = base.BasePort.createInternetSocket
    if getattr(original, "reuseport", False):
        return

    def createInternetSocket(port: Any) -> socket.socket:
        sock = original(port)
        if getattr(port, "port", 0) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if sock.type == socket.SOCK_DGRAM:
                _reuseport_udp[sock] = steering.program
        return sock

    createInternetSocket.reuseport = True  # type: ignore[attr-defined]
    base.BasePort.createInternetSocket = createInternetSocket  # type: ignore[method-assign, assignment]


def steer(slots: Sequence[int]) -> int:
    """Attach each open reuseport UDP socket's steering program for ``slots``; how many took it."""
    return sum(_attach(sock, factory, slots) for sock, factory in list(_reuseport_udp.items()))


def steer_with(sock: socket.socket, factory: steering.ProgramFactory, slots: Sequence[int] | None) -> None:
    """Steer the group of ``sock`` with ``factory(slots)`` from now on (at once when ``slots`` are known)."""
    _reuseport_udp[sock] = factory
    if slots is not None:
        _attach(sock, factory, slots)


def _attach(sock: socket.socket, factory: steering.ProgramFactory, slots: Sequence[int]) -> bool:
    if sock.fileno() < 0:
        return False
    try:
        steering.attach(sock, factory(slots))
    except OSError as error:
        log.warn("CID steering not attached to {where}: {error}; records then follow the 4-tuple hash",
                 event="steering_failed", where=sock.getsockname(), error=error)
        return False
    return True


class _ParentChannel(abstract.FileDescriptor):
    """Standard input of a worker: slot updates from the parent; its end means the parent is gone."""

    def __init__(self, reactor: Any, received: Callable[[dict[str, Any]], None], lost: Callable[[], None]) -> None:
        super().__init__(reactor)
        self._received = received
        self._lost = lost
        self._buffer = b""
        fdesc.setNonBlocking(0)

    def fileno(self) -> int:
        return 0

    def doRead(self) -> Any:
        return fdesc.readFromFD(0, self._data)

    def _data(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.warn("worker: unreadable line from the parent ignored: {line!r}", event="worker_bad_command",
                         line=line[:80])
                continue
            self._received(message)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._lost()


class WorkerChildService(MultiService):
    """The role in a worker process: reports to the parent instead of printing summaries.

    ``worker``: ``(index, count)`` of a server worker, whose role may join the
    workers (``join_workers``, see the module docstring); None for a load
    generator, whose role starts only when the parent says ``go``: once every
    process is ready, so the processes load the server together, not each
    from when its interpreter happened to be up (start-ups differ by up to a
    second on a loaded machine, which counted in the run's rate).
    """

    def __init__(self, role_service: Any, reactor: Any, report_fd: int = REPORT_FD,
                 worker: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.role_service = role_service
        self._reactor = reactor
        self._report_fd = report_fd
        self._loop = LoopingCall(self.report)
        self._loop.clock = reactor
        self._channel: _ParentChannel | None = None
        self._slots: list[int] | None = None
        self.context: WorkerContext | None = None
        self._server = worker is not None
        self._role_started = self._server  # a load generator's, on the parent's "go"
        role_service.setServiceParent(self)
        join = getattr(role_service, "join_workers", None)
        if worker is not None and join is not None:
            self.context = WorkerContext(*worker, publish=self._share,
                                         steer_with=lambda sock, factory: steer_with(sock, factory, self._slots))
            join(self.context)

    def startService(self) -> None:
        if self._server:
            super().startService()
        else:  # a load generator's role starts on the parent's "go", with its siblings'
            Service.startService(self)
        self._reactor.addSystemEventTrigger("after", "startup", self._started)

    def _started(self) -> None:
        self._channel = _ParentChannel(self._reactor, self._command, self._parent_gone)
        self._channel.startReading()
        when_listening = getattr(self.role_service, "when_listening", None)
        listening = when_listening() if when_listening is not None else defer.succeed(None)
        listening.addCallback(self._listening)

    def _listening(self, _: object) -> None:
        if not self.running:
            return  # stopped before its sockets were open: it never was a listening worker
        self._write({"ready": True, "pid": os.getpid()})
        if self._server:
            self._loop.start(REPORT_INTERVAL, now=True)

    def _go(self) -> None:
        """The parent says every process of the load generator is ready: start the load now, all together."""
        if self.running and not self._role_started:
            self._role_started = True
            self.role_service.startService()
            self._loop.start(REPORT_INTERVAL, now=True)

    def _command(self, message: dict[str, Any]) -> None:
        slots = message.get("slots")
        if isinstance(slots, list):
            self._slots = [int(slot) for slot in slots]
            steer(self._slots)
        shared = message.get("shared")
        if isinstance(shared, dict) and self.context is not None:
            self.context.shared_received(shared)
        asked = message.get("report")
        if isinstance(asked, int) and self._role_started:
            self.report(answer=asked)
        if message.get("go") is True:
            self._go()

    def _share(self, key: str, value: Any) -> None:
        self._write({"share": {key: value}})

    def _parent_gone(self) -> None:
        if self.running:
            log.warn("worker: the parent process is gone; stopping", event="worker_orphaned")
            self._reactor.stop()

    def report(self, final: bool = False, answer: int | None = None) -> None:
        """One report line; ``answer``: the number of the parent's request it answers."""
        service = self.role_service
        message: dict[str, Any] = {"summary": {}, "metrics": [], "final": final}
        if answer is not None:
            message["answer"] = answer
        if IReportingService.providedBy(service):
            message["summary"] = dict(service.summary())
            message["metrics"] = metric_families(service.metrics)
        worker_report = getattr(service, "worker_report", None)
        if worker_report is not None:  # a load generator's tally, its final result
            message.update(worker_report(final))
        self._write(message)

    def _write(self, message: dict[str, Any]) -> None:
        if not report_line(message, self._report_fd):  # the parent is gone: nobody to report to
            log.debug("worker report not written: the parent's end of descriptor {fd} is closed",
                      event="worker_report_failed", fd=self._report_fd)

    def stopService(self) -> defer.Deferred[None]:
        if self._loop.running:
            self._loop.stop()
        if self._channel is not None:
            self._channel.stopReading()
        if not self._role_started:  # stopped before the parent's "go": it ran nothing to report
            Service.stopService(self)
            return defer.succeed(None)
        stopping = defer.maybeDeferred(super().stopService)
        stopping.addBoth(lambda result: self.report(final=True))
        return stopping


# -- parent side --------------------------------------------------------------------------------------------


class _Child(ProcessProtocol):
    """One running child: its report lines in, its end out."""

    def __init__(self, supervisor: SupervisorService, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.summary: dict[str, Any] = {}
        self.metrics: list[Any] = []
        self.tally: Tally | None = None  # a load generator's last
        self.result: dict[str, Any] | None = None  # a load generator's final: report document, judge inputs
        self._buffer = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.pid = transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != REPORT_FD:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.warn("worker {index} (pid {pid}): unreadable report line ignored", event="worker_bad_report",
                         index=self.index, pid=self.pid)
                continue
            self.supervisor.reported(self, message)

    def send(self, message: dict[str, Any]) -> None:
        transport: Any = self.transport
        try:
            transport.writeToChild(0, (json.dumps(message) + "\n").encode())
        except (OSError, KeyError):  # its stdin already closed: it is ending
            pass

    def signal(self, name: str) -> None:
        transport: Any = self.transport
        try:
            transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.ended(self, reason)


class _MergedMetrics(MetricSet):
    """The parent's metrics: its own counters plus the workers' families summed (see ``merge_metric_families``)."""

    def __init__(self, prefix: str, supervisor: SupervisorService) -> None:
        super().__init__(prefix)
        self._supervisor = supervisor

    def collect(self) -> Any:
        yield from super().collect()
        yield from prometheus_families(self._supervisor.merged_metrics())


class SupervisorService(Service):
    """The parent of N children of one role (see the module docstring).

    It provides ``IReportingService`` (summary lines, ``/metrics``) for
    servers and for the load generators whose single process prints summary
    lines; a load generator's lines are its ``MergedRun``'s.
    """

    def __init__(self, reactor: Any, role: str, argv: Sequence[str], count: int, is_server: bool,
                 live_fields: frozenset[str], set_exit_status: ExitStatusSetter,
                 executable: Sequence[str] = (sys.executable, "-c", CHILD_MAIN),
                 output: MergedRun | None = None, agreed_fields: frozenset[str] = frozenset()) -> None:
        """``output``: what a load generator's parent prints for the whole run (its options' ``merged_run()``);
        the children print none of those lines and write no report. ``agreed_fields``: summary fields every
        server worker reports alike (``workers.merge_summaries``)."""
        self._reactor = reactor
        self.role = role
        self.argv = list(argv)
        self.count = count
        self.is_server = is_server
        self.kind, self.kinds = ("worker", "workers") if is_server else ("process", "processes")
        # A server's workers are news; a load generator's processes are how it runs: its start line names them.
        self._lifecycle = LogLevel.info if is_server else LogLevel.debug
        self.live_fields = live_fields
        self.agreed_fields = agreed_fields
        #: The last value of each key the server workers share (see the module docstring).
        self.shared: dict[str, Any] = {}
        self._set_exit_status = set_exit_status
        self._executable = list(executable)
        self.children: dict[int, _Child] = {}
        self.retired: list[_Child] = []  # dead children, with their last reports
        self._output = output
        self._concluded = False
        self.exit_statuses: dict[int, int] = {}
        self.slots = steering.ReuseportSlots()
        self.cookie_secret = os.urandom(32).hex()
        self.metrics = _MergedMetrics("workers", self)
        self.restarts = self.metrics.counter("restarts", "worker processes started again after they died")
        self.metrics.gauge("live", "worker processes running", lambda: len(self.children))
        if is_server or output is None or output.summary_lines:
            alsoProvides(self, IReportingService)
        self._stopping = False
        self._stopped: defer.Deferred[None] = defer.Deferred()
        self._kill_call: Any = None
        self._asked = 0  # report requests sent (see refresh_summary)
        self._refreshes: dict[int, tuple[set[int], defer.Deferred[bool]]] = {}
        self._first_progress: Any = None  # the IDelayedCall starting the progress lines, then:
        self._progress: LoopingCall | None = None
        self._duration_call: Any = None
        self._go_call: Any = None
        self._going = False  # a load generator's processes were told to start
        self._over = False  # --duration, the conclusion or a stop: no more periodic lines (see _end_of_run)

    # -- starting

    def startService(self) -> None:
        super().startService()
        log.emit(self._lifecycle, "starting {count} {kinds} of {role}", event="workers_starting", count=self.count,
                 kinds=self.kinds, role=self.role)
        if self._output is not None:
            self._output.start(self.count)
        if not self.is_server:
            self._go_call = self._reactor.callLater(GO_TIMEOUT, self._go)
        # Server workers start one by one (the reuseport order, see the module
        # docstring); load generators all at once, so they run side by side.
        for index in range(1 if self.is_server else self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env[WORKER_ENV] = f"{index}/{self.count}"
        if self.is_server:
            env[COOKIE_SECRET_ENV] = self.cookie_secret
        if self._output is not None:
            env[RUN_ENV] = self._output.run_id
        child = _Child(self, index)
        self.children[index] = child
        args = [*self._executable, self.role, *self.argv]
        self._reactor.spawnProcess(child, args[0], args, env=env, childFDs={0: "w", 1: 1, 2: 2, REPORT_FD: "r"})
        if self.is_server:
            child.send({"shared": dict(self.shared)})  # the first line it reads, before any update

    def _spawn_next(self) -> None:
        """The next server worker, once the one before it is listening (load generators start all at once)."""
        waiting = [index for index in range(self.count) if index not in self.children]
        starting = [child for child in self.children.values() if not child.ready]
        if waiting and not starting and self.running:
            self._spawn(waiting[0])

    # -- reports

    def reported(self, child: _Child, message: dict[str, Any]) -> None:
        if message.get("ready"):
            child.ready = True
            log.emit(self._lifecycle, "{kind} {index} (pid {pid}) started", event="worker_started", kind=self.kind,
                     index=child.index, pid=child.pid)
            if self.is_server:
                self.slots.bound(child.index)
                self._broadcast_slots()
                self._spawn_next()
            elif self._going:  # a process started again, or one later than GO_TIMEOUT: it joins the run
                child.send({"go": True})
            else:
                self._go_when_ready()
            return
        if isinstance(message.get("share"), dict) and self.is_server:
            self._relay(child, message["share"])
            return
        if isinstance(message.get("summary"), dict):
            child.summary = message["summary"]
            child.metrics = message.get("metrics") or []
            log.debug("{kind} {index} (pid {pid}) reports: {summary}", event="worker_report", kind=self.kind,
                      index=child.index, pid=child.pid, worker_summary=child.summary,
                      summary=" ".join(f"{key}={value}" for key, value in child.summary.items()))
            if isinstance(message.get("tally"), dict):
                try:
                    child.tally = Tally.from_dict(message["tally"])
                except ValueError as error:
                    log.warn("{kind} {index} (pid {pid}): its tally is unreadable ({error}); its last one stays",
                             event="worker_bad_report", kind=self.kind, index=child.index, pid=child.pid,
                             error=str(error))
            result = message.get("result")
            if isinstance(result, dict) and isinstance(result.get("document"), dict) \
                    and isinstance(result.get("judged"), list) and len(result["judged"]) == 4:
                child.result = result
            if isinstance(message.get("answer"), int):
                self._answered(child.index, message["answer"])

    def _relay(self, sender: _Child, values: dict[str, Any]) -> None:
        """Keep what a worker shares and pass it on to every other worker."""
        self.shared.update(values)
        for child in self.children.values():
            if child is not sender:
                child.send({"shared": values})

    def _broadcast_slots(self) -> None:
        slots = self.slots.slots(self.count)
        for child in self.children.values():
            if child.ready:
                child.send({"slots": slots})

    def refresh_summary(self) -> defer.Deferred[bool]:
        """Ask every running child for a report now; fires True once all answered or ended, or after
        ``REFRESH_TIMEOUT`` (then with the last reports of those that did not answer); False at once when
        the run is over, so no periodic line comes after its ``--duration`` line (the final one will)."""
        done: defer.Deferred[bool] = defer.Deferred()
        waiting = {index for index, child in self.children.items() if child.ready}
        if self._over or not waiting:
            done.callback(not self._over)
            return done
        self._asked += 1
        token = self._asked
        self._refreshes[token] = (waiting, done)
        done.addTimeout(REFRESH_TIMEOUT, self._reactor, onTimeoutCancel=lambda result, timeout: True)
        done.addBoth(self._refreshed, token)
        for index in waiting:
            self.children[index].send({"report": token})
        return done

    def _refreshed(self, result: Any, token: int) -> Any:
        self._refreshes.pop(token, None)
        return result

    def _answered(self, index: int, token: int | None = None) -> None:
        """Child ``index`` answered request ``token`` (None: it ended, so it answers none)."""
        for asked, (waiting, done) in list(self._refreshes.items()):
            if token is None or asked == token:
                waiting.discard(index)
                if not waiting and not done.called:
                    done.callback(True)

    def _go_when_ready(self) -> None:
        if self.children and all(child.ready for child in self.children.values()):
            self._go()

    def _go(self) -> None:
        """Every load-generator process is ready (or ``GO_TIMEOUT`` passed): all start their load now; the run's
        ``--duration`` and progress lines count from here."""
        if self._going or not self.running:
            return
        self._going = True
        if self._go_call is not None and self._go_call.active():
            self._go_call.cancel()
        for child in self.children.values():
            if child.ready:
                child.send({"go": True})
        if self._output is not None and self._output.duration:
            self._duration_call = self._reactor.callLater(self._output.duration, self._duration_over)
        self._start_progress()

    def _start_progress(self) -> None:
        """A load generator's own progress lines begin once its processes run (as one process's do)."""
        output = self._output
        if output is None or not output.progress_interval or self._progress is not None or self._over:
            return
        self._progress = LoopingCall(self._progress_line)
        self._progress.clock = self._reactor
        self._first_progress = self._reactor.callLater(output.first_progress, self._progress.start,
                                                       output.progress_interval, True)

    def _end_of_run(self) -> None:
        """The run is over (its ``--duration``, its conclusion, a stop): no more periodic lines."""
        self._over = True
        for call in (self._first_progress, self._duration_call, self._go_call):
            if call is not None and call.active():
                call.cancel()
        if self._progress is not None and self._progress.running:
            self._progress.stop()

    def _duration_over(self) -> None:
        """The children stop by themselves now: one process would print its ``--duration`` line and no more
        progress lines."""
        self._end_of_run()
        assert self._output is not None
        self._output.duration_over()

    def _progress_line(self) -> None:
        now = self._reactor.seconds()
        self.refresh_summary().addCallback(self._print_progress, now)

    def _print_progress(self, fresh: bool, now: float) -> None:
        if fresh and self._output is not None and self.running:
            self._output.progress(self.tally(), now)

    # -- ends

    def ended(self, child: _Child, reason: Failure) -> None:
        del self.children[child.index]
        self.retired.append(child)
        self._answered(child.index)
        if self.is_server:
            self.slots.closed(child.index)
        code = getattr(reason.value, "exitCode", None)
        how = "exited" if isinstance(reason.value, ProcessDone) or code is not None else "ended"
        text = f"status {code}" if code is not None else f"signal {getattr(reason.value, 'signal', '?')}"
        log.emit(self._lifecycle, "{kind} {index} (pid {pid}) {how} ({text}), its final summary: {summary}",
                 event="worker_ended", kind=self.kind, index=child.index, pid=child.pid, how=how, text=text,
                 summary=" ".join(f"{key}={value}" for key, value in child.summary.items()),
                 worker_summary=child.summary)
        if self._stopping:
            if not self.children:
                if not self.is_server:
                    self._conclude(list(self.exit_statuses.values()))
                self._finish_stop()
            return
        if self.is_server:
            self._server_child_ended(child, text)
        else:
            self._generator_child_ended(child, code, text)
        if self.is_server:
            self._broadcast_slots()

    def _server_child_ended(self, child: _Child, text: str) -> None:
        if not child.ready:
            log.error("{kind} {index} of {role} stopped before it was listening ({text}): see its lines above "
                      "(a port in use? bad options?); stopping every worker", event="worker_start_failed",
                      kind=self.kind, index=child.index, role=self.role, text=text)
            self._set_exit_status(self, 1)
            self._reactor.callLater(0, self._reactor.stop)
            return
        log.warn("{kind} {index} (pid {pid}) died ({text}); starting it again", event="worker_restarting",
                 kind=self.kind, index=child.index, pid=child.pid, text=text)
        self.restarts.inc()
        self._reactor.callLater(RESTART_DELAY, self._restart, child.index)

    def _restart(self, index: int) -> None:
        if self.running and not self._stopping and index not in self.children:
            self._spawn(index)

    def _generator_child_ended(self, child: _Child, code: int | None, text: str) -> None:
        if code is None:  # killed: its clients start again in a new process
            log.warn("{kind} {index} (pid {pid}) died ({text}); starting it again", event="worker_restarting",
                     kind=self.kind, index=child.index, pid=child.pid, text=text)
            self.restarts.inc()
            self._reactor.callLater(RESTART_DELAY, self._restart, child.index)
            return
        self.exit_statuses[child.index] = code
        self._go_when_ready()  # one that ended before it was ready holds the others back no more
        if len(self.exit_statuses) == self.count:
            self._conclude(list(self.exit_statuses.values()))
            self._reactor.callLater(0, self._reactor.stop)

    def _conclude(self, statuses: list[int]) -> None:
        """The load generators' merged final lines, verdict and report (the role's ``MergedRun``), exit status.

        Processes that ended without a result (killed) add only their counters.
        """
        if self._concluded:
            return
        self._concluded = True
        self._end_of_run()
        results = [child.result for child in self.retired if child.result is not None]
        if not results or self._output is None:
            if statuses:
                self._set_exit_status(self, merge_exit_statuses(statuses))
            return
        self._set_exit_status(self, self._output.conclude(self.tally(), results, statuses))

    # -- stopping

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        self._end_of_run()
        if not self.children:
            self._finish_stop()
            return self._stopped
        for child in list(self.children.values()):
            child.signal("TERM")
        self._kill_call = self._reactor.callLater(STOP_TIMEOUT, self._kill_all)
        return self._stopped

    def _kill_all(self) -> None:
        self._kill_call = None
        for child in list(self.children.values()):
            log.warn("{kind} {index} (pid {pid}) did not stop within {timeout:g} s; killing it",
                     event="worker_killed", kind=self.kind, index=child.index, pid=child.pid, timeout=STOP_TIMEOUT)
            child.signal("KILL")

    def _finish_stop(self) -> None:
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if not self._stopped.called:
            self._stopped.callback(None)

    # -- merged views

    def tally(self) -> Tally:
        """The whole run's tally: every child's last one, dead ones' included; levels from the newest of each."""
        newest: dict[int, _Child] = {child.index: child for child in self.retired}
        newest.update(self.children)
        return Tally.merge((child.tally for child in [*self.retired, *self.children.values()] if child.tally),
                           (child.tally for child in newest.values() if child.tally))

    def summary(self) -> dict[str, Any]:
        """A load generator's: its own summary fields (``MergedRun.summary``); a server's: the workers' merged,
        with how many run and how many were restarted."""
        if self._output is not None:
            return self._output.summary(self.tally())
        live = [child.summary for child in self.children.values()]
        merged = merge_summaries([child.summary for child in self.retired] + live, live, self.live_fields,
                                 agreed_fields=self.agreed_fields)
        # while running: how many run now; once stopping, the final summary names how many there were
        merged[self.kinds] = len(self.children) if self.running else self.count
        merged["restarts"] = self.restarts.value
        return merged

    def merged_metrics(self) -> list[Any]:
        live = [child.metrics for child in self.children.values()]
        return merge_metric_families([child.metrics for child in self.retired] + live, live)
