"""The module registry, and the small providers of IRole, ICommandRole and IProtocolModule.

A plugin file under ``nettester/plugins/`` builds one ``ProtocolModule`` from
these, so declaring a module is a few lines and needs no edit of the core.
``discover_modules`` finds them with ``twisted.plugin.getPlugins``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.application.service import IService, Service
from twisted.plugin import IPlugin, getPlugins
from zope.interface import implementer

from nettester.interfaces import ICommandRole, ILocalScenario, IProtocolModule, IRole
from nettester.options import RoleOptions
from nettester.service import set_exit_status


@dataclass(frozen=True)
class Verdict:
    """A module's judgement of its ``nettester local`` run (an ``ILocalScenario``'s result):
    passed or not, and the evidence."""

    passed: bool
    evidence: Mapping[str, Any] = field(default_factory=dict)


def discover_modules() -> list[IProtocolModule]:
    """Every installed module (``local`` included), sorted by name."""
    import nettester.plugins

    return sorted(getPlugins(IProtocolModule, nettester.plugins), key=lambda module: module.name)


def discover_roles() -> dict[str, IRole]:
    """Role name -> role, for every installed module."""
    return {role.name: role for module in discover_modules() for role in module.roles}


@implementer(IRole)
@dataclass(frozen=True)
class Role:
    """A long-running role: ``factory(reactor, options)`` builds its service."""

    name: str
    summary: str
    options: type[RoleOptions]
    factory: Callable[[Any, RoleOptions], IService]

    def makeService(self, reactor: Any, options: RoleOptions) -> IService:
        return self.factory(reactor, options)


@implementer(ICommandRole)
@dataclass(frozen=True)
class CommandRole:
    """A one-shot role: ``command(options, stdout)`` returns the exit status."""

    name: str
    summary: str
    options: type[RoleOptions]
    command: Callable[[RoleOptions, IO[str]], int]

    def run(self, options: RoleOptions, stdout: IO[str]) -> int:
        return self.command(options, stdout)

    def makeService(self, reactor: Any, options: RoleOptions) -> IService:
        return CommandService(self, options, reactor)


class CommandService(Service):
    """Runs a command role inside twistd, then stops the reactor with its status."""

    def __init__(self, role: CommandRole, options: RoleOptions, reactor: Any, stdout: IO[str] | None = None) -> None:
        self._role = role
        self._options = options
        self._reactor = reactor
        # The real stdout: under twistd, sys.stdout becomes a log file.
        self._stdout = stdout if stdout is not None else sys.__stdout__

    def startService(self) -> None:
        super().startService()
        assert self._stdout is not None, "no stdout for the result: Python started without one"
        set_exit_status(self, self._role.run(self._options, self._stdout))
        self._reactor.callWhenRunning(self._reactor.stop)


@implementer(IPlugin, IProtocolModule)
@dataclass(frozen=True)
class ProtocolModule:
    """A protocol module: its roles and its part of ``nettester local``."""

    name: str
    summary: str
    roles: tuple[IRole, ...]
    local: Callable[[Any, RoleOptions], ILocalScenario] | None = None

    def local_scenario(self, reactor: Any, options: RoleOptions) -> ILocalScenario | None:
        return self.local(reactor, options) if self.local is not None else None
