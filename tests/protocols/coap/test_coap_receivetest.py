"""coap-receivetest: device UUID file, history parsing, a run against the server."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import cbor2
import pytest
import pytest_twisted
from coap_net import SERVER_ADDRESS, Net
from coap_testing import MemoryLink, UdpClock
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from nettester.logs import make_observer, parse_level
from nettester.protocols.coap.client import EXIT_NO_RESPONSE, make_link, parse_uri
from nettester.protocols.coap.message import (
    ACK,
    Code,
    ContentFormat,
    Message,
    decode,
    encode_message,
)
from nettester.protocols.coap.options import CoapReceiveTestOptions
from nettester.protocols.coap.receivetest import (
    HistoryEntry,
    ReceiveTestService,
    attribute,
    device_uuid,
    format_history,
    parse_history,
)
from nettester.protocols.coap.resources.extended import REQUESTS_HISTORY
from nettester.protocols.coap.server import CoapServerService
from nettester.report.options import ResultSettings
from nettester.udplink import UdpLink


def test_device_uuid_is_kept_and_reset(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "uuid")
    first = device_uuid(path, reset=False)
    assert device_uuid(path, reset=False) == first
    assert device_uuid(path, reset=True) != first
    Path(path).write_text("garbage")
    assert len(device_uuid(path, reset=False)) == 36


def test_parse_history_all_formats() -> None:
    text = b"systemstart: 1000\nr2: 1500 [::1]:5683\nr1: 1200"
    assert parse_history(text, 0) == (1000, [HistoryEntry("r2", 1500, "[::1]:5683"), HistoryEntry("r1", 1200, None)])
    document = {"systemstart": 5, "requests": [{"rid": "a", "time": 9, "ep": "1.2.3.4:5"}]}
    expected = (5, [HistoryEntry("a", 9, "1.2.3.4:5")])
    assert parse_history(json.dumps(document).encode(), ContentFormat.JSON) == expected
    assert parse_history(cbor2.dumps(document), ContentFormat.CBOR) == expected
    with pytest.raises(ValueError):
        parse_history(b"hello", 0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.sampled_from([None, 0, ContentFormat.JSON, ContentFormat.CBOR]))
def test_parse_history_fuzz_only_value_error(payload: bytes, content_format: int | None) -> None:
    try:
        parse_history(payload, content_format)
    except ValueError:
        pass


def test_format_history_marks_ours() -> None:
    text = format_history(1, [HistoryEntry("r2", 3000, "h:1"), HistoryEntry("r1", 1000, None)], "r2", 0.0042)
    assert "* rid=r2 at -0.000 s from h:1" in text and "  rid=r1 at -2.000 s" in text
    assert text.endswith("RTT of this request: 4.2 ms")


def test_options(tmp_path: Path) -> None:
    options = CoapReceiveTestOptions()
    options.parseOptions(["--cbor", "--uuid-file", str(tmp_path / "u")])
    assert options["uri"].path == ("requests",) and options["uri"].port == 5783 and options["cbor"]


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_two_runs_accumulate_history(tmp_path: Path) -> Generator[Any, Any, None]:
    server = CoapServerService(reactor, 0, ["127.0.0.1"], plugtest=False)
    server.startService()
    port = next(p for _, _, p, name in server.listening if name == "extended")
    uri = parse_uri(f"coap://127.0.0.1:{port}/requests")
    device = device_uuid(str(tmp_path / "uuid"), reset=False)
    try:
        outputs = []
        for content_format in (ContentFormat.JSON, ContentFormat.CBOR):
            out = io.StringIO()
            run = ReceiveTestService(reactor, uri, device, UdpLink(), out, content_format, timeout=5.0)
            run.startService()
            assert (yield run.done) == 0
            outputs.append(out.getvalue())
        assert "1 requests recorded" in outputs[0] and "2 requests recorded" in outputs[1]
        assert "from 127.0.0.1:" in outputs[1] and "RTT of this request" in outputs[1]
    finally:
        yield server.stopService()


def test_no_answer_ends_after_timeout(tmp_path: Path) -> None:
    clock = UdpClock()
    link = MemoryLink(("198.51.100.1", 40000))
    out = io.StringIO()
    service = ReceiveTestService(clock, parse_uri("coap://192.0.2.1:5783/requests"), "dev-1", link, out, timeout=4.0)
    statuses: list[int] = []
    service.done.addCallback(statuses.append)
    service.startService()
    clock.advance(4.0)
    assert statuses == [EXIT_NO_RESPONSE]
    assert "no answer from 192.0.2.1:5783 within 4.0 s" in out.getvalue()
    assert clock.getDelayedCalls() == []


def test_error_answer_gives_status_1() -> None:
    clock = UdpClock()
    link = MemoryLink(("198.51.100.1", 40000))
    out = io.StringIO()
    service = ReceiveTestService(clock, parse_uri("coap://192.0.2.1:5783/requests"), "dev-1", link, out)
    statuses: list[int] = []
    service.done.addCallback(statuses.append)
    service.startService()
    sent = decode(link.sent[0][0])
    link.receiver.datagramReceived(encode_message(ACK, Code.BAD_OPTION, sent.mid, sent.token, (), b"no dev"),
                                   ("192.0.2.1", 5783))
    assert statuses == [1] and "server answered 4.02 Bad Option: no dev" in out.getvalue()


@pytest.mark.integration
@pytest_twisted.inlineCallbacks
def test_closed_port_fails_at_once() -> Generator[Any, Any, None]:
    probe = reactor.listenUDP(0, UdpLink(), interface="127.0.0.1")
    closed = probe.getHost().port
    yield probe.stopListening()
    uri = parse_uri(f"coap://127.0.0.1:{closed}/requests")
    out = io.StringIO()
    service = ReceiveTestService(reactor, uri, "dev-1", make_link(reactor, uri), out, timeout=30.0)
    service.startService()
    status = yield service.done.addTimeout(5.0, reactor)
    assert status == EXIT_NO_RESPONSE
    assert f"refused the request (ICMP port unreachable): is a CoAP server listening on 127.0.0.1:{closed}?" in (
        out.getvalue())


def rid_is(*rids: str) -> Callable[[Message], bool]:
    """Matches requests for one of ``rids``."""
    return lambda message: any(f"rid={rid}" in message.uri_query for rid in rids)


def history_newest(*rids: str) -> Callable[[Message], bool]:
    """Matches answers whose newest history entry is one of ``rids`` (the answer to that request)."""
    def match(message: Message) -> bool:
        try:
            _, entries = parse_history(message.payload, message.content_format)
        except ValueError:
            return False
        return bool(entries) and entries[0].rid in rids
    return match


def looping(net: Net, duration: float, report: str | None = None, timeout: float = 3.0) -> ReceiveTestService:
    uri = parse_uri(f"coap://{SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]}/requests")
    service = ReceiveTestService(net.clock, uri, "dev-1", net.new_client_link(), io.StringIO(), ContentFormat.JSON,
                                 timeout, ResultSettings(duration=duration, report=report))
    service.startService()
    return service


def test_duration_repeats_and_attributes_each_lost_request(tmp_path: Path) -> None:
    net = Net()
    run = f"r{int(net.clock.seconds() * 1000)}"
    net.drop_forward = rid_is(f"{run}-2")  # never reaches the server
    net.drop_return = history_newest(f"{run}-4")  # reaches it; every answer is lost
    report = str(tmp_path / "receivetest.json")
    service = looping(net, duration=15.0, report=report)
    statuses: list[int] = []
    service.done.addCallback(statuses.append)
    net.run(20.0)
    assert statuses == [1]  # two losses, --max-loss 0
    assert service.sent > 5 and service.failures == 2
    assert service.recorder.loss_fields() == {"lost_forward": 1, "lost_return": 1, "lost_unattributed": 0}
    out = service.stdout.getvalue()  # type: ignore[attr-defined]
    assert f"request rid={run}-2 to 192.0.2.1:5783 failed: timeout" in out
    assert f"{service.sent} requests, {service.sent - 2} answered, 2 failed: lost_forward=1 lost_return=1 " \
           "lost_unattributed=0; RTT ms: p50=" in out
    assert out.splitlines()[-1] == "verdict: FAIL: loss " + f"{200 / service.sent:.2f}% (2 of {service.sent}) " \
           "is above --max-loss 0%"
    document = json.loads(Path(report).read_text())
    assert {episode["key"]: episode["direction"] for episode in document["episodes"]} == {
        f"{run}-2": "forward", f"{run}-4": "return"}
    assert document["role"] == "coap-receivetest" and document["counters"]["failed"] == 2


def test_json_log_format_puts_only_json_lines_on_stdout() -> None:
    """``--log-format json``: the history, the failures, the summary and the verdict are JSON log lines."""
    net = Net()
    run = f"r{int(net.clock.seconds() * 1000)}"
    net.drop_forward = rid_is(f"{run}-2")
    stream = io.StringIO()
    observer = make_observer("json", parse_level("warn"), stream)
    globalLogPublisher.addObserver(observer)
    try:
        uri = parse_uri(f"coap://{SERVER_ADDRESS[0]}:{SERVER_ADDRESS[1]}/requests")
        service = ReceiveTestService(net.clock, uri, "dev-1", net.new_client_link(), io.StringIO(),
                                     ContentFormat.JSON, 3.0, ResultSettings(duration=8.0), json_lines=True)
        service.startService()
        net.run(12.0)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert service.stdout.getvalue() == ""  # type: ignore[attr-defined]
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = [record["event"] for record in records]
    assert events[-1] == "verdict" and records[-1]["passed"] is False
    [failed] = [record for record in records if record["event"] == "coap_receivetest_failed"]
    assert failed["rid"] == f"{run}-2" and failed["reason"] == "timeout"
    [summary] = [record for record in records if record["event"] == "coap_receivetest_summary"]
    assert summary["failed"] == 1 and summary["lost_forward"] == 1 and summary["requests"] == service.sent
    history = next(record for record in records if record["event"] == "coap_receivetest_history")
    assert history["rid"] == f"{run}-{service.sent}" and history["history"][0]["rid"] == history["rid"]


def test_attribute_by_history() -> None:
    def history(*rids: str) -> list[HistoryEntry]:
        return [HistoryEntry(rid, 0, None) for rid in rids]

    assert attribute("r1-3", 3, "r1", history("r1-4", "r1-3", "r1-2")) == "return"
    assert attribute("r1-3", 3, "r1", history("r1-4", "r1-2")) == "forward"
    assert attribute("r1-1", 1, "r1", history("r1-2", "r0")) == "forward"  # an older run's entry is older
    assert attribute("r1-1", 1, "r1", history("r1-2")) == "forward"  # the whole history: nothing pushed out
    full = history(*(f"r1-{n}" for n in range(30, 30 - REQUESTS_HISTORY, -1)))
    assert attribute("r1-3", 3, "r1", full) == "unattributed"  # pushed out by later requests


def test_one_shot_with_a_report_and_no_answer(tmp_path: Path) -> None:
    clock = UdpClock()
    report = str(tmp_path / "one.json")
    service = ReceiveTestService(clock, parse_uri("coap://192.0.2.1:5783/requests"), "dev-1",
                                 MemoryLink(("198.51.100.1", 40000)), io.StringIO(), timeout=4.0,
                                 results=ResultSettings(report=report))
    statuses: list[int] = []
    service.done.addCallback(statuses.append)
    service.startService()
    clock.advance(4.0)
    assert statuses == [EXIT_NO_RESPONSE]
    document = json.loads(Path(report).read_text())
    assert document["verdict"]["reasons"] == ["no responses: all 1 requests were lost"]


@pytest.mark.parametrize(("argv", "home", "path"), [
    (["--uuid-file", "/proc/nope/uuid"], None, "/proc/nope/uuid"),
    ([], "/proc/nope", "/proc/nope/.nettester/coap-receivetest.uuid"),  # a read-only HOME
])
def test_an_unwritable_uuid_file_is_a_warning_and_the_run_goes_on(argv: list[str], home: str | None,
                                                                   path: str) -> None:
    """As a user meets it (issue 16): no FileNotFoundError, a warning naming --uuid-file, the usual result."""
    import os
    import subprocess
    import sys

    from tests.loopback import free_ports

    (closed,) = free_ports()
    environment = dict(os.environ, **({"HOME": home} if home else {}))
    result = subprocess.run(
        [sys.executable, "-m", "nettester", "coap-receivetest", f"coap://127.0.0.1:{closed}/requests", *argv],
        cwd=Path(__file__).resolve().parents[3], env=environment, capture_output=True, text=True, timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_NO_RESPONSE, output
    (warning,) = [line for line in output.splitlines() if "[warn]" in line]
    assert warning.split("[warn] ")[1].startswith(f"Cannot keep the device UUID in {path} (")
    assert warning.endswith("for this run only, so its history starts afresh; choose a writable --uuid-file")
    assert "refused the request (ICMP port unreachable)" in output and "Traceback" not in output
