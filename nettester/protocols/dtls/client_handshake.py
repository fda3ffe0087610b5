"""The client side of the DTLS 1.2 handshake (RFC 6347 section 4.2, RFC
5246 section 7.4): flights 1, 3 and 5 out, 2, 4 and 6 in."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.alerts import (
    BAD_CERTIFICATE,
    HANDSHAKE_FAILURE,
    ILLEGAL_PARAMETER,
    PROTOCOL_VERSION,
    UNEXPECTED_MESSAGE,
    UNSUPPORTED_EXTENSION,
)
from nettester.protocols.dtls.core import (
    SUPPORTED_GROUPS,
    ConnectionCore,
    Ephemeral,
    OutMessage,
    State,
    identity_of_certificate,
)
from nettester.protocols.dtls.events import HandshakeError, IgnoredMessageError

MAX_HELLO_VERIFY = 5


class ClientHandshake(ConnectionCore):
    """The client's handshake messages (mixed into ``DtlsConnection``)."""

    def connect(self, now: float) -> None:
        """Client: start the handshake with a ClientHello (flight 1)."""
        assert self.is_client and self._state is State.START
        config = self.configuration
        self._handshake_deadline = now + config.handshake_timeout
        self._client_random = config.random(32)
        offered = config.suites()
        extensions: dict[int, bytes] = {}
        if config.server_name:
            extensions[hs.EXT_SERVER_NAME] = hs.encode_server_name(config.server_name)
        if any(suite.key_exchange.uses_ecdhe for suite in offered):
            extensions[hs.EXT_SUPPORTED_GROUPS] = hs.encode_uint16_list(SUPPORTED_GROUPS)
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


    def _send_client_hello(self, now: float) -> None:
        assert self._client_hello is not None
        seq = self._next_send_seq
        self._next_send_seq += 1
        body = self._client_hello.encode()
        self._transcript = bytearray(hs.encode_message(hs.CLIENT_HELLO, seq, body))
        self._reassembler.restart_at(seq)
        self._state = State.WAIT_SERVER_HELLO
        self._start_flight([OutMessage(0, hs.CLIENT_HELLO, seq, body)], now, expects_reply=True)

    def _client_dispatch(self, state: State, msg_type: int, body: bytes, message: bytes, now: float) -> None:
        if state is State.WAIT_SERVER_HELLO and msg_type == hs.HELLO_VERIFY_REQUEST:
            cookie = hs.decode_hello_verify_request(body)
            self._hello_verify_count += 1
            if self._hello_verify_count > MAX_HELLO_VERIFY:
                raise HandshakeError(HANDSHAKE_FAILURE, "too_many_hello_verify_requests")
            assert self._client_hello is not None
            self._client_hello.cookie = cookie
            self._retransmissions = 0
            self._retransmit_interval = self.configuration.initial_retransmit_timeout
            self._send_client_hello(now)
        elif state is State.WAIT_SERVER_HELLO and msg_type == hs.SERVER_HELLO:
            self._client_server_hello(hs.ServerHello.decode(body), message, now)
        elif state is State.WAIT_SERVER_HELLO_DONE and msg_type == hs.CERTIFICATE:
            self._client_certificate(body, message, now)
        elif state is State.WAIT_SERVER_HELLO_DONE and msg_type == hs.SERVER_KEY_EXCHANGE:
            self._client_server_key_exchange(body, message)
        elif state is State.WAIT_SERVER_HELLO_DONE and msg_type == hs.CERTIFICATE_REQUEST:
            if self.cipher_suite is None or self.cipher_suite.key_exchange is not suites.KeyExchange.ECDHE_ECDSA:
                raise HandshakeError(UNEXPECTED_MESSAGE, "certificate_request_with_psk")
            hs.CertificateRequest.decode(body)
            self._certificate_requested = True
            self._transcript += message
        elif state is State.WAIT_SERVER_HELLO_DONE and msg_type == hs.SERVER_HELLO_DONE:
            if body:
                raise hs.DecodeError("ServerHelloDone with a body")
            self._transcript += message
            self._client_key_exchange_flight(now)
        elif state is State.WAIT_FINISHED and msg_type == hs.FINISHED:
            self._check_finished(body, is_client_finished=False)
            self._transcript += message
            self._finish_handshake(now, send_final_flight=self._resuming)
        else:
            raise IgnoredMessageError()

    def _client_server_hello(self, hello: hs.ServerHello, message: bytes, now: float) -> None:
        config = self.configuration
        if hello.version != record.DTLS_1_2:
            raise HandshakeError(PROTOCOL_VERSION, "server_version")
        assert self._client_hello is not None
        suite = suites.SUITES.get(hello.cipher_suite)
        if suite is None or hello.cipher_suite not in self._client_hello.cipher_suites or hello.compression_method:
            raise HandshakeError(ILLEGAL_PARAMETER, "server_chose_unoffered_parameters")
        offered_extensions = set(self._client_hello.extensions)
        if not set(hello.extensions) <= offered_extensions:
            raise HandshakeError(UNSUPPORTED_EXTENSION, "unsolicited_extension")
        renegotiation = hello.extensions.get(hs.EXT_RENEGOTIATION_INFO)
        if renegotiation is not None and renegotiation != b"\x00":
            raise HandshakeError(HANDSHAKE_FAILURE, "renegotiation_info")
        self._extended_master_secret = hs.EXT_EXTENDED_MASTER_SECRET in hello.extensions
        if hello.extensions.get(hs.EXT_EXTENDED_MASTER_SECRET, b"") != b"":
            raise hs.DecodeError("extended_master_secret with a body")
        if config.require_extended_master_secret and not self._extended_master_secret:
            raise HandshakeError(HANDSHAKE_FAILURE, "no_extended_master_secret")
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
                raise HandshakeError(ILLEGAL_PARAMETER, "resumed_suite_mismatch")
            if session.extended_master_secret != self._extended_master_secret:
                raise HandshakeError(HANDSHAKE_FAILURE, "resumed_ems_mismatch")  # RFC 7627 section 5.3
            self._resuming = True
            self._master_secret = session.master_secret
            self.peer_identity = session.peer_identity
            self._install_keys()
            self._state = State.WAIT_CHANGE_CIPHER_SPEC
        else:
            if suite.key_exchange.uses_psk and (config.psk is None or config.psk_identity is None):
                raise HandshakeError(HANDSHAKE_FAILURE, "no_psk_configured")
            self._state = State.WAIT_SERVER_HELLO_DONE
        # The ClientHello's timer runs on until the server's whole flight has
        # arrived (RFC 6347 section 4.2.4): the rest of it may be lost.

    def _client_certificate(self, body: bytes, message: bytes, now: float) -> None:
        assert self.cipher_suite is not None
        if self.cipher_suite.key_exchange is not suites.KeyExchange.ECDHE_ECDSA or self._peer_chain:
            raise IgnoredMessageError()
        self._peer_chain = self._verify_certificates(
            hs.decode_certificate(body), self.configuration.server_name, now
        )
        if not self._peer_chain:
            raise HandshakeError(BAD_CERTIFICATE, "empty_server_certificate")
        self.peer_identity = identity_of_certificate(self._peer_chain[0])
        self._transcript += message

    def _client_server_key_exchange(self, body: bytes, message: bytes) -> None:
        suite = self.cipher_suite
        assert suite is not None
        signed = suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA
        if signed and not self._peer_chain:
            raise IgnoredMessageError()
        exchange = hs.ServerKeyExchange.decode(body, suite.key_exchange.uses_psk, suite.key_exchange.uses_ecdhe, signed)
        if suite.key_exchange.uses_ecdhe:
            if exchange.group not in SUPPORTED_GROUPS:
                raise HandshakeError(ILLEGAL_PARAMETER, "unsupported_group")
        if signed:
            if exchange.signature_algorithm != hs.ECDSA_SECP256R1_SHA256:
                raise HandshakeError(ILLEGAL_PARAMETER, "unsupported_signature_algorithm")
            signed_data = self._client_random + self._server_random + exchange.ecdh_params()
            self._verify_signature(self._peer_chain[0], exchange.signature or b"", signed_data)
        self._server_key_exchange = exchange
        self._transcript += message

    def _client_key_exchange_flight(self, now: float) -> None:
        config, suite = self.configuration, self.cipher_suite
        assert suite is not None
        if suite.key_exchange.uses_ecdhe and self._server_key_exchange is None:
            raise HandshakeError(UNEXPECTED_MESSAGE, "missing_server_key_exchange")
        if suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA and not self._peer_chain:
            raise HandshakeError(UNEXPECTED_MESSAGE, "missing_server_certificate")
        flight: list[OutMessage] = []
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
            self._ephemeral = Ephemeral(server.group)
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
        self._state = State.WAIT_CHANGE_CIPHER_SPEC
        self._start_flight(flight, now, expects_reply=True)

