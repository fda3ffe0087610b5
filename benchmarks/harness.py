"""What the benchmarks share: paths, free loopback ports, core pinning, process CPU time, udpload."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Next to the checkout by default; UDPLOAD_SOURCE names it from elsewhere (a git worktree).
UDPLOAD_SOURCE = os.environ.get("UDPLOAD_SOURCE") or os.path.join(
    os.path.dirname(ROOT), "shared", "tools", "udpload", "udpload.c")


def free_udp_ports(count: int) -> list[int]:
    """Ports the OS chose on 127.0.0.1 (port 0), for command lines that must name them up front."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def pinned(core: int | str, command: list[str]) -> list[str]:
    """``command`` pinned to ``core`` with taskset, when taskset exists and the machine has that core."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > int(core):
        return ["taskset", "-c", str(core), *command]
    return command


def process_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def build_udpload(directory: str) -> str | None:
    """Compile the shared C load generator into ``directory``; None when no compiler or source."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not os.path.exists(UDPLOAD_SOURCE):
        return None
    binary = os.path.join(directory, "udpload")
    result = subprocess.run([compiler, "-O2", "-Wall", "-pthread", "-o", binary, UDPLOAD_SOURCE], capture_output=True)
    return binary if result.returncode == 0 else None


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its live descendants (``--workers`` children)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += sum(process_cpu_seconds(current))
            with open(f"/proc/{current}/task/{current}/children") as children:
                pending.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def alternate(rounds: int, first: Callable[[], float], second: Callable[[], float],
              label: str = "round") -> list[float]:
    """``first() / second()`` for each of ``rounds`` rounds, the order swapped every round (the
    machine's drift then favours neither); prints each round's figures."""
    ratios = []
    for number in range(rounds):
        if number % 2:
            b = second()
            a = first()
        else:
            a = first()
            b = second()
        ratios.append(a / b if b else 0.0)
        print(f"{label} {number + 1}: {a:.0f} / {b:.0f} = {ratios[-1]:.2f}", flush=True)
    return ratios
