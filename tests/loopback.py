"""Helpers shared by the loopback integration tests (real sockets, bounded in time)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater


@defer.inlineCallbacks
def wait_until(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.01,
               what: str = "condition") -> Generator[Any, Any, None]:
    """Poll ``condition`` on the running reactor every ``step`` s; fail after ``timeout`` s, naming ``what``."""
    from twisted.internet import reactor

    for _ in range(int(timeout / step)):
        if condition():
            return
        yield deferLater(reactor, step, lambda: None)
    if condition():
        return
    raise AssertionError(f"{what} not reached within {timeout:g} s")


def free_ports(count: int = 1, kind: socket.SocketKind = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS chose (port 0), for peers and configurations that must name them up front."""
    sockets = [socket.socket(socket.AF_INET, kind) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (some containers have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


PROCESS_TIMEOUT = 20.0  # seconds a LoggedProcess waits for a condition, or to stop


class LoggedProcess:
    """``nettester <role> ... --log-format json`` with its JSON log lines collected by a thread.

    ``events`` holds the JSON lines in the order they came; ``other`` any
    line that is not JSON (with ``--log-format json`` there must be none).
    """

    def __init__(self, *arguments: str) -> None:
        command = [sys.executable, "-m", "nettester", *arguments, "--log-format", "json"]
        env = {key: value for key, value in os.environ.items() if not key.startswith("NETTESTER_")}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.other.append(line.decode(errors="replace"))

    def of(self, event: str) -> list[dict[str, Any]]:
        return [record for record in list(self.events) if record.get("event") == event]

    def wait(self, condition: Callable[[], bool], timeout: float = PROCESS_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                tail = "\n".join(json.dumps(event) for event in self.events[-15:])
                raise AssertionError(f"condition not reached within {timeout:g} s; last log lines:\n{tail}")
            time.sleep(0.02)

    def finish(self, timeout: float = PROCESS_TIMEOUT) -> int:
        """Wait for the process to end by itself (``--duration``); its exit status, every line read."""
        try:
            status = self.process.wait(timeout)
        finally:
            self.stop()
        return status

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(PROCESS_TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(5)
