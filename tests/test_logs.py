"""Log observers: the human line shape, flat JSON, and the level threshold."""

import io
import json
import time

import pytest
from twisted.logger import LogLevel, LogPublisher, globalLogPublisher

from nettester import logs


def _event(level: LogLevel = LogLevel.error, **fields: object) -> dict:
    event = {
        "log_format": "Keep alive request not received {peer}, conn={conn}",
        "log_level": level,
        "log_namespace": "nettester.protocols.keepalive.server",
        "log_time": 1700000000.25,
        "event": "keepalive_missing",
        "peer": "127.0.0.1:40000",
        "conn": "c-1",
    }
    event.update(fields)
    return event


def test_human_line_has_milliseconds_level_and_message() -> None:
    out = io.StringIO()
    logs.HumanObserver(out, localtime=time.gmtime)(_event())
    assert out.getvalue() == "22:13:20.250 [error] Keep alive request not received 127.0.0.1:40000, conn=c-1\n"


def test_json_line_is_flat_with_fixed_keys_first() -> None:
    out = io.StringIO()
    logs.JsonObserver(out)(_event())
    record = json.loads(out.getvalue())
    assert list(record)[:5] == ["ts", "level", "module", "event", "msg"]
    assert record["ts"] == "2023-11-14T22:13:20.250Z"
    assert record["level"] == "error"
    assert record["module"] == "keepalive"
    assert record["event"] == "keepalive_missing"
    assert record["peer"] == "127.0.0.1:40000" and record["conn"] == "c-1"
    assert not any(key.startswith("log_") for key in record)


def test_json_serialises_unknown_values_as_text() -> None:
    out = io.StringIO()
    logs.JsonObserver(out)(_event(addr=("::1", 5)))
    assert json.loads(out.getvalue())["addr"] == ["::1", 5]


def test_filtering_observer_drops_lines_below_the_level() -> None:
    out = io.StringIO()
    observer = logs.make_observer("text", LogLevel.warn, out)
    try:
        observer(_event(LogLevel.info))
        observer(_event(LogLevel.warn))
    finally:
        logs.set_level(LogLevel.info)
    assert out.getvalue().count("\n") == 1 and "[warn]" in out.getvalue()


def test_logger_skips_events_below_threshold_before_building_them() -> None:
    seen: list[dict] = []
    publisher = LogPublisher(seen.append)
    log = logs.Logger(observer=publisher)
    logs.set_level(LogLevel.warn)
    try:
        log.info("hidden {x}", x=1)
        log.warn("shown {x}", x=2)
        assert not logs.is_enabled(LogLevel.info)
    finally:
        logs.set_level(LogLevel.info)
    assert [event["x"] for event in seen] == [2]


@pytest.mark.parametrize("name", ["debug", "INFO", "warn", "warning", "error", "critical"])
def test_parse_level_accepts_the_documented_names(name: str) -> None:
    assert logs.parse_level(name) in set(logs.LEVEL_NAMES.values())


def test_parse_level_rejects_unknown_names_with_the_list() -> None:
    with pytest.raises(ValueError, match="use one of debug, info, warn, error, critical"):
        logs.parse_level("verbose")


def test_summary_lines_are_shown_at_every_level() -> None:
    out = io.StringIO()
    observer = logs.make_observer("json", LogLevel.error, out)
    seen: list[dict] = []
    log = logs.Logger(observer=LogPublisher(seen.append, observer))
    try:
        log.info("stun-client summary: {text}", event="summary", text="clients=1", **{logs.ALWAYS: True})
        log.info("hidden", event="other")
    finally:
        logs.set_level(LogLevel.info)
    assert len(seen) == 1
    record = json.loads(out.getvalue())
    assert record["event"] == "summary" and record["level"] == "info"
    assert logs.ALWAYS not in record


def test_twisted_port_open_and_close_lines_are_debug_detail() -> None:
    from twisted.python import log as legacy_log

    out = io.StringIO()
    observer = logs.make_observer("text", LogLevel.info, out)
    wrapped = lambda event: observer(event)  # noqa: E731
    globalLogPublisher.addObserver(wrapped)
    try:
        legacy_log.msg("(UDP Port 4242 Closed)")
        legacy_log.msg("StunDatagramProtocol starting on 4242")
        legacy_log.msg("something else happened")
    finally:
        globalLogPublisher.removeObserver(wrapped)
    assert out.getvalue().count("\n") == 1 and "something else happened" in out.getvalue()
    debug_out = io.StringIO()
    debug_observer = logs.make_observer("text", LogLevel.debug, debug_out)
    try:
        debug_observer({"message": ("(UDP Port 4242 Closed)",), "log_level": LogLevel.info, "log_format": "{log_text}",
                        "log_text": "(UDP Port 4242 Closed)", "log_time": 1.0, "log_namespace": "log_legacy"})
    finally:
        logs.set_level(LogLevel.info)
    assert "UDP Port 4242 Closed" in debug_out.getvalue()
