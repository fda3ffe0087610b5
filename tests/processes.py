"""Real nettester processes for the loopback tests (their JSON log lines collected, every wait bounded),
and what their coaps clients need."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import DeferredQueue
from zope.interface import implementer

from nettester.interfaces import IDatagramReceiver
from nettester.protocols.coap.message import Code, MessageType, encode_message

TIMEOUT = 20.0
URI_PATH = 11  # RFC 7252 section 5.10


def get_request(mid: int, path: bytes = b"test") -> bytes:
    """A CON GET of ``path`` (the plugtest's /test by default), its token the MID."""
    return encode_message(MessageType.CON, Code.GET, mid, token=mid.to_bytes(2, "big"), options=[(URI_PATH, path)])


def metric(port: int, name: str) -> float:
    """One unlabelled sample of the parent's merged /metrics (-1 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return -1.0


@implementer(IDatagramReceiver)
class Answers:
    """A DTLS client's receiver: every datagram it decrypts, queued."""

    def __init__(self) -> None:
        self.queue: DeferredQueue[bytes] = DeferredQueue()

    def datagramReceived(self, data: bytes, peer: Any) -> None:
        self.queue.put(data)


class LoggedProcess:
    """``nettester <role> ... --log-format json`` with its JSON log lines collected by a thread.

    ``events`` holds the JSON lines in the order they came; ``other`` any
    line that is not JSON (with ``--log-format json`` there must be none).
    """

    def __init__(self, *arguments: str, env: Mapping[str, str] | None = None) -> None:
        """``env``: variables added to this environment (less its ``NETTESTER_*`` ones)."""
        command = [sys.executable, "-m", "nettester", *arguments, "--log-format", "json"]
        env = {**{key: value for key, value in os.environ.items() if not key.startswith("NETTESTER_")},
               **(env or {})}
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

    def wait(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                tail = "\n".join(json.dumps(event) for event in self.events[-15:])
                raise AssertionError(f"condition not reached within {timeout:g} s; last log lines:\n{tail}")
            time.sleep(0.02)

    def finish(self, timeout: float = TIMEOUT) -> int:
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
            self.process.wait(TIMEOUT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        self._reader.join(5)
