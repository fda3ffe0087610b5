"""Options of the CoAP roles (no reactor imports: read when plugins load).

The server's options mirror Eclipse Californium's ``cf-extplugtest-server``
so its users feel at home: ``--[no-]plugtest``, ``--[no-]benchmark``,
``--[no-]loopback``... Twisted's usage module has no negatable flags, so each
``--[no-]x`` is a pair of flags resolved in ``postOptions``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.python import usage

from nettester.cluster.config import ClusterOptionsMixin
from nettester.options import (
    RoleOptions,
    log_level_name,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
)
from nettester.protocols.coap.parameters import MAX_TRANSMIT_WAIT
from nettester.protocols.coap.uri import METHODS, parse_uri
from nettester.protocols.dtls.connection import ClientAuth
from nettester.protocols.dtls.options import (
    DtlsClientOptionsMixin,
    DtlsServerOptionsMixin,
)
from nettester.report.options import ResultOptionsMixin
from nettester.workers import ProcessesOptionsMixin, WorkersOptionsMixin

if TYPE_CHECKING:
    from nettester.interfaces import MergedRun

DEFAULT_PORT = 5683
# RFC 7252 section 6.1 / 6.2 default ports: coap 5683, coaps 5684; the
# extended endpoints sit 100 above (Californium's 5783 / 5784).
COAPS_OFFSET = 1
EXTENDED_OFFSET = 100
CLUSTER_MIN_CID_LENGTH = 6  # issue 6: the node id byte plus enough random bytes for many sessions
#: Where coap-receivetest keeps the device UUID unless --uuid-file says otherwise.
DEFAULT_UUID_FILE = os.path.join(os.path.expanduser("~"), ".nettester", "coap-receivetest.uuid")
CLIENT_EXIT_STATUS = (
    "Exit status: 0 a 2.xx response; 1 another response (4.xx, 5.xx); 2 a bad command line; "
    "3 no response (nobody listening, timeout, Reset, failed DTLS handshake)."
)
# The one-shot clients print their result themselves: info lines (twistd's banner) would only clutter it.
QUIET_LOG_LEVEL = ["log-level", None, "warn", "debug, info, warn, error or critical (warn: the printed "
                   "blocks are the output).", log_level_name]


def negatable(name: str, default: bool, help_text: str) -> list[list[Any]]:
    """The flag pair ``--name`` / ``--no-name`` (the default is marked)."""
    on = f"{help_text} (default)" if default else help_text
    off = f"Do not: {help_text[0].lower()}{help_text[1:]}" + ("" if default else " (default)")
    return [[name, None, on], [f"no-{name}", None, off]]


def resolve_negatable(options: usage.Options, name: str, default: bool) -> bool:
    """The value of a flag pair; giving both is an error."""
    on, off = bool(options[name]), bool(options[f"no-{name}"])
    if on and off:
        raise usage.UsageError(f"--{name} and --no-{name} contradict each other")
    return True if on else False if off else default


def interface_list(value: str) -> tuple[str, ...]:
    """Comma-separated IPv4/IPv6 literals."""
    addresses = tuple(part.strip().strip("[]") for part in value.split(",") if part.strip())
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"expected IP addresses separated by commas, got {address!r}") from None
    return addresses


def interface_patterns(value: str) -> tuple[re.Pattern[str], ...]:
    """Space-separated regular expressions over interface names (``--interfaces-pattern``)."""
    patterns = []
    for text in value.split():
        try:
            patterns.append(re.compile(text))
        except re.error as error:
            raise ValueError(f"expected regular expressions separated by spaces, {text!r} is not one: "
                             f"{error}") from None
    return tuple(patterns)


class CoapServerOptions(WorkersOptionsMixin, ClusterOptionsMixin, DtlsServerOptionsMixin, RoleOptions):
    """``nettester coap-server``: the extended plugtest server, optionally a DTLS CID cluster node."""

    longdesc = (
        "An extended CoAP plugtest server (RFC 7252, 7959, 7641, 6690). The ETSI plugtest resources "
        "listen on coap BASE and coaps BASE+1, the extended ones (benchmark, requests, mycontext, myip, "
        "echo) on coap BASE+100 and coaps BASE+101. coaps needs --psk-file, --psk-sandbox or --cert/--key. "
        "With --dtls-cluster or --k8s-dtls-cluster the extended coaps endpoint is a DTLS CID cluster node "
        "on the cluster's DTLS interface instead of BASE+101."
    )
    envVars: ClassVar[dict[str, str]] = {
        "port": "COAP_SERVER_PORT",
        "interfaces": "COAP_SERVER_INTERFACES",
        "interfaces-pattern": "COAP_SERVER_INTERFACES_PATTERN",
        "notify-interval": "COAP_NOTIFY_INTERVAL",
        "ready-port": "COAP_READY_PORT",
        "max-tcp-connections": "COAP_MAX_TCP_CONNECTIONS",
    }
    optFlags: ClassVar[list[list[Any]]] = [
        *negatable("plugtest", True, "Serve the ETSI plugtest resources on BASE / BASE+1"),
        *negatable("benchmark", False, "Answer the benchmark resource (else 5.01)"),
        *negatable("loopback", True, "Listen on loopback addresses"),
        *negatable("external", True, "Listen on non-loopback addresses"),
        *negatable("ipv4", True, "Listen on IPv4"),
        *negatable("ipv6", True, "Listen on IPv6"),
        *negatable("tcp", False, "Serve CoAP over TCP (RFC 8323) too: coap+tcp on the coap port numbers "
                   "(BASE, BASE+100)"),
        ["dtls-only", None, "Only coaps: no plain coap endpoints."],
        ["trust-all", None, "Accept any valid client certificate chain (verified up to the root it brings), "
         "as Californium's --trust-all, over coaps and coaps+tcp; without --client-auth it asks for one "
         "(WANTED). A warning at start."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["port", "p", DEFAULT_PORT, "BASE port: coap BASE, coaps BASE+1, extended BASE+100 and BASE+101.",
         port_number],
        ["interfaces", None, (), "Comma-separated addresses to listen on (overrides the address flags).",
         interface_list],
        ["interfaces-pattern", None, (), "Regular expressions, separated by spaces, over interface names: "
         "listen on the addresses of every interface whose whole name matches one (with --ipv4/--ipv6), "
         "in addition to --interfaces. Example: --interfaces-pattern 'eth[0-9]+ lo'.", interface_patterns],
        ["notify-interval", None, 5.0, "Seconds between notifications of the obs resources.", positive_float],
        ["receive-buffer", None, 4 << 20, "SO_RCVBUF of each socket, bytes.", positive_int],
        ["max-body-size", None, 8192, "Largest request body, bytes (Size1 announced or reassembled from "
         "Block1); larger gets 4.13 with Size1 telling the limit (RFC 7959 section 2.9.3).", positive_int],
        ["max-dedup-entries", None, 1 << 20, "Cap of each endpoint's deduplication store (about 400 bytes "
         "per entry); past it entries go before EXCHANGE_LIFETIME (counted).", positive_int],
        ["max-tcp-connections", None, 10000, "With --tcp: open connections each coap+tcp and coaps+tcp "
         "listener keeps; past it a new one is closed at once (counted in tcp_refused_total"
         "{reason=\"max_connections\"}).", positive_int],
        ["ready-port", None, 0, "Serve the readiness probe http://<metrics-interface>:PORT/ready (0 = off): "
         "200 once the sockets are open and, in Kubernetes, the pods listed.", non_negative_int],
    ]

    def dtls_wanted(self) -> bool:
        """coaps is served only when credentials are given."""
        return self.has_server_credentials()

    def cid_node_id(self) -> int:
        """In a cluster our CIDs start with the node id (issue 6), else 0."""
        cluster = self["cluster"]
        return cluster.node_id if cluster is not None else 0

    def postOptions(self) -> None:
        for name, default in (("plugtest", True), ("benchmark", False), ("loopback", True),
                              ("external", True), ("ipv4", True), ("ipv6", True), ("tcp", False)):
            self[name] = resolve_negatable(self, name, default)
        client_auth = self["client-auth"]
        if self["trust-all"] and not self["trust"]:
            # The DTLS options demand --trust for client authentication; --trust-all stands in for it.
            self["client-auth"] = "none"
        super().postOptions()
        if self["trust-all"]:
            if self["dtls"] is None and not self["tcp"]:
                raise usage.UsageError("--trust-all is about coaps and coaps+tcp clients: give --psk-file, "
                                       "--psk-sandbox or --cert/--key, or --tcp")
            self["client-auth"] = client_auth if client_auth != "none" else "wanted"
            if self["dtls"] is not None:
                self["dtls"].client_auth = ClientAuth(self["client-auth"])
                self["dtls"].trust_all = True
        if self["dtls"] is None and not self["tcp"]:
            unused = [option for option in ("trust", "cert", "key") if self[option]]
            if unused:
                raise usage.UsageError(f"--{unused[0]} is about coaps (DTLS) or coaps+tcp (TLS): give --psk-file, "
                                       "--psk-sandbox or --cert/--key for coaps, or --tcp for coaps+tcp")
        if self["cluster"] is not None:
            if self["dtls"] is None:
                raise usage.UsageError("a DTLS cluster serves coaps: give --psk-file, --psk-sandbox or --cert/--key")
            if self["cid-length"] < CLUSTER_MIN_CID_LENGTH:
                raise usage.UsageError(f"--cid-length: a cluster needs CIDs of at least {CLUSTER_MIN_CID_LENGTH} "
                                       "bytes (the first byte is the node id); see --help")
        if not (self["ipv4"] or self["ipv6"]) and not self["interfaces"]:
            raise usage.UsageError("--no-ipv4 and --no-ipv6 leave nothing to listen on")
        if not (self["loopback"] or self["external"]) and not (self["interfaces"] or self["interfaces-pattern"]):
            raise usage.UsageError("--no-loopback and --no-external leave nothing to listen on")
        if self["dtls-only"] and self["dtls"] is None:
            raise usage.UsageError("--dtls-only needs --psk-file, --psk-sandbox or --cert/--key")
        if self["port"] and self["port"] + EXTENDED_OFFSET + COAPS_OFFSET > 65535:
            raise usage.UsageError("--port: BASE+101 must stay below 65536")


def content_format_option(value: str) -> int:
    """A Content-Format: number, media type or alias (text, json, cbor, xml, link, octet)."""
    from nettester.protocols.coap.message import parse_content_format

    return parse_content_format(value)


def check_method(method: str) -> None:
    """``--method``: one of the request methods (RFC 7252 section 12.1.1, RFC 8132)."""
    if method not in METHODS:
        raise usage.UsageError(f"--method: expected one of {', '.join(METHODS)}; see --help")


class _CoapUriArgument:
    """The URI argument of the client roles; DTLS options apply to coaps:// URIs only."""

    #: Shown when the URI is missing.
    uri_example = "coap://127.0.0.1:5683/test"

    def parseArgs(self, *arguments: str) -> None:
        if not arguments:
            raise usage.UsageError(f"give the URI, e.g. {self.uri_example}")
        if len(arguments) > 1:
            shown = " ".join(repr(argument) for argument in arguments)
            raise usage.UsageError(f"expected one URI, got {len(arguments)} arguments ({shown}); see --help")
        try:
            self["uri"] = parse_uri(arguments[0])  # type: ignore[index]
        except ValueError as error:
            raise usage.UsageError(f"{error}; see --help") from None

    def dtls_wanted(self) -> bool:
        return bool(self["uri"].scheme == "coaps")  # type: ignore[index]


class CoapClientOptions(_CoapUriArgument, DtlsClientOptionsMixin, RoleOptions):
    """``nettester coap-client [options] URI``."""

    serves_metrics = False

    longdesc = (
        "Send one CoAP request (or observe a resource) and print the request and each response "
        "(code, options, RTT, payload). coaps:// uses DTLS 1.2 with PSK (--identity/--secret) or "
        "certificates (--cert/--key/--trust). Block-wise transfers are transparent. " + CLIENT_EXIT_STATUS
    )
    synopsis = "[options] coap[s]://host[:port]/path[?query]"
    optFlags: ClassVar[list[list[Any]]] = [["non", None, "Send a Non-confirmable request (default CON)."]]
    optParameters: ClassVar[list[list[Any]]] = [
        ["method", "m", "GET", "GET, POST, PUT, DELETE, FETCH, PATCH or IPATCH.", lambda v: v.strip().upper()],
        ["payload", None, "", "Request payload (text)."],
        ["content-format", None, None, "Content-Format of the payload (number, media type, or text/json/cbor).",
         content_format_option],
        ["accept", None, None, "Accept: the Content-Format wanted.", content_format_option],
        ["observe", None, 0, "Observe and print N notifications, then deregister (0: a plain request).",
         non_negative_int],
        ["timeout", None, MAX_TRANSMIT_WAIT, "Seconds to wait for the DTLS handshake and the response (with "
         "--observe: each notification); the default is RFC 7252's MAX_TRANSMIT_WAIT.", positive_float],
        QUIET_LOG_LEVEL,
    ]

    def postOptions(self) -> None:
        check_method(self["method"])
        super().postOptions()


class CoapBenchOptions(
    ResultOptionsMixin, ProcessesOptionsMixin, _CoapUriArgument, DtlsClientOptionsMixin, RoleOptions
):
    """``nettester coap-bench [options] URI`` (Californium's BenchmarkClient)."""

    serves_metrics = False

    longdesc = (
        "Load a CoAP server with --clients closed-loop clients, each on its own socket: one request, "
        "its response, the next one after --interval; a failed request is retried after 1 s. Prints "
        "'N requests (R reqs/s, X retransmissions (p%), Y transmission errors (q%), C clients)' every "
        "--report-interval and a summary with RTT percentiles and the requests-per-client histogram. "
        "A failed request counts as one of the client's --requests. Exit status: 0 every request answered; "
        "1 some failed; 2 a bad command line; 3 none answered."
    )
    synopsis = "[options] coap[s]://host[:port]/benchmark?rlen=40"
    uri_example = "coap://127.0.0.1:5783/benchmark?rlen=40"
    envVars: ClassVar[dict[str, str]] = {"clients": "COAP_CLIENT_COUNT"}
    optFlags: ClassVar[list[list[Any]]] = [
        ["con", None, "Confirmable requests (default)."],
        ["non", None, "Non-confirmable requests."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["clients", "c", 2000, "Clients, each with its own source port.", positive_int],
        ["requests", None, 0, "Requests per client (0: until stopped).", non_negative_int],
        ["nstart", None, 1, "Requests in flight per client (RFC 7252 NSTART).", positive_int],
        ["method", "m", "GET", "GET, POST, PUT...", lambda v: v.strip().upper()],
        ["interval", None, 0.0, "Seconds between a response and the client's next request.", non_negative_float],
        ["timeout", None, 10.0, "Seconds a request may take, retransmissions included; then it is a "
         "transmission error.",
         positive_float],
        ["payload-random", None, 0, "Send N random payload bytes with each request.", non_negative_int],
        ["report-interval", None, 10.0, "Seconds between progress lines (0: none).", non_negative_float],
    ]

    def postOptions(self) -> None:
        if self["con"] and self["non"]:
            raise usage.UsageError("--con and --non contradict each other")
        check_method(self["method"])
        super().postOptions()

    def merged_run(self) -> MergedRun:
        import sys

        from nettester.protocols.coap.bench import bench_config
        from nettester.protocols.coap.benchlines import BenchPrinter, BenchProcessesRun

        printer = BenchPrinter(sys.__stdout__ or sys.stdout, self["log-format"] == "json")
        return BenchProcessesRun(bench_config(self).describe(), self["report"], self["report-interval"], printer)


class CoapReceiveTestOptions(ResultOptionsMixin, _CoapUriArgument, DtlsClientOptionsMixin, RoleOptions):
    """``nettester coap-receivetest [options] [URI]`` (Californium's ReceivetestClient)."""

    serves_metrics = False

    longdesc = (
        "POST requests?dev=<uuid>&rid=<id>&ep to the extended server and print the history it keeps "
        "for this device (which requests arrived, when, from where) with the RTT. The device UUID "
        "lives in --uuid-file so runs accumulate; --reset-uuid starts a new device. Exit status: 0 the "
        "history was printed; 1 the server answered something else; 2 a bad command line; 3 no response "
        "(nobody listening, timeout, Reset, failed DTLS handshake)."
    )
    synopsis = "[options] [coap[s]://host[:port]/requests]"
    optFlags: ClassVar[list[list[Any]]] = [
        ["json", None, "Ask for the history as JSON."],
        ["cbor", None, "Ask for the history as CBOR."],
        ["reset-uuid", None, "Create a new device UUID."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["uuid-file", None, "", "File keeping the device UUID (default ~/.nettester/coap-receivetest.uuid)."],
        ["timeout", None, MAX_TRANSMIT_WAIT, "Seconds to wait for the DTLS handshake and the response; the "
         "default is RFC 7252's MAX_TRANSMIT_WAIT.", positive_float],
        QUIET_LOG_LEVEL,
    ]
    uri_example = "coap://127.0.0.1:5783/requests"

    def parseArgs(self, *arguments: str) -> None:
        super().parseArgs(*(arguments or (self.uri_example,)))

    def postOptions(self) -> None:
        if self["json"] and self["cbor"]:
            raise usage.UsageError("--json and --cbor contradict each other")
        self["uuid-file"] = self["uuid-file"] or DEFAULT_UUID_FILE
        super().postOptions()
