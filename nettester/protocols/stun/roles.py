"""The ``stun`` module's roles: builders on a reactor passed in, and their table.

Heavy imports happen inside the builders, so listing roles stays fast and
twistd can install its reactor first.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.application.service import IService

from nettester.addresses import address_text
from nettester.interfaces import ILocalScenario
from nettester.module import CommandRole, Role
from nettester.options import RoleOptions
from nettester.protocols.stun.options import StunClientOptions, StunReportOptions, StunServerOptions

SUMMARY = "STUN (RFC 8489) server and many-client loss tester: which responses never arrived?"


def build_server(reactor: Any, options: RoleOptions) -> IService:
    """The stun-server service for parsed ``options``."""
    from nettester.protocols.stun.message import Address
    from nettester.protocols.stun.server import StunServerService

    other = options["other-address"]
    return StunServerService(
        reactor,
        port=options["port"],
        interface=options["interface"],
        other_address=Address(*other) if other else None,
        tcp=bool(options["tcp"]),
        software=options["software"],
        receive_buffer=options["receive-buffer"],
        max_sessions=options["max-sessions"],
        journal=options["journal"],
        journal_max_bytes=options["journal-max-bytes"],
    )


def build_client(reactor: Any, options: RoleOptions) -> IService:
    """The stun-client fleet for parsed ``options``."""
    import random

    from nettester.protocols.stun.client import StunClientService
    from nettester.protocols.stun.fleet import FleetConfig
    from nettester.workers import current_worker

    assert isinstance(options, StunClientOptions)
    config = FleetConfig(
        clients=options["clients"],
        interval=options["interval"],
        start_delay=options["start-delay"],
        max_failures=options["max-failures"],
        reopen_after=options["reopen-after"],
        reopen_jitter=options["reopen-jitter"],
        rfc_retransmit=bool(options["rfc-retransmit"]),
        attribution=not options["no-attribution"],
    )
    # A --processes child seeds with its index too: the same seed everywhere would repeat transaction and
    # session ids across the processes.
    worker = current_worker()
    seed = options["seed"] if worker is None else f"{options['seed']}/{worker[0]}"
    rng = random.Random(seed) if options["seed"] else None
    configuration = {
        key: options[key]
        for key in ("server", "port", "clients", "interval", "max-failures", "rfc-retransmit", "duration")
    }
    configuration["target"] = address_text((options["server"], options["port"]))  # as every report names it
    configuration["start-delay"] = str(options["start-delay"])
    configuration["attribution"] = not options["no-attribution"]
    return StunClientService(
        reactor,
        options["server"],
        options["port"],
        config,
        local_address=options["local-address"],
        rng=rng,
        duration=options["duration"],
        report=options["report"],
        thresholds=options.thresholds(),
        configuration=configuration,
        first_client=options.first_client,
    )


def _report(options: RoleOptions, stdout: IO[str]) -> int:
    from nettester.protocols.stun.report import run_report

    return run_report(options["server_journal"], options["client_logs"], stdout)


def local(reactor: Any, options: RoleOptions) -> ILocalScenario:
    from nettester.protocols.stun.local import StunLocalScenario

    return StunLocalScenario(reactor)


ROLES = (
    Role(
        "stun-server",
        "Answer STUN Binding requests (UDP, TCP, RFC 5780 with --other-address).",
        StunServerOptions,
        build_server,
    ),
    Role(
        "stun-client",
        "Many STUN clients, each with its own socket; log every lost transaction id.",
        StunClientOptions,
        build_client,
    ),
    CommandRole(
        "stun-report",
        "Join a stun-server journal and stun-client JSON logs: was each lost TrID received by the server?",
        StunReportOptions,
        _report,
    ),
)
