"""Options of the ``stun-server``, ``stun-client`` and ``stun-report`` roles (Twisted-free: read at plugin load)."""

from __future__ import annotations

import ipaddress
import resource
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from twisted.python import usage

from nettester.options import RoleOptions, non_negative_int, port_number, positive_float, positive_int
from nettester.report.options import ResultOptionsMixin
from nettester.workers import ProcessesOptionsMixin, WorkersOptionsMixin

if TYPE_CHECKING:
    from nettester.interfaces import MergedRun

# Descriptors beyond one per client: stdio, the epoll fd, the waker pipe, metrics, logs.
SPARE_FILES = 64


def raise_open_file_limit(clients: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward the hard limit for ``clients`` sockets.

    Returns the soft limit now in force; raises ``ValueError``, saying what
    to do, when even the hard limit is too low.
    """
    needed = clients + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ValueError(
            f"{clients} clients need {needed} open files (one UDP socket each) but the hard limit "
            f"(ulimit -Hn) is {hard}; raise it (docker run --ulimit nofile={needed}, systemd LimitNOFILE=, "
            f"or the pod's runtime limits) or lower --clients"
        )
    return int(soft)


class SecondsRange(NamedTuple):
    """A LOW-HIGH range of seconds to pick uniformly from."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.low:g}-{self.high:g}"


def seconds_range(value: str) -> SecondsRange:
    """``LOW-HIGH`` seconds (a random pick in between) or one number ``N`` (exactly N)."""
    low_text, _, high_text = value.strip().partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError:
        raise ValueError(f"expected seconds as N or LOW-HIGH (e.g. 1-10), got {value!r}") from None
    if not 0 <= low <= high:
        raise ValueError(f"expected 0 <= LOW <= HIGH seconds, got {value!r}")
    return SecondsRange(low, high)


seconds_range.coerceDoc = "Seconds: N, or LOW-HIGH for a random pick."  # type: ignore[attr-defined]


def transport_address(value: str) -> tuple[str, int]:
    """``IP:PORT`` or ``[IPv6]:PORT``."""
    host, sep, port_text = value.strip().rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected IP:PORT or [IPv6]:PORT, got {value!r}") from None
    if not sep or not 0 <= port <= 65535:
        raise ValueError(f"expected IP:PORT or [IPv6]:PORT, got {value!r}")
    return (host, port)


def _ip_literal(value: str) -> str:
    if value:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"expected an IPv4 or IPv6 address (or nothing for all IPv4), got {value!r}") from None
    return value


class StunServerOptions(WorkersOptionsMixin, RoleOptions):
    """``nettester stun-server``."""

    longdesc = (
        "An RFC 8489 STUN server answering Binding requests with XOR-MAPPED-ADDRESS, "
        "MAPPED-ADDRESS and SOFTWARE (FINGERPRINT when the request had one). With "
        "--other-address it also listens there and implements RFC 5780 (OTHER-ADDRESS, "
        "RESPONSE-ORIGIN, CHANGE-REQUEST)."
    )
    envVars: ClassVar[dict[str, str]] = {
        "port": "STUN_SERVER_PORT",
        "interface": "STUN_SERVER_INTERFACE",
        "other-address": "STUN_OTHER_ADDRESS",
        "tcp": "STUN_SERVER_TCP",
    }
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", 3478, "UDP (and TCP) port to listen on.", port_number],
        [
            "interface",
            "i",
            "",
            "Address to listen on: an IPv4 or IPv6 literal; '::' is dual-stack; empty = all IPv4.",
            _ip_literal,
        ],
        [
            "other-address",
            None,
            None,
            "RFC 5780: the second IP:PORT (another IP, another port) to also listen on; needs --interface.",
            transport_address,
        ],
        ["software", None, "nettester", "SOFTWARE attribute of every response."],
        [
            "receive-buffer",
            None,
            4 * 1024 * 1024,
            "SO_RCVBUF to ask for, in bytes (the kernel may grant less).",
            positive_int,
        ],
        [
            "max-sessions",
            None,
            100_000,
            "Tester sessions (NETTESTER-SEQUENCE) whose receptions are remembered; the least recently "
            "used go first.",
            positive_int,
        ],
        [
            "journal",
            None,
            None,
            "Write one JSON line per received request (TrID, source, time) to FILE, for stun-report.",
        ],
        [
            "journal-max-bytes",
            None,
            64 * 1024 * 1024,
            "Rotate the journal to FILE.1 when FILE would pass this many bytes.",
            positive_int,
        ],
    ]
    optFlags: ClassVar[list[list[Any]]] = [["tcp", None, "Also serve STUN over TCP on the same port."]]

    def postOptions(self) -> None:
        other = self["other-address"]
        if other is None:
            return
        if not self["interface"] or ipaddress.ip_address(self["interface"]).is_unspecified:
            raise usage.UsageError(
                "--other-address needs --interface set to this host's first IP (RFC 5780 "
                "answers from a known IP pair); see --help"
            )
        first = ipaddress.ip_address(self["interface"])
        second = ipaddress.ip_address(other[0])
        if first.version != second.version or first == second:
            raise usage.UsageError(
                f"--other-address {other[0]} must be another IP of the same family as "
                f"--interface {self['interface']}; see --help"
            )
        if other[1] and other[1] == self["port"]:
            raise usage.UsageError(f"--other-address port {other[1]} must differ from --port; see --help")


class StunClientOptions(ResultOptionsMixin, ProcessesOptionsMixin, RoleOptions):
    """``nettester stun-client``."""

    longdesc = (
        "The STUN loss tester: --clients clients, each with its own UDP socket, send a Binding "
        "request every --interval; a missing answer is logged with its transaction id and re-sent "
        "with the same id; after 5 consecutive misses the client opens a new socket."
    )
    envVars: ClassVar[dict[str, str]] = {
        "server": "STUN_SERVER_IP",
        "port": "STUN_SERVER_PORT",
        "clients": "STUN_CLIENT_COUNT",
        "interval": "STUN_INTERVAL",
        "start-delay": "STUN_START_DELAY",
        "rfc-retransmit": "STUN_RFC_RETRANSMIT",
    }
    optParameters: ClassVar[list[list[Any]]] = [
        ["server", None, "", "STUN server: IPv4 or IPv6 literal, or a host name (resolved once, IPv4) (required)."],
        ["port", "p", 3478, "STUN server UDP port.", port_number],
        ["clients", "c", 1000, "Number of clients, each with its own UDP socket.", positive_int],
        ["interval", None, 10.0, "Seconds between Binding requests; also the wait for an answer.", positive_float],
        [
            "start-delay",
            None,
            SecondsRange(1.0, 10.0),
            "Random start delay per client, LOW-HIGH seconds; 0 starts all at once.",
            seconds_range,
        ],
        ["max-failures", None, 5, "Consecutive misses before a client opens a new socket.", positive_int],
        ["reopen-after", None, 120.0, "A healthy client opens a new socket after this many seconds...", positive_float],
        ["reopen-jitter", None, SecondsRange(1.0, 60.0), "...plus a random LOW-HIGH seconds.", seconds_range],
        ["local-address", None, "", "Local IP to bind the clients' sockets to (default: any).", _ip_literal],
        ["seed", None, 0, "Random seed for delays and transaction ids (0 = system randomness).", non_negative_int],
    ]
    optFlags: ClassVar[list[list[Any]]] = [
        [
            "rfc-retransmit",
            None,
            "RFC 8489 retransmissions (RTO 500 ms doubling, Rc=7, Rm=16) instead of the "
            "original once-per-interval re-send.",
        ],
        [
            "no-attribution",
            None,
            "Send bare Binding requests, without NETTESTER-SEQUENCE (every loss is then unattributed).",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["server"]:
            raise usage.UsageError("--server is required (or set STUN_SERVER_IP); see --help")
        try:
            raise_open_file_limit(self["clients"])
        except ValueError as error:
            raise usage.UsageError(f"--clients: {error}") from None

    def merged_run(self) -> MergedRun:
        from nettester.protocols.stun.message import Address
        from nettester.protocols.stun.runlines import StunProcessesRun, duration_line, start_line

        start = start_line(self["clients"], str(Address(self["server"], self["port"])), self["interval"],
                           self["start-delay"], bool(self["rfc-retransmit"]))
        return StunProcessesRun(self["report"], start, self["duration"], duration_line(self["duration"]))


class StunReportOptions(RoleOptions):
    """``nettester stun-report``."""

    serves_metrics = False

    synopsis = "SERVER.jsonl CLIENT.jsonl [CLIENT.jsonl ...]"
    longdesc = (
        "Join a stun-server journal (--journal) with the JSON logs (--log-format json) of its stun-clients by "
        "transaction id and print, per lost TrID, whether the server received it, when and from which "
        "address, and the Wireshark filter that finds it; then totals by direction and by client. "
        "Exit status: 0 no loss, 1 a path loss found, 2 an unreadable input."
    )

    def parseArgs(self, server: str, *clients: str) -> None:  # type: ignore[override]
        if not clients:
            raise usage.UsageError("give the server's journal and at least one client's JSON log")
        self["server_journal"] = server
        self["client_logs"] = list(clients)
