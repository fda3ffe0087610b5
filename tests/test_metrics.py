"""Counters, Prometheus exposition and the summary reporter."""

import subprocess
from collections.abc import Generator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import LogPublisher, globalLogPublisher
from twisted.web.test.requesthelper import DummyRequest

from nettester.metrics import LABEL_VALUES, MetricSet, MetricsResource, SummaryReporter, format_summary, new_registry
from tests.interop.peers import installed
from tests.logcapture import log_events
from tests.scrape import ROLES, ROOT, scrape_every_role


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


# --- every long-running role, scraped for real ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def scraped() -> dict[str, dict[str, Any]]:
    return scrape_every_role()




@pytest.mark.parametrize("role", ROLES)
def test_the_exposition_parses_and_passes_promtool(scraped: dict[str, dict[str, Any]], role: str) -> None:
    text = scraped[role]["metrics"]
    families = list(text_string_to_metric_families(text))
    assert any(family.name.startswith("nettester_") for family in families)
    promtool = installed("promtool", "Debian's prometheus package; .ci/install.d/60-deploy.sh")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("role", ROLES)
def test_every_count_is_a_counter_and_labels_start_at_zero(scraped: dict[str, dict[str, Any]], role: str) -> None:
    families = {family.name: family for family in text_string_to_metric_families(scraped[role]["metrics"])}
    for family in families.values():
        if family.type == "counter":
            assert all(sample.name.endswith(("_total", "_created")) for sample in family.samples), family.name
        for key, values in LABEL_VALUES.items():
            if family.name == f"nettester_{key}":
                seen = {value for sample in family.samples for value in sample.labels.values()}
                assert set(values) <= seen, (family.name, set(values) - seen)
    gauges = {name for name, family in families.items() if family.type == "gauge" and name.startswith("nettester_")}
    counted = ("received", "sent", "duplicates", "retransmissions", "malformed", "evicted", "violations", "forwarded",
               "errors", "requests", "responses", "dropped")
    assert not {name for name in gauges if name.endswith(counted)}, "a count exported as a gauge"
    assert 'nettester_build_info{version="' in scraped[role]["metrics"]
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert name in families, name


@pytest.mark.parametrize("role", ROLES)
def test_no_log_line_per_scrape_and_ready_answers(scraped: dict[str, dict[str, Any]], role: str) -> None:
    assert scraped[role]["ready"] == 200
    assert "GET /metrics" not in scraped[role]["log"] and "GET /ready" not in scraped[role]["log"]


# Summary keys that are no metric: derived values (percentiles, percentages, sums) and identities.
DERIVED_SUMMARY_KEYS = frozenset((
    "loss_pct", "rtt_p50_ms", "rtt_p99_ms", "rtt_avg_ms", "rtt_max_ms", "timer_lag_p99_ms", "errors", "node_id",
    "nodes", "sent",
))


# keepalive-client's summary keeps the original tool's words for two close causes
# (``closes_total{cause=...}`` has the cause names the logs use, as on the server).
SUMMARY_ALIASES = {"server_closed": "peer_closed", "resets": "peer_reset"}


@pytest.mark.parametrize("role", ROLES)
def test_summary_keys_are_the_metric_names_without_the_prefix(scraped: dict[str, dict[str, Any]], role: str) -> None:
    families = {family.name: family for family in text_string_to_metric_families(scraped[role]["metrics"])}
    label_values = {value for family in families.values() for sample in family.samples
                    for value in sample.labels.values()}
    prefix = "nettester_" + role.replace("-", "_") + "_"
    keys = [pair.split("=", 1)[0] for pair in scraped[role]["summary"].split()]
    assert keys, scraped[role]["log"][-2000:]
    keys = [SUMMARY_ALIASES.get(key, key) for key in keys]
    # a labelled family's samples appear as <family>_<label value> (lost_forward= for lost_total{direction="forward"})
    labelled = {family.name.removeprefix(prefix) + "_" + value for family in families.values()
                for sample in family.samples for value in sample.labels.values()}
    unnamed = [key for key in keys if key not in DERIVED_SUMMARY_KEYS and key not in label_values
               and key not in labelled and prefix + key not in families and "nettester_" + key not in families]
    assert not unnamed, f"{role}: summary keys without a metric of that name: {unnamed}"


def test_documented_label_values_are_used_in_the_code() -> None:
    source = "\n".join(path.read_text() for path in (ROOT / "nettester").rglob("*.py") if path.name != "metrics.py")
    for key, values in LABEL_VALUES.items():
        for value in values:
            assert f'"{value}"' in source or f" {value}," in source, (key, value)


def test_round_trip_times_are_a_histogram_in_seconds(scraped: dict[str, dict[str, Any]]) -> None:
    families = {family.name: family for family in text_string_to_metric_families(scraped["stun-client"]["metrics"])}
    rtt = families["nettester_stun_client_rtt_seconds"]
    assert rtt.type == "histogram"
    buckets = {sample.labels["le"]: sample.value for sample in rtt.samples if sample.name.endswith("_bucket")}
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative
    assert buckets["+Inf"] == families["nettester_stun_client_responses"].samples[0].value


def test_fine_delay_buckets_fold_into_bounds_that_never_overcount() -> None:
    from nettester.metrics import histogram_family

    class Fine:
        def buckets(self) -> list[tuple[float, int]]:
            return [(0.0004, 2), (0.0011, 3), (0.0009, 1), (30.0, 1)]

    family = histogram_family("x_seconds", "x", Fine(), bounds=(0.001, 0.01))
    assert [(sample.labels["le"], sample.value) for sample in family.samples] == [
        ("0.001", 3), ("0.01", 6), ("+Inf", 7)]
