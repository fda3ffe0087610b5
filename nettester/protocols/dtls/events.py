"""What a DTLS connection hands out (``next_event()``) and the errors of
its handshake.  Events are frozen dataclasses deriving from ``DtlsEvent``."""

from __future__ import annotations

from dataclasses import dataclass

from nettester.protocols.dtls.configuration import Address, Session


class DtlsEvent:
    """Base class of every event a ``DtlsConnection`` hands out."""

    __slots__ = ()


@dataclass(frozen=True)
class HandshakeCompleted(DtlsEvent):
    cipher_suite: str
    peer_identity: str | None
    read_cid: bytes | None
    write_cid: bytes | None
    session_id: bytes
    resumed: bool
    session: Session | None


@dataclass(frozen=True)
class ApplicationData(DtlsEvent):
    data: bytes


@dataclass(frozen=True)
class AddressChanged(DtlsEvent):
    """RFC 9146 section 6: an authenticated, newer CID record came from a new
    address, which is now the peer's."""

    previous: Address | None
    current: Address


@dataclass(frozen=True)
class ConnectionClosed(DtlsEvent):
    """The connection ended: ``alert`` is the alert description sent or
    received (None for a timeout), ``by_peer`` tells who ended it.
    ``reason`` is short and fixed (a counter label: an alert name or an
    engine reason such as ``handshake_timeout``); ``detail`` says the same
    for a person when there is more to say (the PSK identity of a wrong
    key, the alert a server rejected us with), else it equals ``reason``."""

    alert: int | None
    reason: str
    by_peer: bool
    detail: str = ""

    @property
    def description(self) -> str:
        return self.detail or self.reason


@dataclass(frozen=True)
class RenegotiationRefused(DtlsEvent):
    """The peer asked for a new handshake on the established session; it got
    a ``no_renegotiation`` warning and the session goes on (RFC 5746)."""


Event = HandshakeCompleted | ApplicationData | AddressChanged | ConnectionClosed | RenegotiationRefused


class HandshakeError(Exception):
    """Ends the handshake with the fatal alert ``alert``."""

    def __init__(self, alert: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason
        self.detail = detail


class IgnoredMessageError(Exception):
    """An unauthenticated message that does not fit: dropped (RFC 6347
    section 4.1.2.7) rather than let an off-path sender end the handshake."""
