"""The ``nat`` module's role: the builder on a reactor passed in, and the local scenario."""

from __future__ import annotations

from typing import Any

from nettester.module import Role
from nettester.nat.options import NatOptions
from nettester.options import RoleOptions

SUMMARY = "NAT and UDP load-balancer emulator in front of servers or a DTLS CID cluster."


def build_nat(reactor: Any, options: RoleOptions) -> Any:
    """Build the NAT proxy and its consoles from parsed options."""
    import random

    from nettester.nat.console import NatRoleService
    from nettester.nat.proxy import NatProxy
    from nettester.nat.table import DropPolicy, NatTable

    rng = random.Random(options["seed"])
    table = NatTable(
        [],
        nat_timeout=options["tnat"] / 1000.0,
        lb_timeout=options["tlb"] / 1000.0,
        max_entries=options["max-entries"],
        reverse_update=bool(options["reverse"]),
        rng=rng,
    )
    policy = DropPolicy(
        forward_percent=options["forward-drop"],
        backward_percent=options["backward-drop"],
        size_limit=options["size-limit"],
        dtls_only=bool(options["dtls-only"]),
        rng=rng,
    )
    proxy = NatProxy(reactor, table, policy, options["listen"], options["destinations"])
    return NatRoleService(
        reactor,
        proxy,
        console_port=options["console-port"] or None,
        console_interface=options["console-interface"],
        stdin_console=not options["no-stdin-console"],
    )


def local(reactor: Any, options: RoleOptions) -> Any:
    from nettester.nat.local import NatLocalScenario

    return NatLocalScenario(reactor, options["duration"])


ROLE = Role(
    name="nat",
    summary="NAT / UDP load-balancer emulator with a console to break mappings (cf-nat's commands).",
    options=NatOptions,
    factory=build_nat,
)

