"""``nettester local``: every installed module's server and a small client fleet on loopback.

Each module contributes an :class:`ILocalScenario`. All run together for
``--duration`` seconds; then they are stopped, their final summaries printed,
and each module's verdict logged. The exit status is 0 only when every module
passed, so the command doubles as a smoke test of an installation.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, ClassVar

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.usage import UsageError

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.logs import Logger
from nettester.metrics import format_summary
from nettester.module import ProtocolModule, Role, discover_modules
from nettester.options import RoleOptions, positive_float
from nettester.service import exit_status_of, metrics_endpoint, set_exit_status, with_reporting

log = Logger()


class LocalOptions(RoleOptions):
    """Options of ``nettester local``."""

    # The summaries and verdicts are the output; each connection's lines are debug detail.
    connection_lines_at_debug = True

    optParameters: ClassVar[list[list[Any]]] = [
        ["duration", None, 30.0, "Seconds to run before judging.", positive_float],
        ["modules", None, "", "Comma-separated module names to run (default: every installed module)."],
    ]

    def postOptions(self) -> None:
        available = [module.name for module in discover_modules() if module.name != "local"]
        wanted = [name.strip() for name in self["modules"].split(",") if name.strip()]
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise UsageError(f"--modules: unknown module {', '.join(unknown)}; installed: {', '.join(available)}")
        self["modules"] = wanted or available


class LocalService(Service):
    """Runs the scenarios for a fixed time, then judges them and stops the reactor."""

    def __init__(self, reactor: Any, scenarios: list[ILocalScenario], options: RoleOptions) -> None:
        self._reactor = reactor
        self._scenarios = scenarios
        self._duration = options["duration"]
        # One --metrics-port for the whole run, serving every module's metrics.
        self._running: list[Service] = [
            with_reporting(s.service, s.name, options, reactor, metrics=False) for s in scenarios]
        if options["metrics-port"]:
            metric_sets = [s.service.metrics for s in scenarios if IReportingService.providedBy(s.service)]
            self._running.insert(0, metrics_endpoint(reactor, options, *metric_sets))
        for service in self._running:
            # Started and stopped by hand (in order), but part of the tree, so an
            # exit status recorded by a scenario reaches the root.
            service.parent = self
        self._timer: IDelayedCall | None = None
        self._finished: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        log.info(
            "local: running {modules} on loopback for {duration:g} s",
            event="local_start",
            modules=", ".join(s.name for s in self._scenarios),
            duration=self._duration,
        )
        for service in self._running:
            service.startService()
        self._timer = self._reactor.callLater(self._duration, self._finish_and_stop)

    def _finish_and_stop(self) -> None:
        self._timer = None
        self.finish().addBoth(lambda _: self._reactor.stop())

    def finish(self) -> Deferred[None]:
        """Stop every scenario, then log the verdicts (once)."""
        if self._finished is None:
            self._finished = self._stop_and_judge()
        return self._finished

    @inlineCallbacks
    def _stop_and_judge(self) -> Generator[Any, Any, None]:
        for service in reversed(self._running):
            yield maybeDeferred(service.stopService)
        failed = []
        for scenario in self._scenarios:
            verdict = scenario.verdict()
            emit = log.info if verdict.passed else log.error
            emit(
                "local verdict {module}: {result} {evidence}",
                event="local_verdict",
                module=scenario.name,
                result="PASS" if verdict.passed else "FAIL",
                evidence=format_summary(verdict.evidence),
                passed=verdict.passed,
            )
            if not verdict.passed:
                failed.append(scenario.name)
        # A port that could not be opened (--metrics-port) has already made the run fail.
        set_exit_status(self, 1 if failed or exit_status_of(self) else 0)
        if failed:
            log.error(
                "local: {count} of {total} modules failed: {failed}",
                event="local_result",
                count=len(failed),
                total=len(self._scenarios),
                failed=", ".join(failed),
            )
        else:
            log.info("local: all {total} modules passed", event="local_result", total=len(self._scenarios))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None
            log.warn("local: interrupted before --duration ended; judging what ran", event="local_interrupted")
        return self.finish()


def make_local_service(reactor: Any, options: RoleOptions) -> IService:
    """Build the scenarios of the selected modules."""
    scenarios = []
    for module in discover_modules():
        if module.name in options["modules"]:
            scenario = module.local_scenario(reactor, options)
            if scenario is not None:
                scenarios.append(scenario)
    return LocalService(reactor, scenarios, options)


local_role = Role(
    name="local",
    summary="Run every module's server and a client fleet on loopback, then print each verdict.",
    options=LocalOptions,
    factory=make_local_service,
)


local = ProtocolModule(
    name="local",
    summary="Every module's loopback scenario at once: the installation's smoke test.",
    roles=(local_role,),
)
