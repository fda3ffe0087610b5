"""Stateless HelloVerifyRequest cookies (RFC 6347 section 4.2.1).

A server keeps no state for a ClientHello until it returns with a cookie
that proves the client can receive at its address; the HelloVerifyRequest
is no larger than the ClientHello, so there is no amplification.
"""

from __future__ import annotations

import enum
import hmac
import os
from dataclasses import dataclass
from typing import Callable

from nettester.protocols.dtls import handshake, record

COOKIE_LENGTH = 16
DEFAULT_ROTATION = 60.0


class Verdict(enum.Enum):
    ACCEPT = "accept"  # a ClientHello with a valid cookie: create a connection
    VERIFY = "verify"  # answer with the HelloVerifyRequest in ``reply``
    DROP = "drop"  # not a usable initial ClientHello


@dataclass(frozen=True)
class GateResult:
    """``reply``: the HelloVerifyRequest to send (VERIFY); ``datagram``: what
    to feed the new connection (ACCEPT); ``reason``: the drop's counter label."""

    verdict: Verdict
    reply: bytes = b""
    reason: str = ""
    datagram: bytes = b""


def _address_bytes(address: tuple[str, int]) -> bytes:
    return ("%s|%d" % (address[0], address[1])).encode("ascii", "replace")


class CookieGate:
    """Checks initial ClientHellos and mints cookies: HMAC-SHA256 over the
    client's address and hello parameters, with a secret rotated every
    ``rotation`` seconds; the previous secret stays valid for one period.

    With ``shared_secret`` (``--workers``: every worker process gets the
    parent's) the secret of each rotation period is derived from it, so
    processes sharing a port accept each other's cookies."""

    def __init__(self, rotation: float = DEFAULT_ROTATION, random: Callable[[int], bytes] = os.urandom,
                 shared_secret: bytes | None = None) -> None:
        self._random = random
        self._rotation = rotation
        self._shared = shared_secret
        self._secret = random(32)
        self._previous = self._secret
        self._rotated_at: float | None = None

    def _period_secret(self, period: int) -> bytes:
        return hmac.digest(self._shared or b"", period.to_bytes(8, "big", signed=True), "sha256")

    def _rotate(self, now: float) -> None:
        if self._shared is not None:
            period = int(now // self._rotation)
            if self._rotated_at != period:
                self._rotated_at = period
                self._secret, self._previous = self._period_secret(period), self._period_secret(period - 1)
        elif self._rotated_at is None:
            self._rotated_at = now
        elif now - self._rotated_at >= self._rotation:
            self._previous = self._secret if now - self._rotated_at < 2 * self._rotation else self._random(32)
            self._secret = self._random(32)
            self._rotated_at = now

    def _cookie(self, secret: bytes, address: tuple[str, int], hello: handshake.ClientHello) -> bytes:
        return hmac.digest(secret, _address_bytes(address) + hello.cookie_input(), "sha256")[:COOKIE_LENGTH]

    def check(self, datagram: bytes, address: tuple[str, int], now: float) -> GateResult:
        """Judge a datagram from an address without a connection, when it
        holds a whole ClientHello in one fragment (``peers.Admission`` also
        reassembles fragmented ones and then calls ``judge``)."""
        records, _ = record.parse_records(datagram, 0)
        if not records:
            return GateResult(Verdict.DROP, reason="malformed")
        first = records[0]
        if first.content_type != record.HANDSHAKE or first.epoch != 0:
            return GateResult(Verdict.DROP, reason="not_client_hello")
        try:
            fragment = handshake.parse_fragments(first.fragment)[0]
        except (handshake.DecodeError, IndexError):
            return GateResult(Verdict.DROP, reason="malformed")
        if fragment.msg_type != handshake.CLIENT_HELLO or fragment.offset or len(fragment.body) != fragment.length:
            return GateResult(Verdict.DROP, reason="not_client_hello")
        return self.judge(fragment.body, fragment.message_seq, first.sequence_number, address, now, datagram)

    def judge(
        self,
        body: bytes,
        message_seq: int,
        record_sequence: int,
        address: tuple[str, int],
        now: float,
        datagram: bytes = b"",
    ) -> GateResult:
        """Judge the whole ClientHello ``body`` (message ``message_seq``, in
        records up to ``record_sequence``) from ``address``.  An accepted
        hello comes back as the datagram to feed a new connection:
        ``datagram`` when given, else one record rebuilt from ``body``."""
        self._rotate(now)
        try:
            # Lenient: what the connection rejects with an alert (duplicate
            # extensions) still gets a cookie, so the alert can be sent.
            hello = handshake.ClientHello.decode(body, strict=False)
        except handshake.DecodeError:
            return GateResult(Verdict.DROP, reason="malformed")
        if hello.cookie and any(
            hmac.compare_digest(hello.cookie, self._cookie(secret, address, hello))
            for secret in (self._secret, self._previous)
        ):
            if not datagram:
                datagram = record.encode_plaintext_record(
                    record.HANDSHAKE,
                    record.DTLS_1_2,
                    0,
                    record_sequence,
                    handshake.encode_message(handshake.CLIENT_HELLO, message_seq, body),
                )
            return GateResult(Verdict.ACCEPT, datagram=datagram)
        cookie = self._cookie(self._secret, address, hello)
        # RFC 6347 section 4.2.1: version DTLS 1.0 in the HelloVerifyRequest,
        # the ClientHello's record sequence number and message_seq echoed.
        reply = record.encode_plaintext_record(
            record.HANDSHAKE,
            record.DTLS_1_0,
            0,
            record_sequence,
            handshake.encode_message(
                handshake.HELLO_VERIFY_REQUEST,
                message_seq,
                handshake.encode_hello_verify_request(record.DTLS_1_0, cookie),
            ),
        )
        return GateResult(Verdict.VERIFY, reply, reason="bad_cookie" if hello.cookie else "no_cookie")
