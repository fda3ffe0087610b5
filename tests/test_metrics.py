"""Counters, Prometheus exposition and the summary reporter."""

from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted

from prometheus_client.exposition import generate_latest
from twisted.internet.task import Clock
from twisted.logger import LogPublisher, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from tests.logcapture import log_events
from nettester.metrics import MetricSet, MetricsResource, SummaryReporter, format_summary, new_registry


def _metric_set() -> MetricSet:
    metrics = MetricSet("keepalive-server")
    metrics.counter("connections_total", "Connections accepted.").inc(3)
    closes = metrics.labeled_counter("closes_total", "Connections closed, by cause.", "cause")
    closes.inc("peer_reset")
    closes.inc("peer_closed", 2)
    metrics.gauge("open_connections", "Connections open now.", lambda: 5)
    return metrics


def test_exposition_names_values_and_labels() -> None:
    text = generate_latest(new_registry(_metric_set())).decode()
    assert "nettester_keepalive_server_connections_total 3.0" in text
    assert 'nettester_keepalive_server_closes_total{cause="peer_closed"} 2.0' in text
    assert 'nettester_keepalive_server_closes_total{cause="peer_reset"} 1.0' in text
    assert "nettester_keepalive_server_open_connections 5.0" in text


def test_metrics_resource_serves_text_exposition() -> None:
    request = DummyRequest([b""])
    body = MetricsResource(new_registry(_metric_set())).render_GET(request)
    assert b"nettester_keepalive_server_connections_total 3.0" in body
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")


def test_labeled_counter_total() -> None:
    metrics = _metric_set()
    closes = [m for m in metrics._metrics if m.name == "closes_total"][0]
    assert closes.total == 3 and closes.get("timeout") == 0


def test_reporter_prints_every_interval_and_a_final_summary() -> None:
    with log_events() as seen:
        clock = Clock()
        counter = {"n": 0}
        reporter = SummaryReporter(clock, "demo-role", lambda: {"clients": 2, "errors": counter["n"]}, 10.0)
        reporter.startService()
        clock.advance(10)
        counter["n"] = 1
        clock.advance(10)
        reporter.stopService()
        clock.advance(30)
    summaries = [e for e in seen if e.get("event") in ("summary", "final_summary")]
    assert [e["text"] for e in summaries] == ["clients=2 errors=0", "clients=2 errors=1", "clients=2 errors=1"]
    assert summaries[-1]["event"] == "final_summary" and summaries[-1]["label"] == "final summary"
    assert summaries[0]["errors"] == 0 and summaries[0]["role"] == "demo-role"


def test_zero_interval_prints_only_the_final_summary() -> None:
    seen: list[dict] = []
    publisher = LogPublisher(seen.append)
    globalLogPublisher.addObserver(publisher)
    clock = Clock()
    reporter = SummaryReporter(clock, "demo", lambda: {"x": 1}, 0)
    try:
        reporter.startService()
        clock.advance(100)
        reporter.stopService()
    finally:
        globalLogPublisher.removeObserver(publisher)
    assert [e["event"] for e in seen if "event" in e] == ["final_summary"]


def test_format_summary_keeps_order() -> None:
    assert format_summary({"b": 1, "a": "x"}) == "b=1 a=x"


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_metrics_port_serves_prometheus_text_on_loopback() -> Generator[Any, Any, None]:
    import treq
    from twisted.internet import reactor

    from nettester.metrics import metrics_http_service

    service = metrics_http_service(0, new_registry(_metric_set()), "127.0.0.1")
    service.startService()
    try:
        port = service._port.getHost().port
        response = yield treq.get(f"http://127.0.0.1:{port}/metrics").addTimeout(10, reactor)
        body = yield treq.content(response)
    finally:
        yield service.stopService()
    assert response.code == 200
    assert b"nettester_keepalive_server_connections_total 3.0" in body
