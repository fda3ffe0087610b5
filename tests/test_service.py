"""Listening the same way in every role: the metrics endpoint, a port that cannot be opened."""

from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent

from nettester.metrics import MetricSet
from nettester.options import RoleOptions
from nettester.service import exit_status_of, host_port, listen_failed, metrics_endpoint
from tests.logcapture import log_events


def _options(*argv: str) -> RoleOptions:
    options = RoleOptions()
    options.parseOptions(list(argv))
    return options


class _BusyReactor(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_the_metrics_endpoint_says_where_it_serves() -> None:
    reactor = MemoryReactorClock()
    endpoint = metrics_endpoint(reactor, _options("--metrics-port", "9100", "--metrics-interface", "127.0.0.1"),
                                MetricSet("demo"))
    with log_events() as events:
        endpoint.startService()
    (port, factory, _, interface) = reactor.tcpServers[0]
    assert (port, interface) == (9100, "127.0.0.1")
    host = endpoint.listening.getHost().host  # what the (fake) socket reports
    assert [formatEvent(e) for e in events if e.get("event") == "metrics_listening"] == [
        f"metrics on http://{host}:9100/metrics"]
    endpoint.stopService()


def test_a_metrics_port_in_use_is_one_line_naming_the_option_and_exit_status_1() -> None:
    reactor = _BusyReactor()
    endpoint = metrics_endpoint(reactor, _options("--metrics-port", "9100"), MetricSet("demo"))
    with log_events() as events:
        endpoint.startService()
    (failed,) = [e for e in events if e.get("event") == "listen_failed"]
    assert formatEvent(failed) == (
        "cannot listen on *:9100 (--metrics-port): Address already in use; choose another --metrics-port")
    assert failed["log_level"].name == "critical"
    assert exit_status_of(endpoint) == 1 and endpoint.failed
    assert [call for call, _, _ in reactor.whenRunningHooks] == [reactor.stop]
    endpoint.stopService()


def test_listen_failed_writes_ipv6_addresses_in_brackets() -> None:
    reactor = MemoryReactorClock()
    with log_events() as events:
        listen_failed(_Root(), reactor, "::1", 5683, "--port", OSError(13, "Permission denied"))
    assert formatEvent(events[0]) == "cannot listen on [::1]:5683 (--port): Permission denied; choose another --port"
    assert host_port("", 1) == "*:1" and host_port("10.0.0.1", 2) == "10.0.0.1:2"


class _Root:
    parent = None
    exit_status = 0
