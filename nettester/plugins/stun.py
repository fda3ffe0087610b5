"""The ``stun`` module: RFC 8489 server (with RFC 5780) and the many-client loss tester.

Heavy imports happen inside the factories, so listing roles stays fast and
twistd can install its reactor first.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from nettester.interfaces import ILocalScenario
from nettester.module import ProtocolModule, Role
from nettester.options import RoleOptions
from nettester.protocols.stun.options import StunClientOptions, StunServerOptions


def build_server(reactor: Any, options: RoleOptions) -> IService:
    """The stun-server service for parsed C{options}."""
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
    )


def build_client(reactor: Any, options: RoleOptions) -> IService:
    """The stun-client fleet for parsed C{options}."""
    import random

    from nettester.protocols.stun.client import StunClientService
    from nettester.protocols.stun.fleet import FleetConfig

    config = FleetConfig(
        clients=options["clients"],
        interval=options["interval"],
        start_delay=options["start-delay"],
        max_failures=options["max-failures"],
        reopen_after=options["reopen-after"],
        reopen_jitter=options["reopen-jitter"],
        rfc_retransmit=bool(options["rfc-retransmit"]),
    )
    rng = random.Random(options["seed"]) if options["seed"] else None
    return StunClientService(
        reactor, options["server"], options["port"], config, local_address=options["local-address"], rng=rng
    )


def _local(reactor: Any, options: RoleOptions) -> ILocalScenario:
    from nettester.protocols.stun.local import StunLocalScenario

    return StunLocalScenario(reactor)


stun = ProtocolModule(
    name="stun",
    summary="STUN (RFC 8489) server and many-client loss tester: which responses never arrived?",
    roles=(
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
    ),
    local=_local,
)
