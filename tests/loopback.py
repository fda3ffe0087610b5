"""Helpers shared by the loopback integration tests (real sockets, bounded in time)."""

from __future__ import annotations

import socket
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



