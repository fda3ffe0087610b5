"""CoAP server throughput on loopback: CON GET ``benchmark?rlen=40``, dedup on.

The server (UdpLink -> CoapEndpoint -> Site with the extended resources) runs
in a child process pinned to one core; the load is ``udpload`` (the shared C
generator, built on the fly) pinned to the other core. Three phases:

1. fresh: ``--sockets`` x ``--window`` closed-loop clients;
2. churn: ``--churn`` clients come and go (batches of 1,000 new source ports),
   so the dedup store and every per-peer structure fill with dead peers;
3. after churn: phase 1 again. The target is at most 10 % below phase 1;
4. coaps: ``--coaps-clients`` closed-loop DTLS 1.2 clients (PSK,
   TLS_PSK_WITH_AES_128_CCM_8, Connection ID) from ``coap-bench``'s engine in
   a child process on the load core. A Python generator cannot saturate the
   server, so the figure to read is the server's answers per CPU-second
   (handshakes included).

Prints the udpload line of each phase and a summary:
``coap benchmark: fresh=N req/s after-churn=N req/s (C clients came and went, -P %)``
followed by the server's answers per CPU-second of its own process in both
phases: on a shared machine the wall-clock rate moves with the neighbours'
load, the CPU cost per request does not.

    python3 benchmarks/coap_server.py
    python3 benchmarks/coap_server.py --seconds 5 --churn 5000
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
UDPLOAD_SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "tools", "udpload", "udpload.c")
PATH = "benchmark?rlen=40"


PSK_IDENTITY, PSK_SECRET = b"bench", b"benchmark-secret"


def serve(receive_buffer: int, coaps: bool) -> None:
    """Child: the CoAP server on 127.0.0.1, port printed; runs until stdin closes."""
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol

    from nettester.protocols.coap.endpoint import CoapEndpoint
    from nettester.protocols.coap.resources import build_site
    from nettester.protocols.coap.resources.extended import extended_resources
    from nettester.udplink import UdpLink

    if coaps:
        from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
        from nettester.protocols.dtls.connection import DtlsConfiguration
        from nettester.protocols.dtls.credentials import PskStore
        from nettester.protocols.dtls.endpoint import DtlsEndpoint

        configuration = DtlsConfiguration(is_client=False, psk_store=PskStore({PSK_IDENTITY: PSK_SECRET}),
                                          cid_generator=NodeConnectionIdGenerator(6, 0))
        link: Any = DtlsEndpoint(reactor, server_configuration=configuration)
    else:
        link = UdpLink(receive_buffer=receive_buffer)
    endpoint = CoapEndpoint(link, reactor)
    site = build_site(reactor, extended_resources(True, "benchmark", reactor.seconds, reactor.seconds()))
    site.attach(endpoint)
    port = reactor.listenUDP(0, link, interface="127.0.0.1")

    class StopOnEof(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            stats = endpoint.stats
            sys.stderr.write(f"server: received={stats.received} sent={stats.sent} duplicates={stats.duplicates} "
                             f"dedup-entries={len(endpoint.core._dedup)}\n")
            reactor.stop()

    stdio.StandardIO(StopOnEof())
    print(port.getHost().port, flush=True)
    reactor.run()


def coaps_load(port: int, clients: int, requests: int) -> None:
    """Child: ``clients`` coap-bench clients over DTLS, ``requests`` each; prints the summary."""
    from twisted.internet import reactor

    from nettester.protocols.coap.bench import BenchConfig, CoapBenchService
    from nettester.protocols.coap.client import parse_uri
    from nettester.protocols.dtls.connection import DtlsConfiguration
    from nettester.protocols.dtls.endpoint import DtlsEndpoint

    configuration = DtlsConfiguration(is_client=True, psk_identity=PSK_IDENTITY, psk=PSK_SECRET,
                                      cipher_suites=("TLS_PSK_WITH_AES_128_CCM_8",))
    config = BenchConfig(parse_uri(f"coaps://127.0.0.1:{port}/{PATH}"), clients=clients, requests=requests,
                         report_interval=0)
    bench = CoapBenchService(reactor, config, lambda: DtlsEndpoint(reactor, client_configuration=configuration),
                             sys.stdout)
    bench.done.addCallback(lambda _: reactor.stop())
    reactor.callWhenRunning(bench.startService)
    reactor.run()


def run_coaps(args: argparse.Namespace) -> str:
    """Phase 4: returns the result line."""
    command = [sys.executable, os.path.abspath(__file__), "--serve", "--coaps"]
    if shutil.which("taskset"):
        command = ["taskset", "-c", args.server_core] + command
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        load_command = [sys.executable, os.path.abspath(__file__), "--coaps-load", str(port),
                        "--coaps-clients", str(args.coaps_clients), "--coaps-requests", str(args.coaps_requests)]
        if shutil.which("taskset"):
            load_command = ["taskset", "-c", args.load_core] + load_command
        before = cpu_seconds(server.pid)
        output = subprocess.run(load_command, check=True, capture_output=True, text=True).stdout
        used = cpu_seconds(server.pid) - before
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=10)
    summary = next(line for line in output.splitlines() if " requests in " in line)
    answers = int(summary.split()[0])
    return (f"coaps (PSK CCM-8, CID): {summary}; server CPU {used:.1f} s = "
            f"{answers / used if used else 0:.0f} answers per CPU-second")


def build_udpload(directory: str) -> str:
    binary = os.path.join(directory, "udpload")
    subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", binary, UDPLOAD_SOURCE], check=True)
    return binary


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(udpload: str, port: int, sockets: int, window: int, seconds: float, core: str) -> tuple[float, str]:
    """One udpload run; its rate and its line."""
    command = [udpload, "--proto", "coap", "--port", str(port), "--path", PATH, "--con",
               "--sockets", str(sockets), "--window", str(window), "--duration", str(seconds)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", core] + command
    line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
    match = re.search(r"rate=([0-9.]+)", line)
    return (float(match.group(1)) if match else 0.0), line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--coaps", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--coaps-load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--coaps-clients", type=int, default=100, help="DTLS clients of phase 4 (0 skips it)")
    parser.add_argument("--coaps-requests", type=int, default=500, help="requests per DTLS client")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of phases 1 and 3")
    parser.add_argument("--sockets", type=int, default=64)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--churn", type=int, default=5000, help="clients that come and go in phase 2")
    parser.add_argument("--receive-buffer", type=int, default=4 << 20)
    parser.add_argument("--server-core", default="1")
    parser.add_argument("--load-core", default="0")
    args = parser.parse_args()
    if args.serve:
        serve(args.receive_buffer, args.coaps)
        return
    if args.coaps_load:
        coaps_load(args.coaps_load, args.coaps_clients, args.coaps_requests)
        return
    with tempfile.TemporaryDirectory() as directory:
        udpload = build_udpload(directory)
        command = [sys.executable, os.path.abspath(__file__), "--serve", "--receive-buffer", str(args.receive_buffer)]
        if shutil.which("taskset"):
            command = ["taskset", "-c", args.server_core] + command
        server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            load(udpload, port, args.sockets, args.window, 1.0, args.load_core)  # warm-up
            before = cpu_seconds(server.pid)
            fresh, line = load(udpload, port, args.sockets, args.window, args.seconds, args.load_core)
            fresh_cpu = cpu_seconds(server.pid) - before
            print("fresh:      ", line, flush=True)
            for batch in range((args.churn + 999) // 1000):
                _, line = load(udpload, port, min(1000, args.churn - batch * 1000), 1, 1.0, args.load_core)
                print("churn:      ", line, flush=True)
            before = cpu_seconds(server.pid)
            after, line = load(udpload, port, args.sockets, args.window, args.seconds, args.load_core)
            after_cpu = cpu_seconds(server.pid) - before
            print("after churn:", line, flush=True)
        finally:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
    change = (after - fresh) / fresh * 100 if fresh else 0.0
    print(f"coap benchmark: fresh={fresh:.0f} req/s after-churn={after:.0f} req/s "
          f"({args.churn} clients came and went, {change:+.1f} %)")
    fresh_per_cpu = fresh * args.seconds / fresh_cpu if fresh_cpu else 0.0
    after_per_cpu = after * args.seconds / after_cpu if after_cpu else 0.0
    print(f"server CPU: fresh={fresh_per_cpu:.0f} answers per CPU-second ({fresh_cpu:.1f} s), "
          f"after-churn={after_per_cpu:.0f} ({after_cpu:.1f} s)")
    if args.coaps_clients:
        print(run_coaps(args))


if __name__ == "__main__":
    main()
