"""Capacity of keepalive-server and keepalive-client: hold N connections on loopback.

Servers and clients run in separate processes (the real KeepAliveServerService
and KeepAliveClientService on the real reactor). One process can only hold
RLIMIT_NOFILE sockets, so the connections are split over P server processes,
each on its own port, and P client processes, one per server; each client
process thus reaches its own destination port, which keeps every process
well inside the ephemeral port range.

Phases: ramp up (connections spread at random over --ramp seconds), settle
for three keep-alive intervals, hold for --hold seconds (the measured
window), report, stop with FINs.
Prints one line: connections held, keep-alive round trips per second during
the hold, false errors (any reset, FIN, missing keep-alive or response,
failed connect or invalid message before the stop: must be 0), RSS per
connection on each side (RSS growth over the process's start / connection
count; kernel socket buffers are not part of RSS), and CPU used during the
hold (percent of one core, summed over the processes of each side), and the
worst reactor lag seen in any process of each side during the hold (how late
a 100 ms timer ran: the time a keep-alive can wait inside a busy process).

    python3 benchmarks/keepalive_capacity.py                      # 50,000 connections held for 60 s
    python3 benchmarks/keepalive_capacity.py --connections 2000 --hold 10 --ramp 5

The orchestrator talks to its children over stdin/stdout, one line per
command (``mark``, ``report``, ``stop``) and answer; it kills children that
overrun the time budget, so the benchmark always ends by itself.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import resource
import subprocess
import sys
import time
from typing import Any

from harness import ROOT

FD_MARGIN = 200  # descriptors a process keeps for itself (stdio, epoll, listening socket...)
SETTLE_INTERVALS = 3  # keep-alive intervals between the end of the ramp and the hold window (backlog drains)
LAG_TICK = 0.1  # seconds between two checks of a process's reactor lag


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares differing by at most one."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


# ------------------------------------------------------------------ children


def run_child(role: str, ports: list[int], connections: int, interval: float, ramp: float, listeners: int) -> None:
    """A server or client process driven by line commands on stdin."""
    raise_fd_limit()
    sys.path.insert(0, ROOT)
    from twisted.internet import reactor, stdio
    from twisted.internet.defer import DeferredList
    from twisted.internet.task import LoopingCall
    from twisted.logger import LogLevel, globalLogBeginner
    from twisted.protocols.basic import LineReceiver

    from nettester.logs import make_observer
    from nettester.protocols.keepalive.client import KeepAliveClientService
    from nettester.protocols.keepalive.server import KeepAliveServerService
    from nettester.protocols.keepalive.wire import ClientTiming

    # Only warnings and errors reach stderr: the hot path never formats a log line.
    globalLogBeginner.beginLoggingTo([make_observer("text", LogLevel.warn, sys.stderr)],
                                     redirectStandardIO=False)
    base_rss = rss_bytes()
    services: list[Any]
    if role == "server":
        services = [KeepAliveServerService(reactor, 0, "127.0.0.1", keepalive_timeout=4 * interval, backlog=4096)
                    for _ in range(listeners)]
    else:
        timing = ClientTiming(keepalive_interval=interval, response_timeout=2 * interval, dummy_interval=0.0)
        services = [KeepAliveClientService(reactor, "127.0.0.1", port, share, timing, ramp_up=ramp,
                                           reconnect_delay=1.0, connect_timeout=30.0)
                    for port, share in zip(ports, split(connections, len(ports)), strict=True)]
    marks: dict[str, float] = {}
    # How late the reactor runs a 100 ms timer: the time a keep-alive waits in this process.
    lag = {"last": time.monotonic(), "max": 0.0}

    def measure_lag() -> None:
        now = time.monotonic()
        lag["max"] = max(lag["max"], now - lag["last"] - LAG_TICK)
        lag["last"] = now

    LoopingCall(measure_lag).start(LAG_TICK, now=False)

    def round_trips() -> int:
        return sum(service.keepalives.value if role == "server" else service.answered.value for service in services)

    def rtt_total() -> float:
        return sum(service.rtt_total for service in services) if role == "client" else 0.0

    def held() -> int:
        return sum(len(service.open) for service in services)

    def errors(service: Any) -> int:
        if role == "client":
            return int(service.errors)
        summary = service.summary()
        return (summary["peer_closed"] + summary["peer_reset"] + summary["tls_error"]
                + summary["keepalive_missing"] + summary["protocol_errors"])

    def summary() -> dict[str, float]:
        """Counters summed over the services; times (``*_ms``) are the worst service's."""
        total: dict[str, float] = {}
        for service in services:
            for key, value in service.summary().items():
                combine = max if key.endswith("_ms") else operator.add
                total[key] = combine(total.get(key, 0), value)
        return total

    class Commands(LineReceiver):
        delimiter = b"\n"

        def connectionMade(self) -> None:
            for service in services:
                service.startService()
            self.answer({"ports": [service.port_number for service in services] if role == "server" else []})

        def answer(self, fields: dict[str, Any]) -> None:
            self.sendLine(json.dumps(fields).encode())

        def lineReceived(self, line: bytes) -> None:
            command = line.decode().strip()
            if command == "mark":
                marks.update(time=time.monotonic(), cpu=cpu_seconds(), trips=round_trips(), rtt=rtt_total())
                lag["max"] = 0.0
                self.answer({"open": held()})
            elif command == "report":
                elapsed = time.monotonic() - marks["time"]
                trips = round_trips() - marks["trips"]
                self.answer({
                    "trips": trips,
                    "rtt_sum": rtt_total() - marks["rtt"],
                    "open": held(),
                    "trips_per_s": trips / elapsed,
                    "cpu_pct": 100 * (cpu_seconds() - marks["cpu"]) / elapsed,
                    "rss_per_conn": (rss_bytes() - base_rss) / max(1, held()),
                    "errors": sum(errors(service) for service in services),
                    "lag_max": lag["max"],
                    "summary": summary(),
                })
            elif command == "stop":
                DeferredList([service.stopService() for service in services]).addBoth(lambda _: reactor.stop())

        def connectionLost(self, reason: Any = None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands())
    reactor.run()


# -------------------------------------------------------------- orchestrator


class Child:
    """One child process and its command channel."""

    def __init__(self, role: str, ports: list[int], connections: int, args: argparse.Namespace) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--child", role,
                   "--ports", ",".join(str(port) for port in ports), "--listeners", str(args.listeners),
                   "--connections", str(connections), "--interval", str(args.interval), "--ramp", str(args.ramp)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def ask(self, command: str | None = None) -> dict[str, Any]:
        """Send ``command`` (if any) and read the answer line."""
        assert self.process.stdout is not None
        if command is not None:
            self.send(command)
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.process.pid} ended early (exit status {self.process.poll()})")
        return json.loads(line)

    def finish(self, deadline: float) -> None:
        if self.process.poll() is None:
            try:
                self.send("stop")
            except BrokenPipeError:
                pass
        try:
            self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run(args: argparse.Namespace) -> str:
    per_process = raise_fd_limit() - FD_MARGIN
    pairs = args.pairs or max(1, math.ceil(args.connections / per_process))
    if math.ceil(args.connections / pairs) > per_process:
        raise SystemExit(f"{args.connections} connections need at least {math.ceil(args.connections / per_process)} "
                         f"process pairs with RLIMIT_NOFILE {per_process + FD_MARGIN}; raise --pairs")
    servers = [Child("server", [], 0, args) for _ in range(pairs)]
    clients: list[Child] = []
    try:
        ports = [server.ask()["ports"] for server in servers]
        clients = [Child("client", server_ports, share, args)
                   for server_ports, share in zip(ports, split(args.connections, pairs), strict=True)]
        for client in clients:
            client.ask()
        time.sleep(args.ramp + SETTLE_INTERVALS * args.interval)
        held_at_mark = sum(child.ask("mark")["open"] for child in clients)
        for server in servers:
            server.ask("mark")
        time.sleep(args.hold)
        client_reports = [child.ask("report") for child in clients]
        server_reports = [child.ask("report") for child in servers]
    finally:
        deadline = time.monotonic() + 30.0
        for child in clients + servers:
            child.finish(deadline)
    held = min(held_at_mark, sum(report["open"] for report in client_reports))
    if args.verbose:
        for report in client_reports + server_reports:
            print(json.dumps(report["summary"]), file=sys.stderr)

    rtt_sum = sum(report["rtt_sum"] for report in client_reports)
    trips = sum(report["trips"] for report in client_reports)

    def mean(reports: list[dict[str, Any]], key: str) -> float:
        return sum(report[key] for report in reports) / len(reports)

    return (
        f"keepalive_capacity: connections_held={held}/{args.connections} processes={pairs}+{pairs} "
        f"server_ports={pairs * args.listeners} "
        f"hold_s={args.hold:g} interval_s={args.interval:g} "
        f"keepalive_rtt_per_s={sum(report['trips_per_s'] for report in client_reports):.0f} "
        f"rtt_avg_ms={1000 * rtt_sum / max(1, trips):.1f} "
        f"false_errors={sum(report['errors'] for report in client_reports + server_reports)} "
        f"rss_per_conn_server_kib={mean(server_reports, 'rss_per_conn') / 1024:.2f} "
        f"rss_per_conn_client_kib={mean(client_reports, 'rss_per_conn') / 1024:.2f} "
        f"cpu_server_pct={sum(report['cpu_pct'] for report in server_reports):.0f} "
        f"cpu_client_pct={sum(report['cpu_pct'] for report in client_reports):.0f} "
        f"loop_lag_max_ms_server={1000 * max(report['lag_max'] for report in server_reports):.0f} "
        f"loop_lag_max_ms_client={1000 * max(report['lag_max'] for report in client_reports):.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50_000, help="connections to hold (default 50000)")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds to hold them, measured (default 60)")
    parser.add_argument("--interval", type=float, default=5.0, help="keep-alive interval in seconds (default 5)")
    parser.add_argument("--ramp", type=float, default=30.0, help="seconds to open them all (default 30)")
    parser.add_argument("--pairs", type=int, default=0, help="server/client process pairs (default: as needed)")
    parser.add_argument("--listeners", type=int, default=8,
                        help="listening ports per server process (default 8): spreads connections over destinations "
                             "so the kernel finds ephemeral ports fast")
    parser.add_argument("--verbose", action="store_true", help="also print every process's summary on stderr")
    parser.add_argument("--child", choices=("server", "client"), help=argparse.SUPPRESS)
    parser.add_argument("--ports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, [int(port) for port in args.ports.split(",") if port], args.connections,
                  args.interval, args.ramp, args.listeners)
    else:
        print(run(args))


if __name__ == "__main__":
    main()
