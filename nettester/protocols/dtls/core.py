"""The state and shared machinery of a DTLS 1.2 connection (RFC 6347).

``ConnectionCore`` holds what both handshake sides use: the flight being
sent and its retransmission (RFC 6347 section 4.2.4), key derivation, the
Finished check, certificate verification, alerts.  ``client_handshake.py`` and
``server_handshake.py`` add each side's messages, ``connection.py`` the record
layer and the public API.  Sans-IO: ``now`` goes in, nothing reads a clock.
"""

from __future__ import annotations

import enum
import hmac
from collections import Counter, deque
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.alerts import (
    BAD_CERTIFICATE,
    DECRYPT_ERROR,
    FATAL,
    ILLEGAL_PARAMETER,
    alert_name,
)
from nettester.protocols.dtls.configuration import (
    Address,
    ClientAuth,
    DtlsConfiguration,
    Session,
)
from nettester.protocols.dtls.credentials import CredentialsError, verify_chain
from nettester.protocols.dtls.events import (
    ApplicationData,
    ConnectionClosed,
    Event,
    HandshakeCompleted,
    HandshakeError,
)
from nettester.protocols.dtls.record import ReadState, RecordError, WriteState

BUFFERED_FUTURE_RECORDS = 8
BUFFERED_RECORD_SIZE = 1500  # unauthenticated until the CCS: bound what they hold
#: the shortest spacing of flights resent at once because the peer resent its
#: own, as a share of the initial retransmission timeout (rate limit)
IMMEDIATE_RESEND_SHARE = 0.25


class State(enum.Enum):
    START = "start"
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_SERVER_HELLO_DONE = "wait_server_hello_done"
    WAIT_CLIENT_KEY_EXCHANGE = "wait_client_key_exchange"
    WAIT_CERTIFICATE_VERIFY = "wait_certificate_verify"
    WAIT_CHANGE_CIPHER_SPEC = "wait_change_cipher_spec"
    WAIT_FINISHED = "wait_finished"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True)
class OutMessage:
    """One element of a flight: a handshake message or a ChangeCipherSpec."""

    epoch: int
    msg_type: int | None  # None: ChangeCipherSpec
    message_seq: int = 0
    body: bytes = b""


_GROUP_CURVES = {hs.GROUP_SECP256R1: ec.SECP256R1()}


class Ephemeral:
    """An ephemeral ECDH key on one named group (RFC 8422)."""

    def __init__(self, group: int) -> None:
        self.group = group
        if group == hs.GROUP_X25519:
            self._x25519 = x25519.X25519PrivateKey.generate()
            self.public = self._x25519.public_key().public_bytes_raw()
        else:
            self._ec = ec.generate_private_key(_GROUP_CURVES[group])
            self.public = self._ec.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )

    def exchange(self, peer_public: bytes) -> bytes:
        try:
            if self.group == hs.GROUP_X25519:
                return self._x25519.exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
            peer = ec.EllipticCurvePublicKey.from_encoded_point(_GROUP_CURVES[self.group], peer_public)
            return self._ec.exchange(ec.ECDH(), peer)
        except ValueError as error:
            raise HandshakeError(ILLEGAL_PARAMETER, "bad ECDH public key") from error


SUPPORTED_GROUPS = (hs.GROUP_X25519, hs.GROUP_SECP256R1)


def identity_of_certificate(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()


class ConnectionCore:
    """The state of one DTLS 1.2 association and the machinery both
    handshake sides share: flights, keys, Finished, certificates, alerts."""

    def __init__(
        self,
        configuration: DtlsConfiguration,
        peer_address: Address | None = None,
    ) -> None:
        self.configuration = configuration
        self.is_client = configuration.is_client
        self.peer_address = peer_address
        #: dropped records by reason, since the start
        self.dropped: Counter[str] = Counter()
        self._unreported_drops: Counter[str] = Counter()
        self.cipher_suite: suites.CipherSuite | None = None
        self.peer_identity: str | None = None
        self.read_cid = b""
        self.write_cid = b""
        self.cid_negotiated = False
        self.session_id = b""
        self.failure_reason: str | None = None

        self._state = State.START
        self._events: deque[Event] = deque()
        self._outgoing: list[bytes] = []
        self._read_states: dict[int, ReadState] = {0: ReadState(0, None)}
        self._read_epoch = 0
        self._write_states: dict[int, WriteState] = {0: WriteState(0, None)}
        self._write_epoch = 0
        self._pending_read: ReadState | None = None
        self._future_records: list[tuple[record.Record, Address | None]] = []
        self._early_data: list[bytes] = []
        self._reassembler = hs.Reassembler(configuration.max_handshake_message)
        self._next_send_seq = 0
        self._transcript = bytearray()

        # retransmission (RFC 6347 section 4.2.4)
        self._flight: list[OutMessage] = []
        self._flight_expects_reply = False
        self._retransmit_at: float | None = None
        self._retransmit_interval = configuration.initial_retransmit_timeout
        self._retransmissions = 0
        self._flight_sent_at = float("-inf")
        self._handshake_deadline: float | None = None
        #: the message_seq the peer's answer to our current flight starts at:
        #: older messages are a retransmission of its previous flight
        self._peer_flight_start = 0
        self._immediate_resend_at = float("-inf")

        # handshake values
        self._client_hello: hs.ClientHello | None = None
        self._client_random = b""
        self._server_random = b""
        self._own_cid = b""
        self._master_secret = b""
        self._extended_master_secret = False
        #: (write, read) keys of the protected epoch, kept for snapshots
        self._keys: tuple[suites.KeyMaterial, suites.KeyMaterial] | None = None
        self._resuming = False
        self._ephemeral: Ephemeral | None = None
        self._server_key_exchange: hs.ServerKeyExchange | None = None
        self._peer_chain: list[x509.Certificate] = []
        self._certificate_requested = False
        self._sent_certificate = False
        self._psk: bytes | None = None
        self._hello_verify_count = 0
        self._secure_renegotiation = False
        self._last_record_sequence = 0
        # wrong-key detection (connection._finished_fails_to_open)
        self._datagrams = 0
        self._ccs_datagram = -1
        self._finished_failures = 0
        if (
            not self.is_client
            and configuration.client_auth is not ClientAuth.NONE
            and configuration.trust_anchors is None
        ):
            raise ValueError("client authentication needs trust anchors")

    # --- public API ------------------------------------------------------------

    def take_dropped(self) -> Counter[str]:
        """The records dropped since the last call, by reason (for the
        endpoint's counters: a pull, like ``datagrams_to_send``)."""
        drops, self._unreported_drops = self._unreported_drops, Counter()
        return drops

    @property
    def is_established(self) -> bool:
        return self._state is State.ESTABLISHED

    @property
    def is_closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def write_sequence(self) -> int:
        """The sequence number the next record of the current write epoch gets."""
        return self._write_states[self._write_epoch].next_sequence

    @property
    def read_sequence_high(self) -> int:
        """The highest authenticated sequence number of the current read
        epoch (-1: none yet)."""
        return self._read_states[self._read_epoch].window.highest

    @property
    def client_random(self) -> bytes:
        """The ClientHello random of this handshake (empty before it)."""
        return self._client_random

    # --- shared handshake machinery -------------------------------------------------

    def _handshake_message(self, msg_type: int, body: bytes) -> OutMessage:
        """A new outgoing handshake message, added to the transcript."""
        seq = self._next_send_seq
        self._next_send_seq += 1
        self._transcript += hs.encode_message(msg_type, seq, body)
        return OutMessage(self._write_epoch, msg_type, seq, body)

    def _derive_master_secret(self, other_secret: bytes | None) -> None:
        suite = self.cipher_suite
        assert suite is not None
        if suite.key_exchange.uses_psk:
            assert self._psk is not None
            pre_master = suites.psk_pre_master_secret(self._psk, other_secret)
        else:
            assert other_secret is not None
            pre_master = other_secret
        session_hash = suites.sha256(bytes(self._transcript)) if self._extended_master_secret else None
        self._master_secret = suites.master_secret(pre_master, self._client_random, self._server_random, session_hash)

    def _install_keys(self) -> None:
        """Prepare epoch 1 in both directions; reading switches at the peer's
        CCS, writing at ours."""
        suite = self.cipher_suite
        assert suite is not None
        block = suites.key_block(self._master_secret, self._client_random, self._server_random, suite)
        client_write, server_write = suite.key_material(block)
        mine, theirs = (client_write, server_write) if self.is_client else (server_write, client_write)
        self._keys = (mine, theirs)
        self._write_states[1] = WriteState(1, suite.protection(mine), self.write_cid)
        self._pending_read = ReadState(1, suite.protection(theirs), self.read_cid)

    def _finished_messages(self) -> list[OutMessage]:
        """ChangeCipherSpec then Finished in the new epoch."""
        verify_data = suites.finished_verify_data(
            self._master_secret, self.is_client, suites.sha256(bytes(self._transcript))
        )
        ccs = OutMessage(self._write_epoch, None)
        self._write_epoch = 1
        return [ccs, self._handshake_message(hs.FINISHED, verify_data)]

    def _finish_handshake(self, now: float, send_final_flight: bool) -> None:
        """The peer's Finished checked out.  The side that sends the last
        flight keeps it to resend when the peer repeats its own (RFC 6347
        section 4.2.4); the side that received the last flight needs nothing
        more, the peer having had all of ours."""
        if send_final_flight:
            self._start_flight(self._finished_messages(), now, expects_reply=False)
        else:
            self._flight = []
        self._complete(now)

    def _check_finished(self, body: bytes, is_client_finished: bool) -> None:
        expected = suites.finished_verify_data(
            self._master_secret, is_client_finished, suites.sha256(bytes(self._transcript))
        )
        if not hmac.compare_digest(body, expected):
            raise HandshakeError(DECRYPT_ERROR, "bad_finished")

    def _verify_certificates(self, ders: list[bytes], server_name: str | None, now: float) -> list[x509.Certificate]:
        try:
            chain = [x509.load_der_x509_certificate(der) for der in ders]
            leaf_key = chain[0].public_key() if chain else None
        except (ValueError, UnsupportedAlgorithm) as error:
            raise HandshakeError(BAD_CERTIFICATE, "undecodable_certificate") from error
        anchors = self.configuration.trust_anchors
        if chain and anchors is not None:
            try:
                verify_chain(chain, anchors, server_name, self.configuration.certificate_time(now))
            except CredentialsError as error:
                raise HandshakeError(BAD_CERTIFICATE, "certificate_rejected") from error
        if chain and not isinstance(leaf_key, ec.EllipticCurvePublicKey):
            raise HandshakeError(BAD_CERTIFICATE, "certificate_key_not_ec")
        return chain

    @staticmethod
    def _verify_signature(certificate: x509.Certificate, signature: bytes, data: bytes) -> None:
        key = certificate.public_key()
        try:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as error:
            raise HandshakeError(DECRYPT_ERROR, "bad_signature") from error

    def _complete(self, now: float) -> None:
        suite = self.cipher_suite
        assert suite is not None
        self._state = State.ESTABLISHED
        self._handshake_deadline = None
        self._retransmit_at = None  # a final flight is only resent on demand
        self._future_records.clear()
        session = None
        if self.session_id:
            session = Session(
                self.session_id, suite.code, self._master_secret, self._extended_master_secret, self.peer_identity
            )
            cache = self.configuration.session_cache
            if cache is not None and not self.is_client:
                cache.put(session)
        self._events.append(
            HandshakeCompleted(
                suite.name,
                self.peer_identity,
                self.read_cid if self.cid_negotiated else None,
                self.write_cid if self.cid_negotiated else None,
                self.session_id,
                self._resuming,
                session,
            )
        )
        self._events.extend(ApplicationData(data) for data in self._early_data)
        self._early_data = []

    # --- flights and output -------------------------------------------------------------

    def _start_flight(self, messages: list[OutMessage], now: float, expects_reply: bool) -> None:
        """Send a new flight; its retransmission timer runs until the peer's
        whole answer has arrived (RFC 6347 section 4.2.4)."""
        self._flight = messages
        self._peer_flight_start = self._reassembler.next_seq
        self._flight_expects_reply = expects_reply
        self._retransmissions = 0
        self._retransmit_interval = self.configuration.initial_retransmit_timeout
        self._transmit_flight(now)

    def _resend_at_once(self, now: float) -> None:
        """The peer resent its previous flight, so it lost (part of) ours:
        resend ours now rather than at our timer (RFC 6347 section 4.2.4),
        at most once per IMMEDIATE_RESEND_SHARE of the initial timeout, so a
        retransmitted flight of many records gets one answer."""
        if not self._flight or now < self._immediate_resend_at:
            return
        self._immediate_resend_at = now + self.configuration.initial_retransmit_timeout * IMMEDIATE_RESEND_SHARE
        expected_at = self._retransmit_at
        self._transmit_flight(now)
        if expected_at is not None:
            self._retransmit_at = expected_at  # the timer keeps its schedule

    def _transmit_flight(self, now: float) -> None:
        mtu = self.configuration.mtu
        datagram = bytearray()
        for message in self._flight:
            writer = self._write_states[message.epoch]
            if message.msg_type is None:
                pieces = [writer.seal(record.CHANGE_CIPHER_SPEC, b"\x01")]
            else:
                room = mtu - writer.overhead - hs.HEADER_LENGTH
                pieces = [
                    writer.seal(record.HANDSHAKE, fragment)
                    for fragment in hs.fragment_message(message.msg_type, message.message_seq, message.body, room)
                ]
            for piece in pieces:
                if datagram and len(datagram) + len(piece) > mtu:
                    self._outgoing.append(bytes(datagram))
                    datagram = bytearray()
                datagram += piece
        if datagram:
            self._outgoing.append(bytes(datagram))
        self._flight_sent_at = now
        self._retransmit_at = now + self._retransmit_interval if self._flight_expects_reply else None

    def _send_alert(self, level: int, description: int) -> None:
        writer = self._write_states[self._write_epoch]
        try:
            self._outgoing.append(writer.seal(record.ALERT, bytes((level, description))))
        except RecordError:
            pass  # sequence space exhausted: nothing more can be sent

    def _fail(self, alert: int, reason: str, detail: str = "") -> None:
        self._send_alert(FATAL, alert)
        self._close(alert, reason, by_peer=False, detail=detail)

    def _close(self, alert: int | None, reason: str, by_peer: bool, detail: str = "") -> None:
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
        self.failure_reason = reason if reason not in ("closed", "close_notify") else None
        self._retransmit_at = None
        self._flight = []
        self._events.append(ConnectionClosed(alert, reason, by_peer, detail))

    def _drop(self, reason: str) -> None:
        """Count a dropped record: never answered (RFC 6347 section 4.1.2.7)."""
        self.dropped[reason] += 1
        self._unreported_drops[reason] += 1

    def _peer_alert(self, level: int, description: int) -> None:
        """A fatal alert from the peer ends the connection; its reason is the
        alert's name (``unknown_psk_identity``, never ``alert_115``)."""
        name = alert_name(description)
        detail = name
        if self._state is not State.ESTABLISHED:
            detail = "the %s rejected the handshake: %s" % ("server" if self.is_client else "client", name)
        self._close(description, name, by_peer=True, detail=detail)
