"""The NAT emulator's console, on stdin and on a TCP port (``--console-port``).

The commands are cf-nat's: ``help``/``?``, ``info`` or an empty line,
``clear [n]``, ``reassign``, ``rebalance``, ``add <host:port>``,
``remove <host:port>``, ``reverse on|off``, ``exit``/``quit``. On stdin
``exit`` stops the emulator; on a TCP console it closes that session only,
so a stray ``exit`` through ``kubectl port-forward`` does not kill a pod.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from nettester.interfaces import IReportingService
from nettester.logs import Logger
from nettester.nat.proxy import NatProxy
from nettester.service import TCPListener, listen_failed

log = Logger()

HELP = """\
help or ?          - print this help
info or <empty>    - number of NAT entries, reverse mode, usage of each destination
clear [n]          - drop all NAT entries, or n random ones (their clients get new outgoing ports)
reassign           - new outgoing port and new random destination for every NAT entry
rebalance          - new random destination for every NAT entry, same outgoing port
add <host:port>    - add a destination to the load balancer
remove <host:port> - remove a destination from the load balancer
reverse on|off     - enable/disable reverse address update
exit or quit       - stop"""

EXIT = object()
"""What :meth:`NatConsole.execute` answers to ``exit``/``quit``."""

MAX_LINE = 1024


class NatConsole:
    """Parses one console line and runs it against a :class:`NatProxy`.

    Every line gets an answer: bad input gives a usage line, never an exception.
    """

    def __init__(self, proxy: NatProxy) -> None:
        self._proxy = proxy
        self._commands: dict[str, Callable[[list[str]], str | Deferred[str]]] = {
            "help": self._help,
            "?": self._help,
            "info": self._info,
            "clear": self._clear,
            "reassign": self._reassign,
            "rebalance": self._rebalance,
            "add": self._add,
            "remove": self._remove,
            "reverse": self._reverse,
        }

    def execute(self, line: str) -> Deferred[Any]:
        """Run one line; fires with the answer text, or :data:`EXIT`."""
        words = line.split()
        if not words:
            return succeed(self._info([]))
        command, arguments = words[0].lower(), words[1:]
        if command in ("exit", "quit"):
            return succeed(EXIT)
        handler = self._commands.get(command)
        if handler is None:
            return succeed(f"unknown command {command!r}; type 'help' for the commands.")
        log.info("Console command {command} {arguments}", event="nat_console_command", command=command,
                 arguments=" ".join(arguments))
        answer = handler(arguments)
        return answer if isinstance(answer, Deferred) else succeed(answer)

    def _help(self, arguments: list[str]) -> str:
        return HELP

    def _info(self, arguments: list[str]) -> str:
        return "\n".join(self._proxy.table.info())

    def _clear(self, arguments: list[str]) -> str:
        if len(arguments) > 1 or (arguments and not (arguments[0].isascii() and arguments[0].isdigit())):
            return "usage: clear [n] (n a whole number)"
        count = int(arguments[0]) if arguments else None
        return f"cleared {self._proxy.clear(count)} NAT entries."

    def _reassign(self, arguments: list[str]) -> str:
        return f"reassigned {self._proxy.reassign()} NAT entries to new outgoing ports."

    def _rebalance(self, arguments: list[str]) -> str:
        changed, total = self._proxy.rebalance()
        return f"reassigned {changed} destinations of {total}."

    def _add(self, arguments: list[str]) -> str | Deferred[str]:
        if len(arguments) != 1:
            return "usage: add <host:port>"
        return self._proxy.add_destination(arguments[0])

    def _remove(self, arguments: list[str]) -> str:
        if len(arguments) != 1:
            return "usage: remove <host:port>"
        return self._proxy.remove_destination(arguments[0])

    def _reverse(self, arguments: list[str]) -> str:
        if len(arguments) != 1 or arguments[0].lower() not in ("on", "off"):
            return "usage: reverse on|off"
        enabled = arguments[0].lower() == "on"
        self._proxy.set_reverse(enabled)
        return f"reverse address update {'enabled' if enabled else 'disabled'}."


@implementer(IHalfCloseableProtocol)
class ConsoleProtocol(LineOnlyReceiver):
    """One console session: a line in, its answer out, in order.

    :param on_exit: called once the session is closed by ``exit``/``quit``
        (stdin: stop the process; TCP: None). End of input alone never calls it,
        so a container whose stdin is /dev/null keeps running.
    :param output: where answers go instead of the transport (stdin's console,
        see :class:`NatRoleService`).
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(
        self,
        console: NatConsole,
        on_exit: Callable[[], None] | None = None,
        output: Callable[[bytes], None] | None = None,
    ) -> None:
        self._console = console
        self._on_exit = on_exit
        self._output = output
        self._queue: Deferred[Any] = succeed(None)
        self._exiting = False

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        self._queue.addCallback(lambda _: self._console.execute(text)).addCallbacks(self._answer, self._failed)

    def _failed(self, failure: Failure) -> None:
        log.failure("Console command failed", failure, event="nat_console_failed")
        self._write(b"command failed; see the log.\n")

    def readConnectionLost(self) -> None:
        """End of input: answer what is queued; then a TCP session closes, while
        stdin's end leaves the emulator running (a container's stdin is often /dev/null)."""
        if self._on_exit is None:
            self._queue.addCallback(lambda _: self._close())

    def writeConnectionLost(self) -> None:
        """Nobody reads the answers any more: stop reading commands too."""
        self._close()

    def _close(self) -> None:
        assert self.transport is not None  # set while connected
        self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        if self._output is not None:
            self._output(data)
        else:
            assert self.transport is not None  # set while connected
            self.transport.write(data)

    def _answer(self, answer: Any) -> None:
        if answer is EXIT:
            # Close first, so every answer is flushed before on_exit stops the process.
            self._exiting = True
            self._write(b"bye.\n")
            self._close()
            return
        self._write(answer.encode("utf-8") + b"\n")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._write(b"line too long; closing the console.\n")
        self._close()

    def connectionLost(self, reason: Failure | None = None) -> None:
        log.debug("Console session closed", event="nat_console_closed")
        if self._exiting and self._on_exit is not None:
            self._on_exit()


class ConsoleFactory(Factory):
    """TCP console sessions (``--console-port``)."""

    noisy = False

    def __init__(self, console: NatConsole) -> None:
        self._console = console

    def buildProtocol(self, addr: Any) -> ConsoleProtocol:
        log.info("Console session from {peer}", event="nat_console_session", peer=f"{addr.host}:{addr.port}")
        return ConsoleProtocol(self._console)


def _write_stdout(data: bytes) -> None:
    """Blocking write to the process's real stdout (under twistd, sys.stdout is a log file)."""
    stream = sys.__stdout__
    if stream is not None:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()


@implementer(IReportingService)
class NatRoleService(MultiService):
    """The ``nat`` role: the proxy plus its consoles (stdin and/or TCP).

    :param console_port: TCP console port; None for none, 0 for any free port.
    :param stdin_console: read commands from stdin (``exit`` stops the reactor).
    """

    def __init__(
        self,
        reactor: Any,
        proxy: NatProxy,
        console_port: int | None = None,
        console_interface: str = "127.0.0.1",
        stdin_console: bool = False,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.proxy = proxy
        proxy.setServiceParent(self)
        self.metrics = proxy.metrics
        self.console = NatConsole(proxy)
        self._stdin_console = stdin_console
        self._tcp_console: TCPListener | None = None
        if console_port is not None:
            self._tcp_console = TCPListener(reactor, console_port, ConsoleFactory(self.console), console_interface,
                                            "--console-port", self._console_listening)
            self._tcp_console.setServiceParent(self)
        self.failed: str | None = None

    def summary(self) -> dict[str, Any]:
        return self.proxy.summary()

    def startService(self) -> None:
        try:
            super().startService()  # the proxy binds the listening UDP port, then the TCP console listens
        except (CannotListenError, OSError) as error:
            self.failed = str(error)
            host, port = self.proxy.listen_address
            listen_failed(self, self._reactor, host, port, "<listen>", error)
            return
        if self._tcp_console is not None and self._tcp_console.failed:
            self.failed = "--console-port"
            return
        if self._stdin_console:
            from twisted.internet.stdio import StandardIO

            # StandardIO makes its stdout non-blocking, and fd 1 is shared with the log
            # observer's blocking writes: it gets /dev/null instead, and the answers go
            # through the same blocking stream as the log lines.
            devnull = os.open(os.devnull, os.O_WRONLY)
            console = ConsoleProtocol(self.console, on_exit=self._reactor.stop, output=_write_stdout)
            # mypy reads the Windows StandardIO, which has no stdin/stdout arguments.
            StandardIO(console, stdin=0, stdout=devnull, reactor=self._reactor)  # type: ignore[call-arg]

    def _console_listening(self, port: Any) -> None:
        address = port.getHost()
        log.info("NAT console on tcp {address}", event="nat_console_listening",
                 address=f"{address.host}:{address.port}")

    @property
    def console_port(self) -> int:
        """The TCP console's real port number."""
        assert self._tcp_console is not None and self._tcp_console.listening is not None, "no TCP console"
        address = self._tcp_console.listening.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))  # a TCP port
        return address.port
