"""Address helpers shared by every role: ``host:port`` parsing and address families."""

from __future__ import annotations

import ipaddress
import socket


def parse_host_port(text: str, default_host: str | None = None, lowest_port: int = 1) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or ``:port`` (host ``default_host``).

    :param lowest_port: 0 for a listening address (the OS picks the port).
    :raises ValueError: with a message saying what was expected.
    """
    host, separator, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not separator or not (port_text.isascii() and port_text.isdigit()) or not lowest_port <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port (port {lowest_port}-65535), got {text!r}")
    if not host:
        if default_host is None:
            raise ValueError(f"expected host:port with a host, got {text!r}")
        host = default_host
    return host, int(port_text)


def unmapped_host(host: str) -> str:
    """``a.b.c.d`` for an IPv4-mapped IPv6 address ``::ffff:a.b.c.d`` (RFC 4291 section 2.5.5.2), else ``host``.

    A dual-stack socket reports IPv4 peers mapped; what a user reads (and what
    Californium shows) is the IPv4 address.
    """
    if host[:7].lower() == "::ffff:" and "." in host:
        try:
            return str(ipaddress.IPv6Address(host).ipv4_mapped or host)
        except ValueError:
            return host
    return host


def address_text(peer: object) -> str:
    """How an address reads in logs and reprs: ``host:port``, ``[v6]:port`` (an IPv4-mapped
    host unmapped); any other peer handle (a DTLS peer) as its ``str``."""
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(peer[0], str):
        host = unmapped_host(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def mapped_for(family: int, host: str) -> str:
    """``host`` as a socket of ``family`` addresses it: an IPv4 literal becomes ``::ffff:a.b.c.d``
    on an IPv6 (dual-stack) socket; the inverse of :func:`unmapped_host`."""
    if family == socket.AF_INET6 and ip_family(host) == socket.AF_INET:
        return "::ffff:" + host
    return host


def ip_family(host: str) -> int | None:
    """socket.AF_INET / AF_INET6 for an IP literal, None for a host name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None
