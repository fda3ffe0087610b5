"""The server side of the DTLS 1.2 handshake (RFC 6347 section 4.2, RFC
5246 section 7.4): flights 2 (by ``cookie.py``, statelessly), 4 and 6 out,
3 and 5 in; abbreviated handshakes resume cached sessions (section 7.3)."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.alerts import (
    HANDSHAKE_FAILURE,
    ILLEGAL_PARAMETER,
    PROTOCOL_VERSION,
    UNKNOWN_PSK_IDENTITY,
    alert_name,
)
from nettester.protocols.dtls.configuration import ClientAuth, Session
from nettester.protocols.dtls.core import (
    SUPPORTED_GROUPS,
    ConnectionCore,
    Ephemeral,
    OutMessage,
    State,
    identity_of_certificate,
)
from nettester.protocols.dtls.events import HandshakeError, IgnoredMessageError

MAX_ADOPTED_SEQUENCE = 2**16


class ServerHandshake(ConnectionCore):
    """The server's handshake messages (mixed into ``DtlsConnection``)."""

    def _server_dispatch(self, state: State, msg_type: int, body: bytes, message: bytes, now: float) -> None:
        if state is State.START and msg_type == hs.CLIENT_HELLO:
            self._handshake_deadline = now + self.configuration.handshake_timeout
            try:
                self._server_client_hello(hs.ClientHello.decode(body), message, now)
            except hs.DecodeError as error:
                # The cookie proved the client's address: a ClientHello that
                # does not parse earns an alert, not silence.
                raise HandshakeError(error.alert, alert_name(error.alert), "bad ClientHello: %s" % error) from error
        elif state is State.WAIT_CLIENT_KEY_EXCHANGE and msg_type == hs.CERTIFICATE:
            self._server_client_certificate(body, message, now)
        elif state is State.WAIT_CLIENT_KEY_EXCHANGE and msg_type == hs.CLIENT_KEY_EXCHANGE:
            self._server_client_key_exchange(body, message)
        elif state is State.WAIT_CERTIFICATE_VERIFY and msg_type == hs.CERTIFICATE_VERIFY:
            algorithm, signature = hs.decode_digitally_signed(body)
            if algorithm != hs.ECDSA_SECP256R1_SHA256:
                raise HandshakeError(ILLEGAL_PARAMETER, "unsupported_signature_algorithm")
            self._verify_signature(self._peer_chain[0], signature, bytes(self._transcript))
            self._transcript += message
            self._install_keys()
            self._state = State.WAIT_CHANGE_CIPHER_SPEC
        elif state is State.WAIT_FINISHED and msg_type == hs.FINISHED:
            self._check_finished(body, is_client_finished=True)
            self._transcript += message
            self._finish_handshake(now, send_final_flight=not self._resuming)
        else:
            raise IgnoredMessageError()

    def _server_client_hello(self, hello: hs.ClientHello, message: bytes, now: float) -> None:
        config = self.configuration
        self._next_send_seq = self._reassembler.next_seq - 1  # RFC 6347 section 4.2.2
        # DTLS versions count down (1.0 is 0xfeff, 1.2 0xfefd): a larger
        # number is an older version we do not speak.
        if hello.version > record.DTLS_1_2 or hello.version >> 8 != 0xFE:
            raise HandshakeError(PROTOCOL_VERSION, "client_version")
        # After a HelloVerifyRequest continue the record numbers from the
        # ClientHello's, so the client's epoch 0 window accepts ours.
        writer = self._write_states[0]
        if self._last_record_sequence < MAX_ADOPTED_SEQUENCE:  # a hostile value must not exhaust ours
            writer.next_sequence = max(writer.next_sequence, self._last_record_sequence)
        if 0 not in hello.compression_methods:
            raise HandshakeError(ILLEGAL_PARAMETER, "no_null_compression")
        self._client_hello = hello
        self._client_random = hello.random
        self._transcript = bytearray(message)
        extensions = hello.extensions
        self._extended_master_secret = hs.EXT_EXTENDED_MASTER_SECRET in extensions
        if extensions.get(hs.EXT_EXTENDED_MASTER_SECRET, b"") != b"":
            raise hs.DecodeError("extended_master_secret with a body")  # RFC 7627 section 5.1: empty
        if config.require_extended_master_secret and not self._extended_master_secret:
            raise HandshakeError(HANDSHAKE_FAILURE, "no_extended_master_secret")
        self._secure_renegotiation = (
            hs.TLS_EMPTY_RENEGOTIATION_INFO_SCSV in hello.cipher_suites or hs.EXT_RENEGOTIATION_INFO in extensions
        )
        if extensions.get(hs.EXT_RENEGOTIATION_INFO, b"\x00") != b"\x00":
            raise HandshakeError(HANDSHAKE_FAILURE, "renegotiation_info")
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
            self.read_cid = generator.new_connection_id(config.cids_in_use)
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
        self._state = State.WAIT_CHANGE_CIPHER_SPEC
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
                raise HandshakeError(ILLEGAL_PARAMETER, "no_uncompressed_points")
            server_extensions[hs.EXT_EC_POINT_FORMATS] = hs.vector(1, b"\x00")
        self.session_id = config.random(32) if config.session_cache is not None else b""
        flight = [self._server_hello(server_extensions)]
        if suite.key_exchange is suites.KeyExchange.ECDHE_ECDSA:
            chain = [c.public_bytes(serialization.Encoding.DER) for c in config.certificate_chain]
            flight.append(self._handshake_message(hs.CERTIFICATE, hs.encode_certificate(chain)))
        if suite.key_exchange.uses_ecdhe:
            assert group is not None
            self._ephemeral = Ephemeral(group)
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
        self._state = State.WAIT_CLIENT_KEY_EXCHANGE
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
        common_group = next((g for g in SUPPORTED_GROUPS if g in groups), None)
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
        raise HandshakeError(HANDSHAKE_FAILURE, "no_common_cipher_suite")

    def _server_hello(self, extensions: dict[int, bytes]) -> OutMessage:
        assert self.cipher_suite is not None
        hello = hs.ServerHello(
            record.DTLS_1_2, self._server_random, self.session_id, self.cipher_suite.code, 0, extensions
        )
        return self._handshake_message(hs.SERVER_HELLO, hello.encode())

    def _server_client_certificate(self, body: bytes, message: bytes, now: float) -> None:
        if not self._certificate_requested or self._peer_chain:
            raise IgnoredMessageError()
        chain = self._verify_certificates(hs.decode_certificate(body), None, now)
        if not chain and self.configuration.client_auth is ClientAuth.NEEDED:
            raise HandshakeError(HANDSHAKE_FAILURE, "client_certificate_required")
        self._peer_chain = chain
        if chain:
            self.peer_identity = identity_of_certificate(chain[0])
        self._transcript += message

    def _server_client_key_exchange(self, body: bytes, message: bytes) -> None:
        config, suite = self.configuration, self.cipher_suite
        assert suite is not None
        if self._certificate_requested and not self._peer_chain and config.client_auth is ClientAuth.NEEDED:
            raise HandshakeError(HANDSHAKE_FAILURE, "client_certificate_required")
        exchange = hs.ClientKeyExchange.decode(body, suite.key_exchange.uses_psk, suite.key_exchange.uses_ecdhe)
        if suite.key_exchange.uses_psk:
            assert config.psk_store is not None and exchange.psk_identity is not None
            psk = config.psk_store.lookup(exchange.psk_identity)
            if psk is None:
                raise HandshakeError(UNKNOWN_PSK_IDENTITY, "unknown_psk_identity")
            self._psk = psk
            self.peer_identity = exchange.psk_identity.decode("utf-8", "replace")
        other_secret = None
        if suite.key_exchange.uses_ecdhe:
            assert self._ephemeral is not None and exchange.public_key is not None
            other_secret = self._ephemeral.exchange(exchange.public_key)
        self._transcript += message
        self._derive_master_secret(other_secret)
        if self._peer_chain:
            self._state = State.WAIT_CERTIFICATE_VERIFY
        else:
            self._install_keys()
            self._state = State.WAIT_CHANGE_CIPHER_SPEC

