"""What the benchmarks share: paths, free loopback ports, core pinning, process CPU time, udpload."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UDPLOAD_SOURCE = os.path.join(os.path.dirname(ROOT), "shared", "tools", "udpload", "udpload.c")


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
    """C{command} pinned to C{core} with taskset, when taskset exists and the machine has that core."""
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
    """Compile the shared C load generator into C{directory}; None when no compiler or source."""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None or not os.path.exists(UDPLOAD_SOURCE):
        return None
    binary = os.path.join(directory, "udpload")
    result = subprocess.run([compiler, "-O2", "-Wall", "-pthread", "-o", binary, UDPLOAD_SOURCE], capture_output=True)
    return binary if result.returncode == 0 else None
