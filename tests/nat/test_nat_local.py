"""The NAT's part of ``nettester local``: a short real run on loopback, and its verdict."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.nat.local import NatLocalScenario
from nettester.plugins.nat import nat
from tests.loopback import wait_until

pytestmark = pytest.mark.integration


@pytest_twisted.inlineCallbacks
def test_short_local_run_passes_and_a_wrong_answer_fails_it() -> Generator[Any, Any, None]:
    scenario = NatLocalScenario(reactor, duration=0.6)
    assert verifyObject(ILocalScenario, scenario)
    assert IReportingService.providedBy(scenario.service) and scenario.service.metrics is not None
    scenario.service.startService()
    yield wait_until(lambda: scenario.verdict().evidence["sent"] >= 24
                     and scenario.verdict().evidence["rebalance"].startswith("reassigned "), timeout=10.0)
    yield scenario.service.stopService()
    verdict = scenario.verdict()
    assert verdict.passed, verdict.evidence
    assert verdict.evidence["sent"] >= 24 and verdict.evidence["rebalance"].startswith("reassigned ")
    scenario.service.clients[0].wrong = 1
    assert not scenario.verdict().passed


def test_the_module_offers_its_local_scenario() -> None:
    class Options(dict[str, Any]):
        pass

    scenario = nat.local_scenario(reactor, Options(duration=5.0))
    assert isinstance(scenario, NatLocalScenario)
