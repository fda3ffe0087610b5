"""The sans-IO DTLS 1.2 connection (RFC 6347, RFC 9146, RFC 7627).

One ``DtlsConnection`` per peer, client or server, in the style of aioquic's
``QuicConnection``: datagrams and the current time go in
(``receive_datagram``, ``handle_timer``), datagrams, one timer and events come
out (``datagrams_to_send``, ``get_timer``, ``next_event``).  It never reads a
clock and never touches a socket.

A server connection is created by its endpoint only after the ClientHello
passed the stateless cookie check (``cookie.CookieGate``); the connection
itself trusts the ClientHello it is first given.
"""

from __future__ import annotations

import datetime
import enum
import hmac
import os
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Container

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.credentials import CredentialsError, PskStore, verify_chain
from nettester.protocols.dtls.record import ReadState, RecordError, ReplayWindow, WriteState

# Alert descriptions (RFC 5246 section 7.2, RFC 4279 section 2).
CLOSE_NOTIFY = 0
UNEXPECTED_MESSAGE = 10
HANDSHAKE_FAILURE = 40
BAD_CERTIFICATE = 42
ILLEGAL_PARAMETER = 47
DECODE_ERROR = 50
DECRYPT_ERROR = 51
PROTOCOL_VERSION = 70
INTERNAL_ERROR = 80
NO_RENEGOTIATION = 100
UNSUPPORTED_EXTENSION = 110
UNKNOWN_PSK_IDENTITY = 115
WARNING, FATAL = 1, 2

DEFAULT_SUITES = (
    "TLS_PSK_WITH_AES_128_CCM_8",
    "TLS_PSK_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256",
)
_BUFFERED_FUTURE_RECORDS = 8
_BUFFERED_RECORD_SIZE = 1500  # unauthenticated until the CCS: bound what they hold
_MAX_HELLO_VERIFY = 5
_MAX_ADOPTED_SEQUENCE = 2**16


class ClientAuth(enum.Enum):
    """Whether a server asks its clients for a certificate."""

    NONE = "none"
    WANTED = "wanted"
    NEEDED = "needed"


@dataclass(frozen=True)
class Session:
    """What session resumption needs (RFC 5246 section 7.3)."""

    session_id: bytes
    cipher_suite: int
    master_secret: bytes = field(repr=False)
    extended_master_secret: bool
    peer_identity: str | None


@dataclass(frozen=True)
class EstablishedState:
    """An established server connection reduced to what continues it on
    another node (``snapshot.py`` gives it a wire form): its session and the
    current epoch of each direction."""

    session: Session
    cid_negotiated: bool
    read_epoch: int
    read_keys: suites.KeyMaterial
    read_cid: bytes
    #: the replay window (RFC 6347 section 4.1.2.6): highest authenticated
    #: sequence number (-1: none yet) and the bitmap below it
    read_highest: int
    read_bitmap: int
    write_epoch: int
    write_keys: suites.KeyMaterial
    write_cid: bytes
    #: the sequence number the next record gets
    write_sequence: int
    peer_address: Any


class SessionCache:
    """A bounded LRU of server sessions, shared by a server's connections."""

    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def get(self, session_id: bytes) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._sessions.move_to_end(session_id)
        return session

    def put(self, session: Session) -> None:
        self._sessions[session.session_id] = session
        self._sessions.move_to_end(session.session_id)
        while len(self._sessions) > self.capacity:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class DtlsConfiguration:
    """Everything a connection is told; shared by a server's connections."""

    is_client: bool
    cipher_suites: tuple[str, ...] = DEFAULT_SUITES
    # PSK: the client's identity and secret, the server's store.
    psk_identity: bytes | None = None
    psk: bytes | None = field(default=None, repr=False)
    psk_store: PskStore | None = None
    # X.509: own chain (leaf first) and key; peers verified against
    # trust_anchors, or not at all when it is None.
    certificate_chain: list[x509.Certificate] = field(default_factory=list)
    private_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    trust_anchors: list[x509.Certificate] | None = None
    #: Server: accept any client chain that verifies up to its own last
    #: certificate (Californium's --trust-all), trust_anchors or not.
    trust_all: bool = False
    client_auth: ClientAuth = ClientAuth.NONE
    server_name: str | None = None
    #: the wall-clock time certificates must be valid at; None lets the
    #: verifier use the current time (the only clock the engine consults)
    certificate_time: Callable[[], datetime.datetime] | None = None
    # CID (RFC 9146): a client offers a CID of cid_length bytes (None: no
    # extension); a server takes its CIDs from cid_generator (None or
    # length 0: CID off), unique among cids_in_use.
    cid_length: int | None = 6
    cid_generator: Any = None
    cids_in_use: Container[bytes] = frozenset()
    require_extended_master_secret: bool = True
    mtu: int = 1400
    initial_retransmit_timeout: float = 1.0
    max_retransmit_timeout: float = 60.0
    max_retransmissions: int = 7
    handshake_timeout: float = 120.0
    session_cache: SessionCache | None = None
    session: Session | None = None
    #: bytes of handshake messages buffered at once (a certificate chain fits)
    max_handshake_message: int = 32768
    random: Callable[[int], bytes] = os.urandom

    def suites(self) -> list[suites.CipherSuite]:
        return [suites.SUITES_BY_NAME[name] for name in self.cipher_suites]


# --- events ----------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeCompleted:
    cipher_suite: str
    peer_identity: str | None
    read_cid: bytes | None
    write_cid: bytes | None
    session_id: bytes
    resumed: bool
    session: Session | None


@dataclass(frozen=True)
class ApplicationData:
    data: bytes


@dataclass(frozen=True)
class AddressChanged:
    """RFC 9146 section 6: an authenticated, newer CID record came from a new
    address, which is now the peer's."""

    previous: Any
    current: Any


@dataclass(frozen=True)
class ConnectionClosed:
    """The connection ended: C{alert} is the alert description sent or
    received (None for a timeout), C{by_peer} tells who ended it."""

    alert: int | None
    reason: str
    by_peer: bool


Event = HandshakeCompleted | ApplicationData | AddressChanged | ConnectionClosed


class _State(enum.Enum):
    START = "start"
    WAIT_SERVER_HELLO = "wait_server_hello"
    WAIT_SERVER_HELLO_DONE = "wait_server_hello_done"
    WAIT_CLIENT_KEY_EXCHANGE = "wait_client_key_exchange"
    WAIT_CERTIFICATE_VERIFY = "wait_certificate_verify"
    WAIT_CHANGE_CIPHER_SPEC = "wait_change_cipher_spec"
    WAIT_FINISHED = "wait_finished"
    ESTABLISHED = "established"
    CLOSED = "closed"


class HandshakeFailure(Exception):
    """Ends the handshake with a fatal alert."""

    def __init__(self, alert: int, reason: str) -> None:
        super().__init__(reason)
        self.alert = alert
        self.reason = reason


class _Ignore(Exception):
    """An unauthenticated message that does not fit: drop it (RFC 6347
    section 4.1.2.7) rather than let an off-path sender end the handshake."""


@dataclass(frozen=True)
class _OutMessage:
    """One element of a flight: a handshake message or a ChangeCipherSpec."""

    epoch: int
    msg_type: int | None  # None: ChangeCipherSpec
    message_seq: int = 0
    body: bytes = b""


_GROUP_CURVES = {hs.GROUP_SECP256R1: ec.SECP256R1()}


class _Ephemeral:
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
            raise HandshakeFailure(ILLEGAL_PARAMETER, "bad ECDH public key") from error


_SUPPORTED_GROUPS = (hs.GROUP_X25519, hs.GROUP_SECP256R1)


def _identity_of_certificate(certificate: x509.Certificate) -> str:
    return certificate.subject.rfc4514_string()


class DtlsConnection:
    """One DTLS 1.2 association, client or server (see the module docstring)."""

    def __init__(
        self,
        configuration: DtlsConfiguration,
        peer_address: Any = None,
        drop_sink: Callable[[str], None] | None = None,
    ) -> None:
        """C{drop_sink(reason)} is told of every dropped record (counters)."""
        self.configuration = configuration
        self.is_client = configuration.is_client
        self.peer_address = peer_address
        self.dropped: Counter[str] = Counter()
        self._drop_sink = drop_sink
        self.cipher_suite: suites.CipherSuite | None = None
        self.peer_identity: str | None = None
        self.read_cid = b""
        self.write_cid = b""
        self.cid_negotiated = False
        self.session_id = b""
        self.failure_reason: str | None = None

        self._state = _State.START
        self._events: deque[Event] = deque()
        self._outgoing: list[bytes] = []
        self._read_states: dict[int, ReadState] = {0: ReadState(0, None)}
        self._read_epoch = 0
        self._write_states: dict[int, WriteState] = {0: WriteState(0, None)}
        self._write_epoch = 0
        self._pending_read: ReadState | None = None
        self._future_records: list[tuple[record.Record, Any]] = []
        self._early_data: list[bytes] = []
        self._reassembler = hs.Reassembler(configuration.max_handshake_message)
        self._next_send_seq = 0
        self._transcript = bytearray()

        # retransmission (RFC 6347 section 4.2.4)
        self._flight: list[_OutMessage] = []
        self._flight_expects_reply = False
        self._retransmit_at: float | None = None
        self._retransmit_interval = configuration.initial_retransmit_timeout
        self._retransmissions = 0
        self._flight_sent_at = float("-inf")
        self._handshake_deadline: float | None = None

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
        self._ephemeral: _Ephemeral | None = None
        self._server_key_exchange: hs.ServerKeyExchange | None = None
        self._peer_chain: list[x509.Certificate] = []
        self._certificate_requested = False
        self._sent_certificate = False
        self._psk: bytes | None = None
        self._hello_verify_count = 0
        self._secure_renegotiation = False
        self._last_record_sequence = 0
        if (
            not self.is_client
            and configuration.client_auth is not ClientAuth.NONE
            and configuration.trust_anchors is None
            and not configuration.trust_all
        ):
            raise ValueError("client authentication needs trust anchors")

    # --- public API ------------------------------------------------------------

    @property
    def is_established(self) -> bool:
        return self._state is _State.ESTABLISHED

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

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

    def _established_state(self) -> EstablishedState:
        """What continues this established connection elsewhere (snapshot.py)."""
        assert self._state is _State.ESTABLISHED and self.cipher_suite is not None and self._keys is not None
        reader = self._read_states[self._read_epoch]
        writer = self._write_states[self._write_epoch]
        write_keys, read_keys = self._keys
        return EstablishedState(
            session=Session(
                self.session_id,
                self.cipher_suite.code,
                self._master_secret,
                self._extended_master_secret,
                self.peer_identity,
            ),
            cid_negotiated=self.cid_negotiated,
            read_epoch=reader.epoch,
            read_keys=read_keys,
            read_cid=self.read_cid,
            read_highest=reader.window.highest,
            read_bitmap=reader.window.bitmap,
            write_epoch=writer.epoch,
            write_keys=write_keys,
            write_cid=self.write_cid,
            write_sequence=writer.next_sequence,
            peer_address=self.peer_address,
        )

    @classmethod
    def _restore(
        cls,
        configuration: DtlsConfiguration,
        state: EstablishedState,
        drop_sink: Callable[[str], None] | None = None,
    ) -> DtlsConnection:
        """A server connection continuing C{state}, established as if its
        handshake had just completed here (snapshot.restore_connection checks
        C{state} first).  No HandshakeCompleted: no handshake happened here."""
        connection = cls(configuration, state.peer_address, drop_sink)
        session = state.session
        suite = suites.SUITES[session.cipher_suite]
        connection.cipher_suite = suite
        connection.peer_identity = session.peer_identity
        connection.session_id = session.session_id
        connection.cid_negotiated = state.cid_negotiated
        connection.read_cid = state.read_cid
        connection.write_cid = state.write_cid
        connection._master_secret = session.master_secret
        connection._extended_master_secret = session.extended_master_secret
        connection._keys = (state.write_keys, state.read_keys)
        reader = ReadState(state.read_epoch, suite.protection(state.read_keys), state.read_cid)
        reader.window = ReplayWindow.continuing(state.read_highest, state.read_bitmap)
        connection._read_states[reader.epoch] = reader
        connection._read_epoch = reader.epoch
        writer = WriteState(state.write_epoch, suite.protection(state.write_keys), state.write_cid)
        writer.next_sequence = state.write_sequence
        connection._write_states[writer.epoch] = writer
        connection._write_epoch = writer.epoch
        connection._state = _State.ESTABLISHED
        cache = configuration.session_cache
        if session.session_id and cache is not None:
            cache.put(session)  # the client may resume it here later (RFC 5246 section 7.3)
        return connection

    def connect(self, now: float) -> None:
        """Client: start the handshake with a ClientHello (flight 1)."""
        assert self.is_client and self._state is _State.START
        config = self.configuration
        self._handshake_deadline = now + config.handshake_timeout
        self._client_random = config.random(32)
        offered = config.suites()
        extensions: dict[int, bytes] = {}
        if config.server_name:
            extensions[hs.EXT_SERVER_NAME] = hs.encode_server_name(config.server_name)
        if any(suite.key_exchange.uses_ecdhe for suite in offered):
            extensions[hs.EXT_SUPPORTED_GROUPS] = hs.encode_uint16_list(_SUPPORTED_GROUPS)
            extensions[hs.EXT_EC_POINT_FORMATS] = hs.vector(1, b"\x00")
        if any(suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA for suite in offered):
            extensions[hs.EXT_SIGNATURE_ALGORITHMS] = hs.encode_uint16_list([hs.ECDSA_SECP256R1_SHA256])
        extensions[hs.EXT_EXTENDED_MASTER_SECRET] = b""
        if config.cid_length is not None:
            self._own_cid = config.random(config.cid_length) if config.cid_length else b""
            extensions[hs.EXT_CONNECTION_ID] = hs.vector(1, self._own_cid)
        extensions[hs.EXT_RENEGOTIATION_INFO] = b"\x00"  # RFC 5746 section 3.4
        session_id = config.session.session_id if config.session is not None else b""
        self._client_hello = hs.ClientHello(
            record.DTLS_1_2,
            self._client_random,
            session_id,
            b"",
            [suite.code for suite in offered],
            b"\x00",
            extensions,
        )
        self._send_client_hello(now)

    def receive_datagram(self, data: bytes, now: float, address: Any = None) -> None:
        """Take one datagram from the peer (from C{address}, when known)."""
        if self._state is _State.CLOSED:
            self._drop("closed")
            return
        offset = 0
        try:
            while offset < len(data) and self._state is not _State.CLOSED:
                # Record by record: a ServerHello may negotiate the CID that
                # the next record of the same datagram (Finished) carries.
                received, offset = record.parse_record(data, offset, len(self.read_cid))
                if received is None:
                    self._drop("malformed")
                    break
                self._receive_record(received, now, address)
        except Exception as error:  # noqa: BLE001 - a bug ends this association, not the endpoint
            self._fail(INTERNAL_ERROR, "internal_error:%s" % type(error).__name__)

    def handle_timer(self, now: float) -> None:
        """Retransmit the current flight or give up (RFC 6347 section 4.2.4)."""
        if self._state is _State.CLOSED:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._close(None, "handshake_timeout", by_peer=False)
            return
        if self._retransmit_at is None or now < self._retransmit_at:
            return
        if self._retransmissions >= self.configuration.max_retransmissions:
            self._close(None, "handshake_timeout", by_peer=False)
            return
        self._retransmissions += 1
        self._retransmit_interval = min(self._retransmit_interval * 2, self.configuration.max_retransmit_timeout)
        self._transmit_flight(now)

    def get_timer(self) -> float | None:
        """When to call handle_timer next, or None."""
        if self._state in (_State.CLOSED, _State.ESTABLISHED):
            return None
        candidates = [t for t in (self._retransmit_at, self._handshake_deadline) if t is not None]
        return min(candidates) if candidates else None

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Datagrams to write to the peer's current address, in order."""
        datagrams, self._outgoing = self._outgoing, []
        return datagrams

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def send_application_data(self, data: bytes) -> None:
        """Queue one application data record (one datagram)."""
        self._outgoing.append(self.seal_application_data(data))

    def seal_application_data(self, data: bytes) -> bytes:
        """The datagram carrying C{data} as one record, for a caller that
        writes it at once (the endpoint's hot path)."""
        if self._state is not _State.ESTABLISHED:
            raise RuntimeError("DTLS connection is not established")
        if len(data) > record.MAX_PLAINTEXT:
            raise ValueError("application data larger than one record")
        return self._write_states[self._write_epoch].seal(record.APPLICATION_DATA, data)

    def close(self) -> None:
        """Send close_notify and end the connection."""
        if self._state is _State.CLOSED:
            return
        self._send_alert(WARNING, CLOSE_NOTIFY)
        self._close(CLOSE_NOTIFY, "closed", by_peer=False)

    # --- records ---------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        """Count a dropped record: never answered (RFC 6347 section 4.1.2.7)."""
        self.dropped[reason] += 1
        if self._drop_sink is not None:
            self._drop_sink(reason)

    def _receive_record(self, received: record.Record, now: float, address: Any) -> None:
        state = self._read_states.get(received.epoch)
        if state is None:
            if (
                received.epoch == self._read_epoch + 1
                and self._state is not _State.ESTABLISHED
                and len(self._future_records) < _BUFFERED_FUTURE_RECORDS
                and len(received.fragment) <= _BUFFERED_RECORD_SIZE
            ):
                # RFC 6347 section 4.1: a next-epoch record may overtake the CCS.
                self._future_records.append((received, address))
            else:
                self._drop("epoch")
            return
        protected = state.protection is not None
        # The replay window guards authenticated epochs only: an unprotected
        # epoch-0 record could otherwise push the window past every genuine
        # one.  Duplicate handshake messages are caught by their message_seq.
        if protected and state.window.is_replay(received.sequence_number):
            self._drop("replay")
            return
        try:
            content_type, payload = state.open(received)
        except RecordError:
            self._drop("bad_mac" if protected else "malformed")
            return
        newer = received.sequence_number > state.window.highest
        if protected:
            state.window.mark(received.sequence_number)
        self._last_record_sequence = received.sequence_number
        if newer and address is not None and address != self.peer_address and received.content_type == record.TLS12_CID:
            # RFC 9146 section 6: only an authenticated, newer CID record moves the peer.
            previous, self.peer_address = self.peer_address, address
            self._events.append(AddressChanged(previous, address))
        if content_type == record.HANDSHAKE:
            self._receive_handshake(payload, received.epoch, now)
        elif content_type == record.CHANGE_CIPHER_SPEC:
            self._receive_change_cipher_spec(payload, received.epoch, now)
        elif content_type == record.ALERT:
            self._receive_alert(payload, received.epoch)
        elif content_type == record.APPLICATION_DATA:
            if received.epoch != self._read_epoch or received.epoch == 0:
                self._drop("unexpected")
            elif self._state is _State.ESTABLISHED:
                self._events.append(ApplicationData(payload))
            elif self._state is _State.WAIT_FINISHED and len(self._early_data) < _BUFFERED_FUTURE_RECORDS:
                # Authenticated data that overtook the peer's Finished: held
                # until the handshake completes, then delivered in order.
                self._early_data.append(payload)
            else:
                self._drop("unexpected")

    def _receive_alert(self, payload: bytes, epoch: int) -> None:
        if len(payload) != 2:
            self._drop("malformed")
            return
        level, description = payload
        if epoch == 0 and self._state is _State.ESTABLISHED:
            self._drop("unauthenticated_alert")  # forged plaintext alerts must not end a session
            return
        if description == CLOSE_NOTIFY:
            self._send_alert(WARNING, CLOSE_NOTIFY)
            self._close(CLOSE_NOTIFY, "close_notify", by_peer=True)
        elif level == FATAL:
            self._close(description, "alert_%d" % description, by_peer=True)

    def _receive_change_cipher_spec(self, payload: bytes, epoch: int, now: float) -> None:
        if payload != b"\x01" or epoch != self._read_epoch:
            self._drop("unexpected")
            return
        if self._state is not _State.WAIT_CHANGE_CIPHER_SPEC or self._pending_read is None:
            # Arrived before the messages it follows (or a duplicate): the peer
            # retransmits its flight, CCS included (RFC 6347 section 4.2.4).
            self._drop("unexpected")
            return
        self._read_states[self._pending_read.epoch] = self._pending_read
        self._read_epoch = self._pending_read.epoch
        self._pending_read = None
        self._state = _State.WAIT_FINISHED
        buffered, self._future_records = self._future_records, []
        for received, address in buffered:
            self._receive_record(received, now, address)

    # --- handshake messages -------------------------------------------------------

    def _receive_handshake(self, payload: bytes, epoch: int, now: float) -> None:
        try:
            fragments = hs.parse_fragments(payload)
        except hs.DecodeError:
            self._drop("malformed")
            return
        peer_retransmitted = False
        for fragment in fragments:
            if (
                self._state is _State.START
                and not self.is_client
                and fragment.msg_type == hs.CLIENT_HELLO
                and fragment.message_seq < self._reassembler.window
            ):
                # After a stateless HelloVerifyRequest the ClientHello's
                # message_seq is 1: both sides continue from it (RFC 6347
                # section 4.2.2).
                self._reassembler.restart_at(fragment.message_seq)
            verdict = self._reassembler.add(fragment, epoch)
            if verdict == "old":
                peer_retransmitted = True
            elif verdict == "rejected":
                self._drop("fragment")
        while self._state is not _State.CLOSED:
            message = self._reassembler.pop()
            if message is None:
                break
            msg_type, message_seq, message_epoch, body = message
            try:
                self._dispatch(msg_type, message_seq, message_epoch, body, now)
            except _Ignore:
                self._drop("unexpected")
                self._reassembler.restart_at(message_seq)
                break
            except HandshakeFailure as failure:
                self._fail(failure.alert, failure.reason)
            except hs.DecodeError:
                if message_epoch == 0:
                    self._drop("malformed")
                    self._reassembler.restart_at(message_seq)
                    break
                self._fail(DECODE_ERROR, "decode_error")
        if peer_retransmitted and self._flight and now - self._flight_sent_at >= self._retransmit_interval / 2:
            # The peer lost our last flight: send it again at once.
            self._transmit_flight(now)

    def _dispatch(self, msg_type: int, message_seq: int, epoch: int, body: bytes, now: float) -> None:
        state = self._state
        if state is _State.ESTABLISHED:
            if msg_type in (hs.HELLO_REQUEST, hs.CLIENT_HELLO) and epoch > 0:
                # Renegotiation is refused (RFC 5746 section 4.5 semantics).
                self._send_alert(WARNING, NO_RENEGOTIATION)
                return
            raise _Ignore()
        if (msg_type == hs.FINISHED) != (epoch > 0):
            raise _Ignore()  # only Finished travels in the new epoch (no renegotiation)
        message = hs.encode_message(msg_type, message_seq, body)
        if self.is_client:
            self._client_dispatch(state, msg_type, body, message, now)
        else:
            self._server_dispatch(state, msg_type, body, message, now)

    # --- client -----------------------------------------------------------------

    def _send_client_hello(self, now: float) -> None:
        assert self._client_hello is not None
        seq = self._next_send_seq
        self._next_send_seq += 1
        body = self._client_hello.encode()
        self._transcript = bytearray(hs.encode_message(hs.CLIENT_HELLO, seq, body))
        self._reassembler.restart_at(seq)
        self._state = _State.WAIT_SERVER_HELLO
        self._start_flight([_OutMessage(0, hs.CLIENT_HELLO, seq, body)], now, expects_reply=True)

    def _client_dispatch(self, state: _State, msg_type: int, body: bytes, message: bytes, now: float) -> None:
        if state is _State.WAIT_SERVER_HELLO and msg_type == hs.HELLO_VERIFY_REQUEST:
            cookie = hs.decode_hello_verify_request(body)
            self._hello_verify_count += 1
            if self._hello_verify_count > _MAX_HELLO_VERIFY:
                raise HandshakeFailure(HANDSHAKE_FAILURE, "too_many_hello_verify_requests")
            assert self._client_hello is not None
            self._client_hello.cookie = cookie
            self._retransmissions = 0
            self._retransmit_interval = self.configuration.initial_retransmit_timeout
            self._send_client_hello(now)
        elif state is _State.WAIT_SERVER_HELLO and msg_type == hs.SERVER_HELLO:
            self._client_server_hello(hs.ServerHello.decode(body), message, now)
        elif state is _State.WAIT_SERVER_HELLO_DONE and msg_type == hs.CERTIFICATE:
            self._client_certificate(body, message)
        elif state is _State.WAIT_SERVER_HELLO_DONE and msg_type == hs.SERVER_KEY_EXCHANGE:
            self._client_server_key_exchange(body, message)
        elif state is _State.WAIT_SERVER_HELLO_DONE and msg_type == hs.CERTIFICATE_REQUEST:
            if self.cipher_suite is None or self.cipher_suite.key_exchange is not suites.KeyExchange.ECDHE_ECDSA:
                raise HandshakeFailure(UNEXPECTED_MESSAGE, "certificate_request_with_psk")
            hs.CertificateRequest.decode(body)
            self._certificate_requested = True
            self._transcript += message
        elif state is _State.WAIT_SERVER_HELLO_DONE and msg_type == hs.SERVER_HELLO_DONE:
            if body:
                raise hs.DecodeError("ServerHelloDone with a body")
            self._transcript += message
            self._client_key_exchange_flight(now)
        elif state is _State.WAIT_FINISHED and msg_type == hs.FINISHED:
            self._check_finished(body, is_client_finished=False)
            self._transcript += message
            self._finish_handshake(now, send_final_flight=self._resuming)
        else:
            raise _Ignore()

    def _client_server_hello(self, hello: hs.ServerHello, message: bytes, now: float) -> None:
        config = self.configuration
        if hello.version != record.DTLS_1_2:
            raise HandshakeFailure(PROTOCOL_VERSION, "server_version")
        assert self._client_hello is not None
        suite = suites.SUITES.get(hello.cipher_suite)
        if suite is None or hello.cipher_suite not in self._client_hello.cipher_suites or hello.compression_method:
            raise HandshakeFailure(ILLEGAL_PARAMETER, "server_chose_unoffered_parameters")
        offered_extensions = set(self._client_hello.extensions)
        if not set(hello.extensions) <= offered_extensions:
            raise HandshakeFailure(UNSUPPORTED_EXTENSION, "unsolicited_extension")
        renegotiation = hello.extensions.get(hs.EXT_RENEGOTIATION_INFO)
        if renegotiation is not None and renegotiation != b"\x00":
            raise HandshakeFailure(HANDSHAKE_FAILURE, "renegotiation_info")
        self._extended_master_secret = hs.EXT_EXTENDED_MASTER_SECRET in hello.extensions
        if hello.extensions.get(hs.EXT_EXTENDED_MASTER_SECRET, b"") != b"":
            raise hs.DecodeError("extended_master_secret with a body")
        if config.require_extended_master_secret and not self._extended_master_secret:
            raise HandshakeFailure(HANDSHAKE_FAILURE, "no_extended_master_secret")
        cid_body = hello.extensions.get(hs.EXT_CONNECTION_ID)
        if cid_body is not None:
            self.write_cid = hs.decode_single_vector(cid_body, 1)
            self.read_cid = self._own_cid
            self.cid_negotiated = True
        self.cipher_suite = suite
        self._server_random = hello.random
        self.session_id = hello.session_id
        self._transcript += message
        session = config.session
        if session is not None and hello.session_id and hello.session_id == session.session_id:
            # Abbreviated handshake (RFC 5246 section 7.3).
            if session.cipher_suite != suite.code:
                raise HandshakeFailure(ILLEGAL_PARAMETER, "resumed_suite_mismatch")
            if session.extended_master_secret != self._extended_master_secret:
                raise HandshakeFailure(HANDSHAKE_FAILURE, "resumed_ems_mismatch")  # RFC 7627 section 5.3
            self._resuming = True
            self._master_secret = session.master_secret
            self.peer_identity = session.peer_identity
            self._install_keys()
            self._state = _State.WAIT_CHANGE_CIPHER_SPEC
            self._stop_retransmissions()
        else:
            if suite.key_exchange.uses_psk and (config.psk is None or config.psk_identity is None):
                raise HandshakeFailure(HANDSHAKE_FAILURE, "no_psk_configured")
            self._state = _State.WAIT_SERVER_HELLO_DONE
            self._stop_retransmissions()

    def _client_certificate(self, body: bytes, message: bytes) -> None:
        assert self.cipher_suite is not None
        if self.cipher_suite.key_exchange is not suites.KeyExchange.ECDHE_ECDSA or self._peer_chain:
            raise _Ignore()
        self._peer_chain = self._verify_certificates(hs.decode_certificate(body), self.configuration.server_name)
        if not self._peer_chain:
            raise HandshakeFailure(BAD_CERTIFICATE, "empty_server_certificate")
        self.peer_identity = _identity_of_certificate(self._peer_chain[0])
        self._transcript += message

    def _client_server_key_exchange(self, body: bytes, message: bytes) -> None:
        suite = self.cipher_suite
        assert suite is not None
        signed = suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA
        if signed and not self._peer_chain:
            raise _Ignore()
        exchange = hs.ServerKeyExchange.decode(body, suite.key_exchange.uses_psk, suite.key_exchange.uses_ecdhe, signed)
        if suite.key_exchange.uses_ecdhe:
            if exchange.group not in _SUPPORTED_GROUPS:
                raise HandshakeFailure(ILLEGAL_PARAMETER, "unsupported_group")
        if signed:
            if exchange.signature_algorithm != hs.ECDSA_SECP256R1_SHA256:
                raise HandshakeFailure(ILLEGAL_PARAMETER, "unsupported_signature_algorithm")
            signed_data = self._client_random + self._server_random + exchange.ecdh_params()
            self._verify_signature(self._peer_chain[0], exchange.signature or b"", signed_data)
        self._server_key_exchange = exchange
        self._transcript += message

    def _client_key_exchange_flight(self, now: float) -> None:
        config, suite = self.configuration, self.cipher_suite
        assert suite is not None
        if suite.key_exchange.uses_ecdhe and self._server_key_exchange is None:
            raise HandshakeFailure(UNEXPECTED_MESSAGE, "missing_server_key_exchange")
        if suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA and not self._peer_chain:
            raise HandshakeFailure(UNEXPECTED_MESSAGE, "missing_server_certificate")
        flight: list[_OutMessage] = []
        if self._certificate_requested:
            chain = [c.public_bytes(serialization.Encoding.DER) for c in config.certificate_chain]
            self._sent_certificate = bool(chain) and config.private_key is not None
            flight.append(
                self._handshake_message(hs.CERTIFICATE, hs.encode_certificate(chain if self._sent_certificate else []))
            )
        exchange = hs.ClientKeyExchange()
        other_secret: bytes | None = None
        if suite.key_exchange.uses_psk:
            assert config.psk is not None
            exchange.psk_identity = config.psk_identity
            self.peer_identity = (config.psk_identity or b"").decode("utf-8", "replace")
            self._psk = config.psk
        if suite.key_exchange.uses_ecdhe:
            server = self._server_key_exchange
            assert server is not None and server.group is not None and server.public_key is not None
            self._ephemeral = _Ephemeral(server.group)
            exchange.public_key = self._ephemeral.public
            other_secret = self._ephemeral.exchange(server.public_key)
        flight.append(self._handshake_message(hs.CLIENT_KEY_EXCHANGE, exchange.encode()))
        self._derive_master_secret(other_secret)
        if self._sent_certificate:
            assert config.private_key is not None
            signature = config.private_key.sign(bytes(self._transcript), ec.ECDSA(hashes.SHA256()))
            flight.append(
                self._handshake_message(
                    hs.CERTIFICATE_VERIFY, hs.encode_digitally_signed(hs.ECDSA_SECP256R1_SHA256, signature)
                )
            )
        self._install_keys()
        flight.extend(self._finished_messages())
        self._state = _State.WAIT_CHANGE_CIPHER_SPEC
        self._start_flight(flight, now, expects_reply=True)

    # --- server -----------------------------------------------------------------

    def _server_dispatch(self, state: _State, msg_type: int, body: bytes, message: bytes, now: float) -> None:
        if state is _State.START and msg_type == hs.CLIENT_HELLO:
            self._handshake_deadline = now + self.configuration.handshake_timeout
            self._server_client_hello(hs.ClientHello.decode(body), message, now)
        elif state is _State.WAIT_CLIENT_KEY_EXCHANGE and msg_type == hs.CERTIFICATE:
            self._server_client_certificate(body, message)
        elif state is _State.WAIT_CLIENT_KEY_EXCHANGE and msg_type == hs.CLIENT_KEY_EXCHANGE:
            self._server_client_key_exchange(body, message)
        elif state is _State.WAIT_CERTIFICATE_VERIFY and msg_type == hs.CERTIFICATE_VERIFY:
            algorithm, signature = hs.decode_digitally_signed(body)
            if algorithm != hs.ECDSA_SECP256R1_SHA256:
                raise HandshakeFailure(ILLEGAL_PARAMETER, "unsupported_signature_algorithm")
            self._verify_signature(self._peer_chain[0], signature, bytes(self._transcript))
            self._transcript += message
            self._install_keys()
            self._state = _State.WAIT_CHANGE_CIPHER_SPEC
        elif state is _State.WAIT_FINISHED and msg_type == hs.FINISHED:
            self._check_finished(body, is_client_finished=True)
            self._transcript += message
            self._finish_handshake(now, send_final_flight=not self._resuming)
        else:
            raise _Ignore()

    def _server_client_hello(self, hello: hs.ClientHello, message: bytes, now: float) -> None:
        config = self.configuration
        self._next_send_seq = self._reassembler.next_seq - 1  # RFC 6347 section 4.2.2
        # DTLS versions count down (1.0 is 0xfeff, 1.2 0xfefd): a larger
        # number is an older version we do not speak.
        if hello.version > record.DTLS_1_2 or hello.version >> 8 != 0xFE:
            raise HandshakeFailure(PROTOCOL_VERSION, "client_version")
        # After a HelloVerifyRequest continue the record numbers from the
        # ClientHello's, so the client's epoch 0 window accepts ours.
        writer = self._write_states[0]
        if self._last_record_sequence < _MAX_ADOPTED_SEQUENCE:  # a hostile value must not exhaust ours
            writer.next_sequence = max(writer.next_sequence, self._last_record_sequence)
        if 0 not in hello.compression_methods:
            raise HandshakeFailure(ILLEGAL_PARAMETER, "no_null_compression")
        self._client_hello = hello
        self._client_random = hello.random
        self._transcript = bytearray(message)
        extensions = hello.extensions
        self._extended_master_secret = hs.EXT_EXTENDED_MASTER_SECRET in extensions
        if config.require_extended_master_secret and not self._extended_master_secret:
            raise HandshakeFailure(HANDSHAKE_FAILURE, "no_extended_master_secret")
        self._secure_renegotiation = (
            hs.TLS_EMPTY_RENEGOTIATION_INFO_SCSV in hello.cipher_suites or hs.EXT_RENEGOTIATION_INFO in extensions
        )
        if extensions.get(hs.EXT_RENEGOTIATION_INFO, b"\x00") != b"\x00":
            raise HandshakeFailure(HANDSHAKE_FAILURE, "renegotiation_info")
        groups = (
            hs.uint16_list(extensions[hs.EXT_SUPPORTED_GROUPS])
            if hs.EXT_SUPPORTED_GROUPS in extensions
            else [hs.GROUP_SECP256R1]
        )
        algorithms = (
            hs.uint16_list(extensions[hs.EXT_SIGNATURE_ALGORITHMS]) if hs.EXT_SIGNATURE_ALGORITHMS in extensions else []
        )
        if hs.EXT_SERVER_NAME in extensions:
            hs.decode_server_name(extensions[hs.EXT_SERVER_NAME])
        client_cid = (
            hs.decode_single_vector(extensions[hs.EXT_CONNECTION_ID], 1) if hs.EXT_CONNECTION_ID in extensions else None
        )

        server_extensions: dict[int, bytes] = {}
        if self._secure_renegotiation:
            server_extensions[hs.EXT_RENEGOTIATION_INFO] = b"\x00"
        if self._extended_master_secret:
            server_extensions[hs.EXT_EXTENDED_MASTER_SECRET] = b""
        generator = config.cid_generator
        if client_cid is not None and generator is not None and generator.length > 0:
            self.read_cid = generator.newConnectionId(config.cids_in_use)
            self.write_cid = client_cid
            self.cid_negotiated = True
            server_extensions[hs.EXT_CONNECTION_ID] = hs.vector(1, self.read_cid)
        self._server_random = config.random(32)
        session = self._resumable_session(hello)
        if session is not None:
            self._server_resume(session, server_extensions, now)
        else:
            suite, group = self._choose_suite(hello.cipher_suites, groups, algorithms)
            self._server_full_handshake(suite, group, server_extensions, now)

    def _server_resume(self, session: Session, server_extensions: dict[int, bytes], now: float) -> None:
        """Abbreviated handshake: ServerHello, ChangeCipherSpec, Finished."""
        assert self._client_hello is not None
        self._resuming = True
        self.cipher_suite = suites.SUITES[session.cipher_suite]
        self._master_secret = session.master_secret
        self.peer_identity = session.peer_identity
        self.session_id = session.session_id
        if self.cipher_suite.key_exchange.uses_ecdhe and hs.EXT_EC_POINT_FORMATS in self._client_hello.extensions:
            server_extensions[hs.EXT_EC_POINT_FORMATS] = hs.vector(1, b"\x00")
        flight = [self._server_hello(server_extensions)]
        self._install_keys()
        flight.extend(self._finished_messages())
        self._state = _State.WAIT_CHANGE_CIPHER_SPEC
        self._start_flight(flight, now, expects_reply=True)

    def _server_full_handshake(
        self, suite: suites.CipherSuite, group: int | None, server_extensions: dict[int, bytes], now: float
    ) -> None:
        """Flight 4: ServerHello, [Certificate], [ServerKeyExchange],
        [CertificateRequest], ServerHelloDone."""
        config = self.configuration
        assert self._client_hello is not None
        extensions = self._client_hello.extensions
        self.cipher_suite = suite
        if suite.key_exchange.uses_ecdhe and hs.EXT_EC_POINT_FORMATS in extensions:
            if 0 not in hs.decode_single_vector(extensions[hs.EXT_EC_POINT_FORMATS], 1, 1):
                raise HandshakeFailure(ILLEGAL_PARAMETER, "no_uncompressed_points")
            server_extensions[hs.EXT_EC_POINT_FORMATS] = hs.vector(1, b"\x00")
        self.session_id = config.random(32) if config.session_cache is not None else b""
        flight = [self._server_hello(server_extensions)]
        if suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA:
            chain = [c.public_bytes(serialization.Encoding.DER) for c in config.certificate_chain]
            flight.append(self._handshake_message(hs.CERTIFICATE, hs.encode_certificate(chain)))
        if suite.key_exchange.uses_ecdhe:
            assert group is not None
            self._ephemeral = _Ephemeral(group)
            exchange = hs.ServerKeyExchange(group=group, public_key=self._ephemeral.public)
            if suite.key_exchange is suites.KeyExchange.ECDHE_PSK:
                exchange.psk_identity_hint = b""
            else:
                assert config.private_key is not None
                exchange.signature_algorithm = hs.ECDSA_SECP256R1_SHA256
                exchange.signature = config.private_key.sign(
                    self._client_random + self._server_random + exchange.ecdh_params(), ec.ECDSA(hashes.SHA256())
                )
            flight.append(self._handshake_message(hs.SERVER_KEY_EXCHANGE, exchange.encode()))
        if suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA and config.client_auth is not ClientAuth.NONE:
            self._certificate_requested = True
            request = hs.CertificateRequest(bytes((hs.CERT_TYPE_ECDSA_SIGN,)), [hs.ECDSA_SECP256R1_SHA256])
            flight.append(self._handshake_message(hs.CERTIFICATE_REQUEST, request.encode()))
        flight.append(self._handshake_message(hs.SERVER_HELLO_DONE, b""))
        self._state = _State.WAIT_CLIENT_KEY_EXCHANGE
        self._start_flight(flight, now, expects_reply=True)

    def _resumable_session(self, hello: hs.ClientHello) -> Session | None:
        cache = self.configuration.session_cache
        if cache is None or not hello.session_id:
            return None
        session = cache.get(hello.session_id)
        if session is None or session.cipher_suite not in hello.cipher_suites:
            return None
        if session.cipher_suite not in {suite.code for suite in self.configuration.suites()}:
            return None
        if session.extended_master_secret != self._extended_master_secret:
            return None  # RFC 7627 section 5.3: fall back to a full handshake
        return session

    def _choose_suite(
        self, offered: list[int], groups: list[int], algorithms: list[int]
    ) -> tuple[suites.CipherSuite, int | None]:
        """The server's most preferred suite the client offered and both can use."""
        config = self.configuration
        common_group = next((g for g in _SUPPORTED_GROUPS if g in groups), None)
        for suite in config.suites():
            if suite.code not in offered:
                continue
            if suite.key_exchange.uses_psk and not config.psk_store:
                continue
            if suite.key_exchange.uses_ecdhe and common_group is None:
                continue
            if suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA and (
                not config.certificate_chain
                or config.private_key is None
                or hs.ECDSA_SECP256R1_SHA256 not in algorithms
                # RFC 8422 section 5.1: the client must support our certificate's curve too
                or hs.GROUP_SECP256R1 not in groups
            ):
                continue
            return suite, (common_group if suite.key_exchange.uses_ecdhe else None)
        raise HandshakeFailure(HANDSHAKE_FAILURE, "no_common_cipher_suite")

    def _server_hello(self, extensions: dict[int, bytes]) -> _OutMessage:
        assert self.cipher_suite is not None
        hello = hs.ServerHello(
            record.DTLS_1_2, self._server_random, self.session_id, self.cipher_suite.code, 0, extensions
        )
        return self._handshake_message(hs.SERVER_HELLO, hello.encode())

    def _server_client_certificate(self, body: bytes, message: bytes) -> None:
        if not self._certificate_requested or self._peer_chain:
            raise _Ignore()
        chain = self._verify_certificates(hs.decode_certificate(body), None)
        if not chain and self.configuration.client_auth is ClientAuth.NEEDED:
            raise HandshakeFailure(HANDSHAKE_FAILURE, "client_certificate_required")
        self._peer_chain = chain
        if chain:
            self.peer_identity = _identity_of_certificate(chain[0])
        self._transcript += message

    def _server_client_key_exchange(self, body: bytes, message: bytes) -> None:
        config, suite = self.configuration, self.cipher_suite
        assert suite is not None
        if self._certificate_requested and not self._peer_chain and config.client_auth is ClientAuth.NEEDED:
            raise HandshakeFailure(HANDSHAKE_FAILURE, "client_certificate_required")
        exchange = hs.ClientKeyExchange.decode(body, suite.key_exchange.uses_psk, suite.key_exchange.uses_ecdhe)
        if suite.key_exchange.uses_psk:
            assert config.psk_store is not None and exchange.psk_identity is not None
            psk = config.psk_store.lookup(exchange.psk_identity)
            if psk is None:
                raise HandshakeFailure(UNKNOWN_PSK_IDENTITY, "unknown_psk_identity")
            self._psk = psk
            self.peer_identity = exchange.psk_identity.decode("utf-8", "replace")
        other_secret = None
        if suite.key_exchange.uses_ecdhe:
            assert self._ephemeral is not None and exchange.public_key is not None
            other_secret = self._ephemeral.exchange(exchange.public_key)
        self._transcript += message
        self._derive_master_secret(other_secret)
        if self._peer_chain:
            self._state = _State.WAIT_CERTIFICATE_VERIFY
        else:
            self._install_keys()
            self._state = _State.WAIT_CHANGE_CIPHER_SPEC
        self._stop_retransmissions()

    # --- shared handshake machinery -------------------------------------------------

    def _handshake_message(self, msg_type: int, body: bytes) -> _OutMessage:
        """A new outgoing handshake message, added to the transcript."""
        seq = self._next_send_seq
        self._next_send_seq += 1
        self._transcript += hs.encode_message(msg_type, seq, body)
        return _OutMessage(self._write_epoch, msg_type, seq, body)

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

    def _finished_messages(self) -> list[_OutMessage]:
        """ChangeCipherSpec then Finished in the new epoch."""
        verify_data = suites.finished_verify_data(
            self._master_secret, self.is_client, suites.sha256(bytes(self._transcript))
        )
        ccs = _OutMessage(self._write_epoch, None)
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
            raise HandshakeFailure(DECRYPT_ERROR, "bad_finished")

    def _verify_certificates(self, ders: list[bytes], server_name: str | None) -> list[x509.Certificate]:
        try:
            chain = [x509.load_der_x509_certificate(der) for der in ders]
            leaf_key = chain[0].public_key() if chain else None
        except (ValueError, UnsupportedAlgorithm) as error:
            raise HandshakeFailure(BAD_CERTIFICATE, "undecodable_certificate") from error
        anchors = self.configuration.trust_anchors
        if chain and self.configuration.trust_all and not self.is_client:
            anchors = chain[-1:]  # --trust-all: the chain's own root
        if chain and anchors is not None:
            try:
                at = self.configuration.certificate_time
                verify_chain(chain, anchors, server_name, at() if at is not None else None)
            except CredentialsError as error:
                raise HandshakeFailure(BAD_CERTIFICATE, "certificate_rejected") from error
        if chain and not isinstance(leaf_key, ec.EllipticCurvePublicKey):
            raise HandshakeFailure(BAD_CERTIFICATE, "certificate_key_not_ec")
        return chain

    @staticmethod
    def _verify_signature(certificate: x509.Certificate, signature: bytes, data: bytes) -> None:
        key = certificate.public_key()
        try:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as error:
            raise HandshakeFailure(DECRYPT_ERROR, "bad_signature") from error

    def _complete(self, now: float) -> None:
        suite = self.cipher_suite
        assert suite is not None
        self._state = _State.ESTABLISHED
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

    def _start_flight(self, messages: list[_OutMessage], now: float, expects_reply: bool) -> None:
        self._flight = messages
        self._flight_expects_reply = expects_reply
        self._retransmissions = 0
        self._retransmit_interval = self.configuration.initial_retransmit_timeout
        self._transmit_flight(now)

    def _stop_retransmissions(self) -> None:
        """The peer's next flight has begun: our timer stops (RFC 6347 4.2.4)."""
        self._retransmit_at = None

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

    def _fail(self, alert: int, reason: str) -> None:
        self._send_alert(FATAL, alert)
        self._close(alert, reason, by_peer=False)

    def _close(self, alert: int | None, reason: str, by_peer: bool) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self.failure_reason = reason if reason not in ("closed", "close_notify") else None
        self._retransmit_at = None
        self._flight = []
        self._events.append(ConnectionClosed(alert, reason, by_peer))
