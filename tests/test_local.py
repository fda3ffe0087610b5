"""``nettester local``: runs scenarios for --duration, judges, sets the exit status."""

from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nettester.interfaces import ILocalScenario
from nettester.local import LocalOptions, LocalService
from nettester.module import Verdict
from nettester.service import exit_status_of
from tests.logcapture import log_events


@implementer(ILocalScenario)
class _Scenario:
    def __init__(self, name: str, passes: bool) -> None:
        self.name = name
        self.service = Service()
        self._passes = passes
        self.judged_while_running: bool | None = None

    def verdict(self) -> Verdict:
        self.judged_while_running = bool(self.service.running)
        return Verdict(self._passes, {"errors": 0 if self._passes else 2})


def _options(*argv: str) -> LocalOptions:
    options = LocalOptions()
    options.parseOptions(list(argv))
    return options


def _run(scenarios: list[_Scenario], seconds: float) -> tuple[MemoryReactorClock, LocalService, list[dict[str, Any]]]:
    with log_events() as seen:
        reactor = MemoryReactorClock()
        service = LocalService(reactor, scenarios, _options("--duration", "5", "--stats-interval", "0"))
        service.startService()
        assert all(s.service.running for s in scenarios)
        reactor.advance(seconds)
    return reactor, service, seen


def test_all_passing_modules_exit_zero_after_duration() -> None:
    scenarios = [_Scenario("a", True), _Scenario("b", True)]
    assert verifyObject(ILocalScenario, scenarios[0])
    reactor, service, seen = _run(scenarios, 5)
    assert reactor.hasStopped
    assert exit_status_of(service) == 0
    assert all(s.judged_while_running is False for s in scenarios)
    verdicts = [e for e in seen if e.get("event") == "local_verdict"]
    assert [(e["module"], e["result"]) for e in verdicts] == [("a", "PASS"), ("b", "PASS")]
    assert any(e.get("event") == "local_result" and e["total"] == 2 for e in seen)


def test_a_failing_module_makes_the_exit_status_one() -> None:
    reactor, service, seen = _run([_Scenario("a", True), _Scenario("b", False)], 5)
    assert exit_status_of(service) == 1
    result = [e for e in seen if e.get("event") == "local_result"][0]
    assert result["failed"] == "b" and result["count"] == 1
    assert [e["evidence"] for e in seen if e.get("event") == "local_verdict"][1] == "errors=2"


def test_nothing_is_judged_before_the_duration() -> None:
    reactor, _, seen = _run([_Scenario("a", True)], 4.9)
    assert not reactor.hasStopped
    assert not [e for e in seen if e.get("event") == "local_verdict"]


def test_interrupt_judges_what_ran() -> None:
    with log_events() as seen:
        reactor = MemoryReactorClock()
        scenario = _Scenario("a", True)
        service = LocalService(reactor, [scenario], _options("--duration", "30", "--stats-interval", "0"))
        service.startService()
        reactor.advance(1)
        service.stopService()
    events = [e.get("event") for e in seen]
    assert "local_interrupted" in events and "local_verdict" in events


def test_unknown_module_is_a_usage_error_naming_installed_ones() -> None:
    with pytest.raises(UsageError, match="--modules: unknown module nosuch; installed:"):
        _options("--modules", "nosuch")
