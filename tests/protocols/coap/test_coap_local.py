"""The CoAP part of ``nettester local`` on loopback."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from zope.interface.verify import verifyObject

from nettester.interfaces import ILocalScenario, IReportingService
from nettester.protocols.coap.local import CoapLocalScenario
from tests.loopback import wait_until


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_local_scenario_passes_in_a_second() -> Generator[Any, Any, None]:
    scenario = CoapLocalScenario(reactor)
    verifyObject(ILocalScenario, scenario)
    verifyObject(IReportingService, scenario.service)
    scenario.service.startService()
    yield wait_until(lambda: scenario.verdict().evidence["bench_responses"] >= 20 * 5, timeout=10.0)
    yield scenario.service.stopService()
    verdict = scenario.verdict()
    assert verdict.passed, verdict.evidence
    assert verdict.evidence["bench_responses"] >= 20 * 5
    assert "requests in" in scenario.service.bench_output.getvalue()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_local_scenario_runs_coap_over_tcp_too() -> Generator[Any, Any, None]:
    scenario = CoapLocalScenario(reactor)
    scenario.service.startService()
    yield wait_until(lambda: scenario.verdict().evidence["tcp_bench_responses"] >= 4 * 5, timeout=10.0)
    yield scenario.service.stopService()
    verdict = scenario.verdict()
    assert verdict.passed, verdict.evidence
    assert verdict.evidence["tcp_bench_responses"] >= 4 * 5 and verdict.evidence["tcp_bench_failures"] == 0
    assert "(coap+tcp, reliable GET /benchmark?rlen=40" in scenario.service.bench_output.getvalue()
