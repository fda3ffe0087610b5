"""CoAP server throughput on loopback: CON GET ``benchmark?rlen=40``, dedup on.

The server is the shipped role, ``nettester coap-server --benchmark`` (extended
endpoints only, on 127.0.0.1), in a child process pinned to one core; the load
is ``udpload`` (the shared C generator, built on the fly) pinned to the other
core. The phases:

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
    python3 benchmarks/coap_server.py --tcp-vs libcoap     # coap+tcp: 64 connections x 8 in flight
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

from harness import ROOT, UDPLOAD_SOURCE, alternate, build_udpload, free_udp_ports, median, pinned, tree_cpu_seconds

sys.path.insert(0, ROOT)
PATH = "benchmark?rlen=40"


PSK_IDENTITY, PSK_SECRET = b"bench", b"benchmark-secret"


class ServerRole:
    """``nettester coap-server --benchmark`` on 127.0.0.1, pinned to a core, stopped with SIGTERM.

    coap on BASE+100 and coaps (PSK ``bench``) on BASE+101; on exit the role's
    final summary line is kept in ``final_summary``.
    """

    def __init__(self, receive_buffer: int, core: str | None, directory: str, workers: int = 1,
                 tcp: bool = False) -> None:
        self.base = free_base_port()
        self.workers = workers
        psk_file = os.path.join(directory, "psk.txt")
        with open(psk_file, "w") as out:
            out.write(f"{PSK_IDENTITY.decode()}={base64.b64encode(PSK_SECRET).decode()}\n")
        command = [sys.executable, "-m", "nettester", "coap-server", "--benchmark", "--no-plugtest",
                   "--interfaces", "127.0.0.1", "--port", str(self.base), "--psk-file", psk_file,
                   "--receive-buffer", str(receive_buffer), "--stats-interval", "0", "--workers", str(workers)]
        if tcp:
            command.append("--tcp")  # coap+tcp on BASE+100 too
        self.command = pinned(core, command) if core is not None else command
        self.final_summary = ""

    @property
    def coap_port(self) -> int:
        return self.base + 100

    @property
    def coaps_port(self) -> int:
        return self.base + 101

    def __enter__(self) -> ServerRole:
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        ready = f"worker {self.workers - 1} (pid" if self.workers > 1 else f"coaps://127.0.0.1:{self.coaps_port}"
        for line in self.process.stdout:
            if ready in line:
                return self
        raise SystemExit(f"coap-server did not start: {' '.join(self.command)}")

    def __exit__(self, *exc_info: object) -> None:
        self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=30)
        self.final_summary = next((line.split("final summary: ", 1)[1] for line in output.splitlines()
                                   if "coap-server final summary: " in line), "")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process (and its workers) so far."""
        return tree_cpu_seconds(self.process.pid)


def free_base_port() -> int:
    """A BASE with BASE+100 and BASE+101 free on 127.0.0.1 (UDP)."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        sockets = []
        try:
            for port in (base + 100, base + 101):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise SystemExit("no free UDP port pair on 127.0.0.1")


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


def coaps_run(args: argparse.Namespace, server: ServerRole, load_core: str | None) -> tuple[int, float, str]:
    """coap-bench's DTLS clients against ``server``: (answers, server CPU seconds, the bench's summary line)."""
    command = [sys.executable, os.path.abspath(__file__), "--coaps-load", str(server.coaps_port),
               "--coaps-clients", str(args.coaps_clients), "--coaps-requests", str(args.coaps_requests)]
    before = server.cpu_seconds()
    output = subprocess.run(pinned(load_core, command) if load_core is not None else command, check=True,
                            capture_output=True, text=True).stdout
    used = server.cpu_seconds() - before
    summary = next(line for line in output.splitlines() if " requests in " in line)
    return int(summary.split()[0]), used, summary


def run_coaps(args: argparse.Namespace, directory: str) -> str:
    """Phase 4: returns the result line."""
    with ServerRole(args.receive_buffer, args.server_core, directory) as server:
        answers, used, summary = coaps_run(args, server, args.load_core)
    return (f"coaps (PSK CCM-8, CID): {summary}; server CPU {used:.1f} s = "
            f"{answers / used if used else 0:.0f} answers per CPU-second\nserver: {server.final_summary}")


def load(udpload: str, port: int, sockets: int, window: int, seconds: float, core: str,
         path: str = PATH) -> tuple[float, str]:
    """One udpload run; its rate and its line."""
    command = [udpload, "--proto", "coap", "--port", str(port), "--path", path, "--con",
               "--sockets", str(sockets), "--window", str(window), "--duration", str(seconds)]
    line = subprocess.run(pinned(core, command), check=True, capture_output=True, text=True).stdout.strip()
    match = re.search(r"rate=([0-9.]+)", line)
    return (float(match.group(1)) if match else 0.0), line


def run_vs_libcoap(args: argparse.Namespace, udpload: str, directory: str) -> None:
    """``--vs libcoap``: ours and libcoap's ``coap-server-notls``, each fresh, pinned to the same core,
    the same udpload load, alternating; prints the median ratio of the rates."""
    libcoap = shutil.which("coap-server-notls")
    if libcoap is None:
        raise SystemExit("--vs libcoap needs coap-server-notls (apt-get install libcoap3-bin)")

    per_cpu: dict[str, list[float]] = {"ours": [], "theirs": []}

    def ours() -> float:
        with ServerRole(args.receive_buffer, args.server_core, directory) as server:
            load(udpload, server.coap_port, args.sockets, args.window, 1.0, args.load_core)  # warm-up
            before = server.cpu_seconds()
            rate, line = load(udpload, server.coap_port, args.sockets, args.window, args.seconds, args.load_core)
            used = server.cpu_seconds() - before
        per_cpu["ours"].append(rate * args.seconds / used if used else 0.0)
        print(f"  nettester: {line} server_cpu_s={used:.2f} per_cpu_second={per_cpu['ours'][-1]:.0f}", flush=True)
        return rate

    def theirs() -> float:
        port = free_udp_ports(1)[0]
        process = subprocess.Popen(pinned(args.server_core, [libcoap, "-A", "127.0.0.1", "-p", str(port)]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            load(udpload, port, args.sockets, args.window, 1.0, args.load_core, path="time")  # warm-up
            before = tree_cpu_seconds(process.pid)
            rate, line = load(udpload, port, args.sockets, args.window, args.seconds, args.load_core, path="time")
            used = tree_cpu_seconds(process.pid) - before
        finally:
            process.terminate()
            process.wait(timeout=10)
        per_cpu["theirs"].append(rate * args.seconds / used if used else 0.0)
        print(f"  libcoap:   {line} server_cpu_s={used:.2f} per_cpu_second={per_cpu['theirs'][-1]:.0f}", flush=True)
        return rate

    ratios = alternate(args.rounds, ours, theirs, "nettester/libcoap req/s, round")
    cpu_ratios = [a / b if b else 0.0 for a, b in zip(per_cpu["ours"], per_cpu["theirs"], strict=True)]
    print(f"coap-server vs libcoap 4.3 coap-server-notls: median ratio {median(ratios):.2f}, answers per server "
          f"CPU-second median ratio {median(cpu_ratios):.2f} ({args.rounds} alternating rounds, both on core "
          f"{args.server_core}, udpload {args.sockets}x{args.window} {args.seconds:g} s; ours GET {PATH}, libcoap "
          "GET time; goal >= 0.9)")


def tcp_load(port: int, path: str, args: argparse.Namespace, seconds: float) -> tuple[int, float, str]:
    """``coap-bench`` over coap+tcp, ``--tcp-connections`` x ``--tcp-window`` for ``seconds``, pinned to the
    load core: (answers, reqs/s, its summary line)."""
    command = [sys.executable, "-m", "nettester", "coap-bench", "--clients", str(args.tcp_connections),
               "--nstart", str(args.tcp_window), "--duration", str(seconds), "--report-interval", "0",
               "--log-level", "warn", f"coap+tcp://127.0.0.1:{port}/{path}"]
    output = subprocess.run(pinned(args.load_core, command), cwd=ROOT, capture_output=True, text=True).stdout
    match = re.search(r"^(\d+) requests in ([0-9.]+) s: (\d+) reqs/s.*$", output, re.MULTILINE)
    if match is None:
        raise SystemExit(f"coap-bench gave no summary: {output}")
    return int(match.group(1)), int(match.group(1)) / float(match.group(2)), match.group(0)


def run_tcp_vs_libcoap(args: argparse.Namespace, directory: str) -> None:
    """``--tcp-vs libcoap``: coap+tcp requests/s of ours and of libcoap's ``coap-server-notls`` (TCP on
    the same port number), each fresh and pinned to the server core, the same coap-bench load,
    alternating; prints the median ratio of the rates and of the answers per server CPU-second."""
    libcoap = shutil.which("coap-server-notls")
    if libcoap is None:
        raise SystemExit("--tcp-vs libcoap needs coap-server-notls (apt-get install libcoap3-bin)")
    per_cpu: dict[str, list[float]] = {"ours": [], "theirs": []}

    def measure(name: str, port: int, path: str, cpu_seconds: Callable[[], float]) -> float:
        tcp_load(port, path, args, 1.0)  # warm-up
        before = cpu_seconds()
        answers, rate, line = tcp_load(port, path, args, args.seconds)
        used = cpu_seconds() - before
        per_cpu[name].append(answers / used if used else 0.0)
        print(f"  {'nettester' if name == 'ours' else 'libcoap  '}: {line}; server CPU {used:.1f} s", flush=True)
        return rate

    def ours() -> float:
        with ServerRole(args.receive_buffer, args.server_core, directory, tcp=True) as server:
            return measure("ours", server.coap_port, PATH, server.cpu_seconds)

    def theirs() -> float:
        port = free_udp_ports(1)[0]
        process = subprocess.Popen(pinned(args.server_core, [libcoap, "-A", "127.0.0.1", "-p", str(port)]),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return measure("theirs", port, "time", lambda: tree_cpu_seconds(process.pid))
        finally:
            process.terminate()
            process.wait(timeout=10)

    ratios = alternate(args.rounds, ours, theirs, "coap+tcp nettester/libcoap req/s, round")
    cpu_ratios = [a / b if b else 0.0 for a, b in zip(per_cpu["ours"], per_cpu["theirs"], strict=True)]
    print(f"coap+tcp coap-server vs libcoap 4.3 coap-server-notls: median ratio {median(ratios):.2f} req/s, "
          f"{median(cpu_ratios):.2f} answers per server CPU-second ({args.rounds} alternating rounds, both on core "
          f"{args.server_core}, coap-bench {args.tcp_connections} TCP connections x {args.tcp_window} in flight "
          f"{args.seconds:g} s on core {args.load_core}; ours GET {PATH}, libcoap GET time)")


def run_workers_scaling(args: argparse.Namespace, udpload: str, directory: str) -> None:
    """``--workers-scaling``: answers per server CPU-second (every worker's CPU counted) with
    ``--workers 2`` against 1, coap (udpload) and coaps (coap-bench's DTLS clients), alternating."""

    def coap(workers: int) -> Callable[[], float]:
        def run() -> float:
            with ServerRole(args.receive_buffer, None, directory, workers=workers) as server:
                load(udpload, server.coap_port, args.sockets, args.window, 1.0, args.load_core)  # warm-up
                before = server.cpu_seconds()
                rate, line = load(udpload, server.coap_port, args.sockets, args.window, args.seconds, args.load_core)
                used = server.cpu_seconds() - before
            per_cpu = rate * args.seconds / used if used else 0.0
            print(f"  coap --workers {workers}: {rate:.0f} answers/s wall, server CPU {used:.1f} s, "
                  f"{per_cpu:.0f} answers per CPU-second | {line}", flush=True)
            return per_cpu
        return run

    def coaps(workers: int) -> Callable[[], float]:
        def run() -> float:
            with ServerRole(args.receive_buffer, None, directory, workers=workers) as server:
                answers, used, summary = coaps_run(args, server, None)
            per_cpu = answers / used if used else 0.0
            print(f"  coaps --workers {workers}: {summary}; server CPU {used:.1f} s, {per_cpu:.0f} answers per "
                  "CPU-second", flush=True)
            return per_cpu
        return run

    coap_ratios = alternate(args.rounds, coap(2), coap(1), "coap per-CPU-second workers 2/1, round")
    coaps_ratios = alternate(args.rounds, coaps(2), coaps(1), "coaps per-CPU-second workers 2/1, round")
    print(f"coap-server --workers 2 vs 1, answers per server CPU-second: coap median ratio "
          f"{median(coap_ratios):.2f}, coaps (PSK CCM-8, CID) median ratio {median(coaps_ratios):.2f} "
          f"({args.rounds} alternating rounds; goal >= 0.9)")


def run_bench_processes(args: argparse.Namespace) -> None:
    """``--bench-processes``: ``coap-bench --processes 2`` against 1 process, both against libcoap's
    ``coap-server-notls`` pinned to the server core, each for ``--bench-seconds``; the rate is that of
    Californium's summary line, which the parent of ``--processes`` prints for the whole run (every
    answer over its wall time)."""
    libcoap = shutil.which("coap-server-notls")
    if libcoap is None:
        raise SystemExit("--bench-processes needs coap-server-notls (apt-get install libcoap3-bin)")
    port = free_udp_ports(1)[0]
    server = subprocess.Popen(pinned(args.server_core, [libcoap, "-A", "127.0.0.1", "-p", str(port)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def bench(processes: int) -> Callable[[], float]:
        def run() -> float:
            command = [sys.executable, "-m", "nettester", "coap-bench", "--processes", str(processes),
                       "--clients", str(args.bench_clients), "--duration", str(args.bench_seconds),
                       "--report-interval", "0", "--log-level", "warn", f"coap://127.0.0.1:{port}/time"]
            output = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            # Californium's summary line: one process's, or the parent's for the whole run (every
            # process's answers over the run's wall time).
            found = re.search(r"^(\d+) requests in [0-9.]+ s: (\d+) reqs/s", output, re.MULTILINE)
            assert found is not None, output
            rate = float(found.group(2))
            print(f"  coap-bench --processes {processes}: {rate:.0f} reqs/s ({found.group(1)} requests)", flush=True)
            return rate
        return run

    try:
        bench(1)()  # warm-up
        ratios = alternate(args.rounds, bench(2), bench(1), "coap-bench reqs/s processes 2/1, round")
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"coap-bench --processes 2 vs 1 against libcoap coap-server-notls: median ratio {median(ratios):.2f} "
          f"({args.rounds} alternating rounds, {args.bench_clients} clients for {args.bench_seconds:g} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--vs", choices=["libcoap"], help="only compare with libcoap on one core, alternating")
    parser.add_argument("--workers-scaling", action="store_true",
                        help="only compare --workers 2 with 1: answers per server CPU-second, coap and coaps")
    parser.add_argument("--bench-processes", action="store_true",
                        help="only compare coap-bench --processes 2 with 1 against libcoap's coap-server")
    parser.add_argument("--bench-clients", type=int, default=200)
    parser.add_argument("--bench-seconds", type=float, default=5.0,
                        help="--duration of each coap-bench run (a fixed window: a fixed count of requests per "
                             "client would wait for the last client's retransmission, 2 s or more)")
    parser.add_argument("--tcp-vs", choices=["libcoap"],
                        help="only compare coap+tcp with libcoap's server over TCP, alternating (coap-bench load)")
    parser.add_argument("--tcp-connections", type=int, default=64)
    parser.add_argument("--tcp-window", type=int, default=8, help="requests in flight per TCP connection")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the comparisons")
    args = parser.parse_args()
    if args.tcp_vs:
        with tempfile.TemporaryDirectory() as directory:
            run_tcp_vs_libcoap(args, directory)
        return
    if args.bench_processes:
        run_bench_processes(args)
        return
    if args.coaps_load:
        coaps_load(args.coaps_load, args.coaps_clients, args.coaps_requests)
        return
    with tempfile.TemporaryDirectory() as directory:
        udpload = build_udpload(directory)
        if udpload is None:
            raise SystemExit(f"cannot build udpload from {UDPLOAD_SOURCE}: gcc and the shared source are needed")
        if args.vs or args.workers_scaling:
            (run_vs_libcoap if args.vs else run_workers_scaling)(args, udpload, directory)
            return
        with ServerRole(args.receive_buffer, args.server_core, directory) as server:
            port = server.coap_port
            load(udpload, port, args.sockets, args.window, 1.0, args.load_core)  # warm-up
            before = server.cpu_seconds()
            fresh, line = load(udpload, port, args.sockets, args.window, args.seconds, args.load_core)
            fresh_cpu = server.cpu_seconds() - before
            print("fresh:      ", line, flush=True)
            for batch in range((args.churn + 999) // 1000):
                _, line = load(udpload, port, min(1000, args.churn - batch * 1000), 1, 1.0, args.load_core)
                print("churn:      ", line, flush=True)
            before = server.cpu_seconds()
            after, line = load(udpload, port, args.sockets, args.window, args.seconds, args.load_core)
            after_cpu = server.cpu_seconds() - before
            print("after churn:", line, flush=True)
        print("server:", server.final_summary)
        coaps_line = run_coaps(args, directory) if args.coaps_clients else ""
    change = (after - fresh) / fresh * 100 if fresh else 0.0
    print(f"coap benchmark: fresh={fresh:.0f} req/s after-churn={after:.0f} req/s "
          f"({args.churn} clients came and went, {change:+.1f} %)")
    fresh_per_cpu = fresh * args.seconds / fresh_cpu if fresh_cpu else 0.0
    after_per_cpu = after * args.seconds / after_cpu if after_cpu else 0.0
    print(f"server CPU: fresh={fresh_per_cpu:.0f} answers per CPU-second ({fresh_cpu:.1f} s), "
          f"after-churn={after_per_cpu:.0f} ({after_cpu:.1f} s)")
    if coaps_line:
        print(coaps_line)


if __name__ == "__main__":
    main()
