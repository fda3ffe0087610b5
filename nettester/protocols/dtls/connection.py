"""The sans-IO DTLS 1.2 connection (RFC 6347, RFC 9146, RFC 7627).

One ``DtlsConnection`` per peer, client or server, in the style of aioquic's
``QuicConnection``: datagrams and the current time go in
(``receive_datagram(data, addr, now)``, ``handle_timer(now)``), datagrams,
one timer and events come out (``datagrams_to_send()``, ``get_timer()``,
``next_event()``).  It never reads a clock and never touches a socket.

This module holds the record layer and the public API; the handshake
messages of each side are in ``client_handshake.py`` and
``server_handshake.py``, what both share in ``core.py``, the configuration
in ``configuration.py`` and the events in ``events.py`` (re-exported here).

A server connection is created by its endpoint only after the ClientHello
passed the stateless cookie check (``peers.Admission``); the connection
itself trusts the ClientHello it is first given.
"""

from __future__ import annotations

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.alerts import (
    BAD_RECORD_MAC,
    CLOSE_NOTIFY,
    DECODE_ERROR,
    FATAL,
    INTERNAL_ERROR,
    NO_RENEGOTIATION,
    WARNING,
)
from nettester.protocols.dtls.client_handshake import ClientHandshake
from nettester.protocols.dtls.configuration import (
    DEFAULT_SUITES,
    Address,
    ClientAuth,
    DtlsConfiguration,
    EstablishedState,
    Session,
    SessionCache,
)
from nettester.protocols.dtls.core import (
    BUFFERED_FUTURE_RECORDS,
    BUFFERED_RECORD_SIZE,
    State,
)
from nettester.protocols.dtls.events import (
    AddressChanged,
    ApplicationData,
    ConnectionClosed,
    DtlsEvent,
    Event,
    HandshakeCompleted,
    HandshakeError,
    IgnoredMessageError,
    RenegotiationRefused,
)
from nettester.protocols.dtls.record import (
    ReadState,
    RecordError,
    ReplayWindow,
    WriteState,
)
from nettester.protocols.dtls.server_handshake import ServerHandshake

__all__ = [
    "DEFAULT_SUITES",
    "AddressChanged",
    "ApplicationData",
    "ClientAuth",
    "ConnectionClosed",
    "DtlsConfiguration",
    "DtlsConnection",
    "DtlsEvent",
    "EstablishedState",
    "Event",
    "HandshakeCompleted",
    "HandshakeError",
    "RenegotiationRefused",
    "Session",
    "SessionCache",
]


class DtlsConnection(ClientHandshake, ServerHandshake):
    """One DTLS 1.2 association, client or server (see the module docstring)."""

    # --- public API ------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address | None, now: float) -> None:
        """Take one datagram from the peer, received from ``addr`` (None when
        unknown) at ``now``."""
        if self._state is State.CLOSED:
            self._drop("closed")
            return
        self._datagrams += 1
        offset = 0
        try:
            while offset < len(data) and self._state is not State.CLOSED:
                # Record by record: a ServerHello may negotiate the CID that
                # the next record of the same datagram (Finished) carries.
                received, offset = record.parse_record(data, offset, len(self.read_cid))
                if received is None:
                    self._drop("malformed")
                    break
                self._receive_record(received, now, addr)
        except Exception as error:  # noqa: BLE001 - a bug ends this association, not the endpoint
            self._fail(INTERNAL_ERROR, "internal_error:%s" % type(error).__name__)

    def handle_timer(self, now: float) -> None:
        """Retransmit the current flight or give up (RFC 6347 section 4.2.4)."""
        if self._state is State.CLOSED:
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
        if self._state in (State.CLOSED, State.ESTABLISHED):
            return None
        candidates = [t for t in (self._retransmit_at, self._handshake_deadline) if t is not None]
        return min(candidates) if candidates else None

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams to write to the peer's current address, in order."""
        datagrams, self._outgoing = self._outgoing, []
        return datagrams

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def send_application_data(self, data: bytes) -> None:
        """Queue one application data record (one datagram)."""
        self._outgoing.append(self.seal_application_data(data))

    def seal_application_data(self, data: bytes) -> bytes:
        """The datagram carrying ``data`` as one record, for a caller that
        writes it at once (the endpoint's hot path)."""
        if self._state is not State.ESTABLISHED:
            raise RuntimeError("DTLS connection is not established")
        if len(data) > record.MAX_PLAINTEXT:
            raise ValueError("application data larger than one record")
        return self._write_states[self._write_epoch].seal(record.APPLICATION_DATA, data)

    def close(self) -> None:
        """Send close_notify and end the connection."""
        if self._state is State.CLOSED:
            return
        self._send_alert(WARNING, CLOSE_NOTIFY)
        self._close(CLOSE_NOTIFY, "closed", by_peer=False)

    # --- records ---------------------------------------------------------------

    def _receive_record(
        self, received: record.Record, now: float, address: Address | None, replayed: bool = False
    ) -> None:
        """One record; ``replayed``: it arrived before the peer's CCS and
        waited for it."""
        state = self._read_states.get(received.epoch)
        if state is None:
            if (
                received.epoch == self._read_epoch + 1
                and self._state is not State.ESTABLISHED
                and len(self._future_records) < BUFFERED_FUTURE_RECORDS
                and len(received.fragment) <= BUFFERED_RECORD_SIZE
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
            if protected and not replayed and self._finished_fails_to_open(received):
                self._fail(BAD_RECORD_MAC, "bad_record_mac", self._wrong_key_detail())
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
            elif self._state is State.ESTABLISHED:
                self._events.append(ApplicationData(payload))
            elif self._state is State.WAIT_FINISHED and len(self._early_data) < BUFFERED_FUTURE_RECORDS:
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
        if epoch == 0 and self._state is State.ESTABLISHED:
            self._drop("unauthenticated_alert")  # forged plaintext alerts must not end a session
            return
        if description == CLOSE_NOTIFY:
            self._send_alert(WARNING, CLOSE_NOTIFY)
            self._close(CLOSE_NOTIFY, "close_notify", by_peer=True)
        elif level == FATAL:
            self._peer_alert(level, description)

    def _finished_fails_to_open(self, received: record.Record) -> bool:
        """Whether a record that failed authentication means our keys differ
        from the peer's (a wrong PSK), so the handshake ends at once with a
        fatal alert, as RFC 6347 section 4.1.2.7 allows, rather than timing
        out in silence.  A Finished-like record of the new epoch must fail in
        the datagram of the peer's ChangeCipherSpec, or twice (the peer
        resends its flight): one forged record cannot end a handshake."""
        if (
            self._state is not State.WAIT_FINISHED
            or received.epoch != self._read_epoch
            or received.content_type not in (record.HANDSHAKE, record.TLS12_CID)
            or len(received.fragment) < hs.HEADER_LENGTH + suites.VERIFY_DATA_LENGTH
        ):
            return False
        self._finished_failures += 1
        return self._finished_failures >= 2 or self._ccs_datagram == self._datagrams

    def _wrong_key_detail(self) -> str:
        """What a Finished that does not check out means, for a person."""
        suite = self.cipher_suite
        if suite is not None and suite.key_exchange.uses_psk and not self.is_client:
            return 'wrong key for PSK identity "%s"' % self.peer_identity
        if suite is not None and suite.key_exchange.uses_psk:
            return "the server's Finished does not check out: wrong PSK?"
        return "the peer's Finished does not check out"

    def _receive_change_cipher_spec(self, payload: bytes, epoch: int, now: float) -> None:
        if payload != b"\x01" or epoch != self._read_epoch:
            self._drop("unexpected")
            return
        if self._state is not State.WAIT_CHANGE_CIPHER_SPEC or self._pending_read is None:
            # Arrived before the messages it follows (or a duplicate): the peer
            # retransmits its flight, CCS included (RFC 6347 section 4.2.4).
            self._drop("unexpected")
            return
        self._read_states[self._pending_read.epoch] = self._pending_read
        self._read_epoch = self._pending_read.epoch
        self._pending_read = None
        self._state = State.WAIT_FINISHED
        buffered, self._future_records = self._future_records, []
        self._ccs_datagram = self._datagrams
        for received, address in buffered:
            self._receive_record(received, now, address, replayed=True)

    # --- handshake messages -------------------------------------------------------

    def _receive_handshake(self, payload: bytes, epoch: int, now: float) -> None:
        try:
            fragments = hs.parse_fragments(payload)
        except hs.DecodeError:
            self._drop("malformed")
            return
        peer_retransmitted = False
        renegotiation = hs.HELLO_REQUEST if self.is_client else hs.CLIENT_HELLO
        for fragment in fragments:
            if self._state is State.ESTABLISHED and epoch > 0 and fragment.msg_type == renegotiation:
                # A new handshake on the session (its message_seq starts
                # again at 0, RFC 6347 section 4.2.2): refused with a warning,
                # the session goes on (RFC 5246 section 7.2.2, RFC 5746).
                if fragment.offset == 0:
                    self._send_alert(WARNING, NO_RENEGOTIATION)
                    self._events.append(RenegotiationRefused())
                continue
            if (
                self._state is State.START
                and not self.is_client
                and fragment.msg_type == hs.CLIENT_HELLO
                and fragment.message_seq < self._reassembler.window
            ):
                # After a stateless HelloVerifyRequest the ClientHello's
                # message_seq is 1: both sides continue from it (RFC 6347
                # section 4.2.2).
                self._reassembler.restart_at(fragment.message_seq)
            verdict = self._reassembler.add(fragment, epoch)
            if verdict == "old" and fragment.message_seq < self._peer_flight_start:
                # A message of the peer's flight before the one we wait for.
                peer_retransmitted = True
            elif verdict == "rejected":
                self._drop("fragment")
        while self._state is not State.CLOSED:
            message = self._reassembler.pop()
            if message is None:
                break
            msg_type, message_seq, message_epoch, body = message
            try:
                self._dispatch(msg_type, message_seq, message_epoch, body, now)
            except IgnoredMessageError:
                self._drop("unexpected")
                self._reassembler.restart_at(message_seq)
                break
            except HandshakeError as failure:
                self._fail(failure.alert, failure.reason, failure.detail)
            except hs.DecodeError:
                if message_epoch == 0:
                    self._drop("malformed")
                    self._reassembler.restart_at(message_seq)
                    break
                self._fail(DECODE_ERROR, "decode_error")
        if peer_retransmitted:
            # The peer lost (part of) our last flight (RFC 6347 section 4.2.4).
            self._resend_at_once(now)

    def _dispatch(self, msg_type: int, message_seq: int, epoch: int, body: bytes, now: float) -> None:
        state = self._state
        if state is State.ESTABLISHED:
            raise IgnoredMessageError()
        if (msg_type == hs.FINISHED) != (epoch > 0):
            raise IgnoredMessageError()  # only Finished travels in the new epoch (no renegotiation)
        message = hs.encode_message(msg_type, message_seq, body)
        if self.is_client:
            self._client_dispatch(state, msg_type, body, message, now)
        else:
            self._server_dispatch(state, msg_type, body, message, now)

    # --- snapshots (cluster fail-over) -------------------------------------------

    def _established_state(self) -> EstablishedState:
        """What continues this established connection elsewhere (snapshot.py)."""
        assert self._state is State.ESTABLISHED and self.cipher_suite is not None and self._keys is not None
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
    ) -> DtlsConnection:
        """A server connection continuing ``state``, established as if its
        handshake had just completed here (snapshot.restore_connection checks
        ``state`` first).  No HandshakeCompleted: no handshake happened here."""
        connection = cls(configuration, state.peer_address)
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
        connection._state = State.ESTABLISHED
        cache = configuration.session_cache
        if session.session_id and cache is not None:
            cache.put(session)  # the client may resume it here later (RFC 5246 section 7.3)
        return connection

