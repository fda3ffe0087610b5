"""Command-line options of ``nettester nat`` (cf-nat's syntax: positional listen address and destinations)."""

from __future__ import annotations

from typing import Any, ClassVar

from twisted.python import usage

from nettester.options import RoleOptions, non_negative_int, percentage, port_number, positive_int


def size_limit(value: str) -> Any:
    """``SIZE[:PCT]``, see ``nettester.nat.table.parse_size_limit``."""
    from nettester.nat.table import parse_size_limit

    return parse_size_limit(value)


def listen_address(value: str) -> tuple[str, int]:
    """``[interface]:port`` to listen on; port 0 lets the OS choose."""
    from nettester.addresses import parse_host_port

    try:
        return parse_host_port(value, default_host="", lowest_port=0)
    except ValueError as error:
        raise ValueError(f"{error}; e.g. ':5784' or '127.0.0.1:5784'") from None


def destination_address(value: str) -> str:
    """One ``host:port`` destination, checked, kept as text (host names are resolved at start)."""
    from nettester.addresses import parse_host_port

    try:
        parse_host_port(value)
    except ValueError as error:
        raise usage.UsageError(f"destination: {error}; e.g. 'localhost:5684'") from None
    return value.strip()


def destination_list(value: str) -> list[str]:
    """Comma- or space-separated ``host:port`` destinations."""
    try:
        return [destination_address(item) for item in value.replace(",", " ").split()]
    except usage.UsageError as error:
        raise ValueError(str(error).removeprefix("destination: ").removesuffix("; e.g. 'localhost:5684'")) from None


class NatOptions(RoleOptions):
    """Options of ``nettester nat``."""

    synopsis = "<listen> <destination> [<destination>...] [options]"
    longdesc = (
        "Receive UDP on <listen> ([interface]:port, e.g. :5784 or [::1]:5784), open one outgoing socket "
        "per client source address and forward to a destination (host:port) picked at random per new "
        "entry, then sticky; answers go back through the listening socket. Commands on stdin and on "
        "--console-port: help, info, clear [n], reassign, rebalance, add <host:port>, remove <host:port>, "
        "reverse on|off, exit. Without arguments, --listen and --destinations (or NAT_LISTEN and NAT_DESTINATIONS) "
        "are used."
    )

    envVars: ClassVar[dict[str, str]] = {
        "listen": "NAT_LISTEN",
        "destinations": "NAT_DESTINATIONS",
        "reverse": "NAT_REVERSE",
        "dtls-only": "NAT_DTLS_ONLY",
        "tnat": "NAT_TIMEOUT_MS",
        "tlb": "NAT_LB_TIMEOUT_MS",
        "max-entries": "NAT_MAX_ENTRIES",
        "drop": "NAT_DROP_PERCENT",
        "forward-drop": "NAT_FORWARD_DROP_PERCENT",
        "backward-drop": "NAT_BACKWARD_DROP_PERCENT",
        "size-limit": "NAT_SIZE_LIMIT",
        "console-port": "NAT_CONSOLE_PORT",
        "console-interface": "NAT_CONSOLE_INTERFACE",
        "no-stdin-console": "NAT_NO_STDIN_CONSOLE",
        "seed": "NAT_SEED",
    }

    optFlags: ClassVar[list[list[Any]]] = [
        ["reverse", "r", "Reverse address update: an answer from another destination moves the entry there."],
        ["dtls-only", "x", "Pass only datagrams starting with a DTLS record header; drop the rest."],
        ["no-stdin-console", None, "Do not read console commands from stdin."],
    ]

    optParameters: ClassVar[list[list[Any]]] = [
        ["listen", None, None, "[interface]:port to listen on (the first argument wins).", listen_address],
        ["destinations", None, [], "Comma-separated host:port destinations (the other arguments win).",
         destination_list],
        ["tnat", None, 30000, "NAT entry timeout in ms without traffic.", positive_int],
        ["tlb", None, 15000, "Load-balancer timeout in ms: a destination not answering that long is stale "
                             "(no new entries) and probed again after the same time.", positive_int],
        ["max-entries", "n", 10000, "Maximum number of NAT entries (the least recently used one is dropped).",
         positive_int],
        ["drop", "d", 0.0, "Drop this percentage of datagrams in both directions.", percentage],
        ["forward-drop", "f", 0.0, "Drop this percentage of client -> destination datagrams.", percentage],
        ["backward-drop", "b", 0.0, "Drop this percentage of destination -> client datagrams.", percentage],
        ["size-limit", "s", None, "SIZE[:PCT]: drop datagrams longer than SIZE bytes (with PCT % probability, "
                                  "default 100).", size_limit],
        ["console-port", None, 0, "Also serve the console on this TCP port (0 = off).", port_number],
        ["console-interface", None, "127.0.0.1", "Interface of --console-port (kubectl port-forward reaches "
                                                 "127.0.0.1 inside a pod)."],
        ["seed", None, None, "Seed of the random choices (destinations, drops) for a reproducible run.",
         non_negative_int],
    ]

    def parseArgs(self, *arguments: str) -> None:
        """``<listen> <destination>...``; they win over --listen/--destinations and their env vars."""
        if not arguments:
            return
        if len(arguments) < 2:
            raise usage.UsageError(f"give at least one destination after {arguments[0]!r}, e.g. 'localhost:5684'")
        self._dispatch["listen"]("listen", arguments[0])
        self["destinations"] = [destination_address(destination) for destination in arguments[1:]]

    def postOptions(self) -> None:
        if self["listen"] is None or not self["destinations"]:
            raise usage.UsageError(
                "give the listening address and at least one destination, e.g. ':5784 localhost:5684' "
                "(or set NAT_LISTEN and NAT_DESTINATIONS)"
            )
        if self["drop"] and (self["forward-drop"] or self["backward-drop"]):
            raise usage.UsageError("use either -d (both directions) or -f/-b (one direction each), not both")
        if self["drop"]:
            self["forward-drop"] = self["backward-drop"] = self["drop"]
