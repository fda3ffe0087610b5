"""Module discovery, the role sub-commands and the service tree of a role."""

import io

import pytest
from twisted.application.service import Application, IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver
from twisted.python.usage import UsageError
from zope.interface import implementer
from zope.interface.verify import verifyObject

from nettester import tap
from nettester.interfaces import ICommandRole, IProtocolModule, IReportingService, IRole
from nettester.metrics import MetricSet
from nettester.module import CommandRole, CommandService, ProtocolModule, Role, discover_modules, discover_roles
from nettester.options import RoleOptions
from nettester.service import GC_THRESHOLDS, build, exit_status_of


def test_every_installed_module_and_role_provides_its_interface() -> None:
    for module in discover_modules():
        assert verifyObject(IProtocolModule, module)
        for role in module.roles:
            assert verifyObject(IRole, role)
            if ICommandRole.providedBy(role):
                assert verifyObject(ICommandRole, role)
            assert issubclass(role.options, RoleOptions)


def test_role_names_are_unique_across_modules() -> None:
    names = [role.name for module in discover_modules() for role in module.roles]
    assert len(names) == len(set(names))
    assert names.count("local") == 1


def test_options_list_every_role_and_local() -> None:
    options = tap.Options()
    usage_text = str(options)
    for name in discover_roles():
        assert name in usage_text
    assert "local" in usage_text


def test_options_require_a_role() -> None:
    with pytest.raises(UsageError, match="name a role"):
        tap.Options().parseOptions([])


def test_options_reject_an_unknown_role() -> None:
    with pytest.raises(UsageError, match="Unknown command: nope"):
        tap.Options().parseOptions(["nope"])


@implementer(IReportingService)
class _SlowStoppingService(Service):
    """Stops only when told, like a server waiting for its FINs."""

    def __init__(self, events: list[str]) -> None:
        self.metrics = MetricSet("demo")
        self.stopped: Deferred[None] = Deferred()
        self._events = events

    def summary(self) -> dict[str, int]:
        self._events.append("summary")
        return {"open": 0}

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._events.append("stop-requested")
        return self.stopped


def _demo_role(events: list[str]) -> Role:
    return Role("demo", "A demo role.", RoleOptions, lambda reactor, options: _SlowStoppingService(events))


def test_build_prints_final_summary_only_after_the_role_has_stopped() -> None:
    events: list[str] = []
    options = RoleOptions()
    options.parseOptions(["--stats-interval", "0"])
    root = build(_demo_role(events), options, Clock())
    root.startService()
    done = root.stopService()
    assert events == ["stop-requested"]
    role_service = list(list(root)[0])[-1]
    role_service.stopped.callback(None)
    assert events == ["stop-requested", "summary"]
    assert done.called


def test_build_makes_garbage_collections_rare_for_large_live_tables() -> None:
    import gc

    before = gc.get_threshold()
    try:
        build(_demo_role([]), RoleOptions(), Clock())
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.set_threshold(*before)


def test_root_service_installs_its_log_observer_into_the_twistd_application() -> None:
    options = RoleOptions()
    options.parseOptions(["--log-format", "json"])
    root = build(_demo_role([]), options, Clock())
    application = Application("nettester")
    root.setServiceParent(application)
    assert application.getComponent(ILogObserver) is root.observer
    assert list(IService(application)) == [root]


def test_command_role_runs_once_and_records_exit_status() -> None:
    out = io.StringIO()
    reactor = MemoryReactorClock()
    role = CommandRole("say", "Says hi.", RoleOptions, lambda options, stdout: stdout.write("hi\n") and 3)
    assert role.run(RoleOptions(), out) == 3 and out.getvalue() == "hi\n"
    service = CommandService(role, RoleOptions(), reactor, stdout=out)
    service.startService()
    for hook, args, kwargs in reactor.whenRunningHooks:
        hook(*args, **kwargs)
    assert exit_status_of(service) == 3 and reactor.hasStopped
    assert out.getvalue() == "hi\nhi\n"


def test_protocol_module_without_local_scenario() -> None:
    module = ProtocolModule("demo", "Demo.", ())
    assert verifyObject(IProtocolModule, module)
    assert module.local_scenario(Clock(), RoleOptions()) is None


def test_a_second_stop_signal_during_shutdown_is_answered_with_a_line() -> None:
    import os
    import signal

    from tests.logcapture import log_events

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with log_events() as seen:
        try:
            reactor = MemoryReactorClock()
            build(_demo_role([]), RoleOptions(), reactor)
            (phase, event, (trigger, args, kwargs)), = [
                (phase, event, hook) for phase, events in reactor.triggers.items()
                for event, hooks in events.items() for hook in hooks
            ]
            assert (phase, event) == ("before", "shutdown")
            trigger(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    assert [e["signal"] for e in seen if e.get("event") == "shutdown_pending"] == ["SIGTERM"]
