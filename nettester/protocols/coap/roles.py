"""The ``coap`` module's roles, ready for a plugin file under ``nettester/plugins/``.

Heavy imports happen inside the factories, so listing roles stays fast and
twistd can install its reactor first. The plugin file only wraps these in
an IPlugin-providing ProtocolModule.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any

from twisted.application.service import IService

from nettester.interfaces import ILocalScenario
from nettester.logs import Logger
from nettester.module import Role
from nettester.options import RoleOptions
from nettester.protocols.coap.options import (
    CoapBenchOptions,
    CoapClientOptions,
    CoapReceiveTestOptions,
    CoapServerOptions,
)

log = Logger()

SUMMARY = "CoAP extended plugtest server (coap/coaps), client, benchmark and receive test (RFC 7252/7959/7641)."


def build_server(reactor: Any, options: RoleOptions) -> IService:
    """The coap-server service for parsed options."""
    from nettester.protocols.coap.parameters import TransmissionParameters
    from nettester.protocols.coap.server import CoapServerService, local_addresses, pattern_addresses

    addresses = list(options["interfaces"])
    if options["interfaces-pattern"]:
        # Californium: the interfaces matching a pattern, next to those named.
        addresses += [address for address in pattern_addresses(options["interfaces-pattern"], options["ipv4"],
                                                                options["ipv6"]) if address not in addresses]
    elif not addresses:
        addresses = local_addresses(options["ipv4"], options["ipv6"], options["loopback"], options["external"])
    if options["trust-all"]:
        log.warn("--trust-all: any client certificate chain that verifies up to its own root is accepted; "
                 "client identities are not authenticated by a trust anchor", event="coap_trust_all")
    tls = None
    if options["tcp"]:
        from nettester.protocols.coap.tls import server_tls

        tls = server_tls(options)  # coaps+tcp: --cert/--key or a self-signed certificate
    dtls = options["dtls"]
    factory = None
    if dtls is not None:
        from nettester.protocols.dtls.endpoint import DtlsEndpoint

        factory = partial(DtlsEndpoint, reactor, server_configuration=dtls, max_connections=options["max-connections"],
                          max_half_open=options["max-half-open"], half_open_timeout=options["half-open-timeout"])

    return CoapServerService(
        reactor, options["port"], addresses, plugtest=options["plugtest"], benchmark=options["benchmark"],
        notify_interval=options["notify-interval"], receive_buffer=options["receive-buffer"],
        dtls_link_factory=factory, dtls_only=bool(options["dtls-only"]), tcp=options["tcp"], tls=tls,
        max_tcp_connections=options["max-tcp-connections"],
        params=TransmissionParameters(max_dedup_entries=options["max-dedup-entries"],
                                      max_body_size=options["max-body-size"]),
        cluster=options["cluster"],
        ready_port=options["ready-port"], ready_interface=options["metrics-interface"],
    )


def build_client(reactor: Any, options: RoleOptions) -> IService:
    """The coap-client service for parsed options."""
    from nettester.protocols.coap.client import make_client_service

    return make_client_service(reactor, options, sys.__stdout__ or sys.stdout)


def build_bench(reactor: Any, options: RoleOptions) -> IService:
    """The coap-bench service for parsed options."""
    from nettester.protocols.coap.bench import make_bench_service

    return make_bench_service(reactor, options, sys.__stdout__ or sys.stdout)


def build_receivetest(reactor: Any, options: RoleOptions) -> IService:
    """The coap-receivetest service for parsed options."""
    from nettester.protocols.coap.receivetest import make_receivetest_service

    return make_receivetest_service(reactor, options, sys.__stdout__ or sys.stdout)


def local(reactor: Any, options: RoleOptions) -> ILocalScenario:
    """The module's part of ``nettester local``."""
    from nettester.protocols.coap.local import CoapLocalScenario

    return CoapLocalScenario(reactor)


ROLES = (
    Role("coap-server", "Extended CoAP plugtest server: plugtest, benchmark, receive test, mycontext (coap/coaps).",
         CoapServerOptions, build_server),
    Role("coap-client", "One CoAP request or observation, printed in readable blocks.", CoapClientOptions,
         build_client),
    Role("coap-bench", "Many closed-loop CoAP clients (Californium BenchmarkClient): reqs/s, RTT, errors.",
         CoapBenchOptions, build_bench),
    Role("coap-receivetest", "POST to the receive-test resource and print which requests arrived.",
         CoapReceiveTestOptions, build_receivetest),
)
