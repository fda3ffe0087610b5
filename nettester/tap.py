"""twistd's entry point only: Options with one sub-command per role, and makeService.

Roles come from the module registry (``nettester.module``); the service tree
is wired by ``nettester.service``.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from nettester.module import discover_roles
from nettester.options import RoleOptions
from nettester.service import build


class Options(usage.Options):
    """``nettester <role> [options]``; ``nettester <role> --help`` for a role's options."""

    @property
    def synopsis(self) -> str:
        """``<role> [options]`` at the top; the role's own synopsis follows its name."""
        return "" if self.subCommand else "<role> [options]"

    def getSynopsis(self) -> str:
        return super().getSynopsis().rstrip()

    longdesc = (
        "Run one nettester role in the foreground. Every role prints a summary line "
        "every --stats-interval seconds and a final one when stopped (Ctrl-C / SIGTERM). "
        "'nettester <role> --help' lists the role's options."
    )

    def __init__(self) -> None:
        super().__init__()
        self.roles = discover_roles()
        self.root: IService | None = None
        # The nettester launcher sets this to False: twistd's banners are then debug lines.
        self.twistd_banners = True

    @property
    def subCommands(self) -> list[tuple[str, None, type[RoleOptions], str]]:
        return [(role.name, None, role.options, role.summary) for role in self.roles.values()]

    opt_version = RoleOptions.opt_version

    def postOptions(self) -> None:
        if not self.subCommand:
            raise usage.UsageError(f"name a role: one of {', '.join(self.roles)}")


def makeService(options: Options) -> IService:
    """twistd entry point: the service tree of the chosen role, on the running reactor.

    The root is kept on ``options.root`` so the ``nettester`` script can exit
    with the status the role recorded there.
    """
    from twisted.internet import reactor

    assert options.subCommand is not None  # postOptions requires a role
    options.root = build(options.roles[options.subCommand], options.subOptions, reactor,
                         twistd_banners=options.twistd_banners)
    return options.root
