"""STUN benchmarks: server throughput on one core, and tester memory per client.

1. Throughput: ``nettester stun-server`` (the shipped role) pinned to core 1,
   a closed-loop load of ``--sockets`` x ``--window`` Binding requests pinned
   to core 0 for ``--seconds``. The load is ``udpload`` (the shared C
   generator, built into a temporary directory) or, without it or with
   ``--python-generator``, a pure-Python generator in this process.
   Target: at least 45,000 responses/s, zero lost.
2. Memory: ``nettester stun-client`` with ``--clients`` clients (default
   10,000, each with its own socket) and with 1 client, against a local
   server; RSS difference per client once all have started. Target: at most
   3 KiB. Kernel socket buffers are not part of RSS.

    python3 benchmarks/stun_server.py
    python3 benchmarks/stun_server.py --python-generator --seconds 5 --clients 0
"""

from __future__ import annotations

import argparse
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from harness import ROOT, alternate, build_udpload, free_udp_ports, median, pinned, process_cpu_seconds

COOKIE = b"\x21\x12\xa4\x42"
REQUEST_HEADER = b"\x00\x01\x00\x00" + COOKIE


def start_server(port: int, core: int | None, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Our stun-server (or ``command``) on 127.0.0.1:``port``, once it answers a Binding request."""
    command = command or [sys.executable, "-m", "nettester", "stun-server", "--port", str(port), "--interface",
                          "127.0.0.1", "--stats-interval", "0", "--log-level", "warn"]  # fmt: skip
    extra: dict[str, Any] = {"user": "nobody"} if command[0].endswith("turnserver") and os.geteuid() == 0 else {}
    process = subprocess.Popen(pinned(core, command) if core is not None else command, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **extra)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        for _ in range(100):
            probe.sendto(REQUEST_HEADER + os.urandom(12), ("127.0.0.1", port))
            try:
                probe.recv(2048)
                return process
            except TimeoutError:
                if process.poll() is not None:
                    break
    process.kill()
    raise SystemExit(f"stun-server did not start on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    return sum(process_cpu_seconds(pid))


def run_udpload(binary: str, port: int, sockets: int, window: int, seconds: float) -> str:
    command = [binary, "--proto", "stun", "--port", str(port), "--sockets", str(sockets), "--window", str(window),
               "--duration", str(seconds)]  # fmt: skip
    result = subprocess.run(pinned(0, command), capture_output=True, text=True, timeout=seconds + 30)
    return result.stdout.strip().splitlines()[-1]


def run_python_generator(port: int, sockets: int, window: int, seconds: float, timeout: float = 1.0) -> str:
    """Closed loop in pure Python: each answered (or timed-out) request is replaced at once."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    poller = select.epoll()
    socks: dict[int, socket.socket] = {}
    outstanding: dict[int, dict[bytes, float]] = {}
    sent = ok = lost = 0
    rtts: list[float] = []

    def issue(fd: int, now: float) -> None:
        nonlocal sent
        tid = random.randbytes(12)
        outstanding[fd][tid] = now
        socks[fd].send(REQUEST_HEADER + tid)
        sent += 1

    start = time.monotonic()
    for _ in range(sockets):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        socks[sock.fileno()] = sock
        outstanding[sock.fileno()] = {}
        poller.register(sock.fileno(), select.EPOLLIN)
        for _ in range(window):
            issue(sock.fileno(), start)
    deadline = start + seconds
    next_sweep = start + timeout
    while (now := time.monotonic()) < deadline:
        for fd, _ in poller.poll(0.05):
            sock = socks[fd]
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                sent_at = outstanding[fd].pop(data[8:20], None)
                if sent_at is not None and data[:2] == b"\x01\x01":
                    ok += 1
                    rtts.append(now - sent_at)
                    issue(fd, now)
        if now >= next_sweep:
            next_sweep = now + timeout / 4
            for fd, pending in outstanding.items():
                for tid in [tid for tid, sent_at in pending.items() if now - sent_at > timeout]:
                    del pending[tid]
                    lost += 1
                    issue(fd, now)
    elapsed = time.monotonic() - start
    for sock in socks.values():
        sock.close()
    rtts.sort()
    p50 = rtts[len(rtts) // 2] * 1e6 if rtts else 0.0
    p99 = rtts[int(len(rtts) * 0.99)] * 1e6 if rtts else 0.0
    return (
        f"proto=stun sent={sent} ok={ok} lost={lost} rate={ok / elapsed:.0f} req/s p50_us={p50:.1f} "
        f"p99_us={p99:.1f} generator=python sockets={sockets} window={window} elapsed_s={elapsed:.3f}"
    )


def throughput(args: argparse.Namespace) -> None:
    port = free_udp_ports(1)[0]
    server = start_server(port, core=1)
    try:
        binary = None if args.python_generator else build_udpload(tempfile.mkdtemp(prefix="stun-bench-"))
        cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
        if binary is not None:
            line = run_udpload(binary, port, args.sockets, args.window, args.seconds)
        else:
            line = run_python_generator(port, args.sockets, args.window, args.seconds)
        cpu = (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - wall_before) * 100
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(line)
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    rate = float(fields.get("rate", 0))
    # Responses per second of server CPU: comparable between runs on a shared, busy machine.
    per_cpu_second = rate / (cpu / 100) if cpu else 0.0
    print(
        f"stun-server benchmark: rate={rate:.0f} responses/s lost={fields.get('lost')} "
        f"p50_us={fields.get('p50_us')} p99_us={fields.get('p99_us')} server_cpu={cpu:.0f}% "
        f"per_cpu_second={per_cpu_second:.0f} generator={'udpload' if binary else 'python'} "
        f"load={args.sockets}x{args.window} {args.seconds:g}s (target: >= 45000/s, 0 lost)"
    )


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def client_memory(args: argparse.Namespace) -> None:
    port = free_udp_ports(1)[0]
    server = start_server(port, core=None)
    clients: dict[int, subprocess.Popen[str]] = {}
    try:
        for count in (1, args.clients):
            command = [sys.executable, "-m", "nettester", "stun-client", "--server", "127.0.0.1",
                       "--port", str(port), "--clients", str(count), "--interval", "10",
                       "--start-delay", "0-5", "--stats-interval", "0"]  # fmt: skip
            clients[count] = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        time.sleep(args.settle)  # every client has started (5 s) and sent at least once
        baseline, loaded = rss_bytes(clients[1].pid), rss_bytes(clients[args.clients].pid)
    finally:
        outputs = {}
        for count, process in clients.items():
            process.terminate()
            outputs[count] = process.communicate(timeout=30)[0]
        server.terminate()
        server.wait(timeout=10)
    final = [line for line in outputs[args.clients].splitlines() if "final summary" in line]
    summary = dict(re.findall(r"(\w+)=(\S+)", final[-1])) if final else {}
    per_client = (loaded - baseline) / (args.clients - 1)
    print(
        f"stun-client memory: clients={summary.get('clients')} rss={loaded / 2**20:.1f} MiB "
        f"baseline={baseline / 2**20:.1f} MiB per_client={per_client:.0f} bytes "
        f"requests={summary.get('requests')} responses={summary.get('responses')} "
        f"timeouts={summary.get('timeouts')} (target: <= 3072 bytes per client)"
    )


def vs_coturn(args: argparse.Namespace) -> None:
    """``--vs coturn``: ours and coturn ``turnserver --stun-only -m 1`` (one relay thread), each fresh,
    pinned to core 1, the same udpload load on core 0, alternating; prints the median ratio."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        raise SystemExit("--vs coturn needs turnserver (apt-get install coturn)")
    binary = build_udpload(tempfile.mkdtemp(prefix="stun-bench-"))
    if binary is None:
        raise SystemExit("--vs coturn needs udpload (gcc and the shared source; see UDPLOAD_SOURCE)")

    per_cpu: dict[str, list[float]] = {"nettester": [], "coturn -m 1": []}

    def measure(command: list[str] | None, name: str) -> float:
        port = free_udp_ports(1)[0]
        if command is not None:
            command = [*command, "-p", str(port)]
        server = start_server(port, core=1, command=command)
        try:
            run_udpload(binary, port, args.sockets, args.window, 1.0)  # warm-up
            before = cpu_seconds(server.pid)
            line = run_udpload(binary, port, args.sockets, args.window, args.seconds)
            used = cpu_seconds(server.pid) - before
        finally:
            server.terminate()
            server.wait(timeout=10)
        rate = float(dict(re.findall(r"(\w+)=(\S+)", line)).get("rate", 0))
        per_cpu[name].append(rate * args.seconds / used if used else 0.0)
        print(f"  {name}: {line} server_cpu_s={used:.2f} per_cpu_second={per_cpu[name][-1]:.0f}", flush=True)
        return rate

    coturn = [turnserver, "-n", "--stun-only", "--no-cli", "-L", "127.0.0.1", "--no-tls", "--no-dtls", "-m", "1"]
    ratios = alternate(args.rounds, lambda: measure(None, "nettester"), lambda: measure(coturn, "coturn -m 1"),
                       "nettester/coturn responses/s, round")
    cpu_ratios = [a / b if b else 0.0 for a, b in zip(per_cpu["nettester"], per_cpu["coturn -m 1"], strict=True)]
    print(f"stun-server vs coturn turnserver -m 1: median ratio {median(ratios):.2f}, responses per server "
          f"CPU-second median ratio {median(cpu_ratios):.2f} ({args.rounds} alternating rounds, both on core 1, "
          f"udpload {args.sockets}x{args.window} {args.seconds:g} s; goal >= 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration (udpload caps it at 15)")
    parser.add_argument("--sockets", type=int, default=64)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--python-generator", action="store_true", help="use the pure-Python load generator")
    parser.add_argument("--clients", type=int, default=10000, help="clients for the memory run (0 = skip it)")
    parser.add_argument("--settle", type=float, default=12.0, help="seconds before measuring the clients' RSS")
    parser.add_argument("--vs", choices=["coturn"], help="only compare with coturn -m 1 on one core, alternating")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of --vs")
    args = parser.parse_args()
    if args.vs:
        vs_coturn(args)
        return
    throughput(args)
    if args.clients > 1:
        client_memory(args)


if __name__ == "__main__":
    main()
