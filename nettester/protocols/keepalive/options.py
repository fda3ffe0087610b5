"""Command-line options of the ``keepalive`` roles (server, client fleet, report)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from twisted.python.usage import UsageError

from nettester.options import RoleOptions, non_negative_float, port_number, positive_float, positive_int
from nettester.report.options import ResultOptionsMixin
from nettester.workers import ProcessesOptionsMixin, WorkersOptionsMixin

if TYPE_CHECKING:
    from nettester.interfaces import MergedRun

DEFAULT_PORT = 49665


class ServerOptions(WorkersOptionsMixin, RoleOptions):
    """Options of ``keepalive-server``."""

    longdesc = ("Accept TCP (or TLS) connections, answer 'Keep Alive <seq>' and dummy messages, and close "
                "(with a FIN) every connection whose keep-alive is missing for --keepalive-timeout seconds. "
                "Every close is logged with its cause: closed_by_server, peer_closed (FIN) or peer_reset (RST).")

    envVars: ClassVar[dict[str, str]] = {
        "port": "TCP_SERVER_PORT",
        "interface": "TCP_SERVER_INTERFACE",
        "keepalive-timeout": "TCP_KEEPALIVE_TIMEOUT",
        "tls": "TCP_TLS",
        "cert": "TLS_CERT",
        "key": "TLS_KEY",
    }
    optFlags: ClassVar[list[list[Any]]] = [
        ["tls", None, "Speak TLS 1.2/1.3 (with --cert/--key, or a self-signed certificate made at start)."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", DEFAULT_PORT, "TCP port to listen on.", port_number],
        ["interface", None, "", "Address to listen on (default: all IPv4 addresses; '::' for IPv6 too)."],
        ["keepalive-timeout", None, 20.0, "Close a connection with no keep-alive for this many seconds.",
         positive_float],
        ["cert", None, None, "PEM certificate chain (leaf first) for --tls."],
        ["key", None, None, "PEM private key of --cert (unencrypted)."],
    ]

    def postOptions(self) -> None:
        if bool(self["cert"]) != bool(self["key"]):
            raise UsageError("--cert and --key go together: give both, or neither for a self-signed certificate")
        if self["cert"] and not self["tls"]:
            raise UsageError("--cert/--key need --tls")
        self["certificate"] = None
        if self["tls"]:
            from nettester.protocols.keepalive import tls

            try:
                self["certificate"] = (tls.load_server_certificate(self["cert"], self["key"]) if self["cert"]
                                       else tls.self_signed_certificate())
            except tls.TLSSetupError as error:
                raise UsageError(str(error)) from None


class ClientOptions(ResultOptionsMixin, ProcessesOptionsMixin, RoleOptions):
    """Options of ``keepalive-client``."""

    longdesc = ("Open --clients long-lived connections to a keepalive-server, each sending 'Establish Session', "
                "a keep-alive every --keepalive-interval seconds and dummy data, and reconnecting after a drop. "
                "Logs tell a FIN ('Server terminated TCP connection') from a RST ('TCP connection reset') from a "
                "missing response.")

    envVars: ClassVar[dict[str, str]] = {
        "server": "TCP_SERVER_IP",
        "port": "TCP_SERVER_PORT",
        "clients": "TCP_CLIENT_COUNT",
        "keepalive-interval": "TCP_KEEPALIVE_INTERVAL",
        "response-timeout": "TCP_RESPONSE_TIMEOUT",
        "dummy-interval": "TCP_DUMMY_INTERVAL",
        "ramp-up": "TCP_RAMP_UP",
        "reconnect-delay": "TCP_RECONNECT_DELAY",
        "reconnect-max-delay": "TCP_RECONNECT_MAX_DELAY",
        "tls": "TCP_TLS",
        "ca": "TLS_CA",
        "server-name": "TLS_SERVER_NAME",
        "insecure": "TLS_INSECURE",
    }
    optFlags: ClassVar[list[list[Any]]] = [
        ["tls", None, "Speak TLS 1.2/1.3 to the server."],
        ["insecure", None, "With --tls: do not verify the server certificate."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["server", None, None, "Server host name or IP address (required)."],
        ["port", "p", DEFAULT_PORT, "Server TCP port.", port_number],
        ["clients", "c", 100, "Number of clients, each holding one connection.", positive_int],
        ["keepalive-interval", None, 5.0, "Seconds between keep-alives.", positive_float],
        ["response-timeout", None, 10.0, "Close when a keep-alive response is this many seconds late.",
         positive_float],
        ["dummy-interval", None, 11.0, "Seconds between dummy messages (0 = none).", non_negative_float],
        ["ramp-up", None, 10.0, "Start clients at random times spread over this many seconds.", non_negative_float],
        ["reconnect-delay", None, 1.0, "Seconds to wait before reconnecting after a drop.", non_negative_float],
        ["reconnect-max-delay", None, 60.0, "Each further failure in a row (refused, TLS failed, closed before a "
                                            "keep-alive was answered) doubles the wait, with jitter, up to this "
                                            "many seconds.", positive_float],
        ["ca", None, None, "With --tls: PEM CA certificate to verify the server (default: system trust store)."],
        ["server-name", None, None, "With --tls: name for SNI and the certificate check (default: --server)."],
    ]

    def postOptions(self) -> None:
        if not self["server"]:
            raise UsageError("--server is required (or set TCP_SERVER_IP): the keepalive-server's host or IP")
        if self["port"] == 0:
            raise UsageError(f"--port 0 is not a destination: give the keepalive-server's port "
                             f"(default {DEFAULT_PORT}, or set TCP_SERVER_PORT)")
        if not self["tls"] and (self["ca"] or self["server-name"] or self["insecure"]):
            raise UsageError("--ca, --server-name and --insecure need --tls")
        if self["insecure"] and self["ca"]:
            raise UsageError("--insecure skips verification, so --ca would be ignored: give one of them")
        self["tls-creator"] = None
        if self["tls"]:
            from nettester.protocols.keepalive import tls

            try:
                self["tls-creator"] = tls.client_creator(self["server-name"] or self["server"], self["ca"],
                                                         bool(self["insecure"]))
            except tls.TLSSetupError as error:
                raise UsageError(str(error)) from None

    def merged_run(self) -> MergedRun:
        from nettester.protocols.keepalive.runlines import KeepaliveProcessesRun, duration_line, start_line, target
        from nettester.report.merge import new_run_id

        run = new_run_id()
        start = start_line(run, self["clients"], target(self["server"], self["port"]), bool(self["tls"]),
                           self["ramp-up"])
        return KeepaliveProcessesRun(self["report"], start, self["duration"], duration_line(run, self["duration"]),
                                     run_id=run)


class ReportOptions(RoleOptions):
    """Options of ``keepalive-report``."""

    serves_metrics = False

    synopsis = "SERVER.jsonl CLIENT.jsonl [CLIENT.jsonl ...]"
    longdesc = ("Join the JSON logs (--log-format json) of a keepalive-server and its keepalive-clients by "
                "connection id and print, per class, how many connections and when: closed by the server "
                "(keep-alive missing), closed by the client, reset by a middlebox (a RST neither end sent), "
                "still open. Exit status: 0 nothing found on the path; 1 a middlebox reset or FIN, or a "
                "keep-alive or its response lost; 2 a file that cannot be read or is not a JSON log.")

    def parseArgs(self, server: str, *clients: str) -> None:  # type: ignore[override]  # Options passes the arguments
        if not clients:
            raise UsageError("give the server's JSON log and at least one client's JSON log")
        self["server_log"] = server
        self["client_logs"] = list(clients)
