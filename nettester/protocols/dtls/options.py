"""DTLS options for the roles that serve or use DTLS (coaps server, clients).

Mix into a RoleOptions subclass: ``class O(DtlsServerOptionsMixin,
RoleOptions)``.  ``postOptions`` checks the values and leaves
``self["dtls"]``, a ready L{DtlsConfiguration}; a server role then builds a
``DtlsEndpoint(reactor, server_configuration=options["dtls"],
max_connections=options["max-connections"])``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar, Mapping

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.python import usage

from nettester.options import positive_float, positive_int
from nettester.protocols.dtls.cid import DEFAULT_CID_LENGTH, NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import DEFAULT_SUITES, ClientAuth, DtlsConfiguration, SessionCache
from nettester.protocols.dtls.credentials import SANDBOX_IDENTITIES, CredentialsError, PskStore
from nettester.protocols.dtls.endpoint import DEFAULT_MAX_CONNECTIONS
from nettester.protocols.dtls.suites import SUITES_BY_NAME

SANDBOX_CLIENT_IDENTITY = b"Client_identity"


def _cid_length(value: str) -> int:
    length = int(value)
    if not (length == 0 or 2 <= length <= 255):
        raise ValueError("expected 0 (CID off) or 2..255, got %r" % value)
    return length


def _suite_list(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in SUITES_BY_NAME]
    if unknown or not names:
        raise ValueError("unknown cipher suite(s) %s; known: %s" % (", ".join(unknown), ", ".join(DEFAULT_SUITES)))
    return names


def load_certificates(path: str) -> list[x509.Certificate]:
    """Every PEM certificate of C{path} (a chain, leaf first, or anchors)."""
    with open(path, "rb") as handle:
        certificates = x509.load_pem_x509_certificates(handle.read())
    if not certificates:
        raise CredentialsError("%s holds no certificate" % path)
    return certificates


def load_private_key(path: str) -> ec.EllipticCurvePrivateKey:
    """A PEM EC private key (P-256: the only curve our ECDSA suites sign with)."""
    with open(path, "rb") as handle:
        key = load_pem_private_key(handle.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError("%s is not a P-256 private key" % path)
    return key


class _DtlsOptionsBase:
    """What servers and clients share: suites, MTU, timers, X.509."""

    optParameters: ClassVar[list[list[Any]]] = [
        ["dtls-suites", None, DEFAULT_SUITES, "Cipher suites, most preferred first.", _suite_list],
        ["cid-length", None, DEFAULT_CID_LENGTH, "DTLS Connection ID length (RFC 9146); 0 turns CID off.", _cid_length],
        ["dtls-mtu", None, 1400, "Largest DTLS datagram sent.", positive_int],
        ["dtls-retransmit", None, 1.0, "Initial handshake retransmission timeout, seconds (doubles).", positive_float],
        ["certificate", None, "", "PEM certificate chain (leaf first) for ECDHE-ECDSA suites."],
        ["private-key", None, "", "PEM P-256 private key of --certificate."],
        ["trust", None, "", "PEM trust anchors the peer's certificate must chain to."],
    ]
    envVars: ClassVar[dict[str, str]] = {
        "dtls-suites": "DTLS_SUITES",
        "cid-length": "DTLS_CID_LENGTH",
        "certificate": "DTLS_CERTIFICATE",
        "private-key": "DTLS_PRIVATE_KEY",
        "trust": "DTLS_TRUST",
    }

    def _common(self, options: Mapping[str, Any], is_client: bool) -> DtlsConfiguration:
        configuration = DtlsConfiguration(
            is_client=is_client,
            cipher_suites=options["dtls-suites"],
            mtu=options["dtls-mtu"],
            initial_retransmit_timeout=options["dtls-retransmit"],
        )
        if bool(options["certificate"]) != bool(options["private-key"]):
            raise CredentialsError("--certificate and --private-key go together")
        if options["certificate"]:
            configuration.certificate_chain = load_certificates(options["certificate"])
            configuration.private_key = load_private_key(options["private-key"])
        if options["trust"]:
            configuration.trust_anchors = load_certificates(options["trust"])
        return configuration


class DtlsServerOptionsMixin(_DtlsOptionsBase):
    """Options of a role that serves DTLS.  Leaves ``self["dtls"]``."""

    optFlags: ClassVar[list[list[Any]]] = [
        [
            "psk-sandbox",
            None,
            "Accept the Californium plugtest sandbox PSK identities "
            "(Client_identity/secretPSK, password/sesame, cali.*/.fornium).",
        ],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["psk-file", None, "", "PSK store: one 'identity=base64secret' per line."],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Most live DTLS connections; the stalest goes first.",
            positive_int,
        ],
        [
            "client-auth",
            None,
            "none",
            "Ask clients for a certificate: none, wanted or needed.",
            lambda value: ClientAuth(value.strip().lower()).value,
        ],
    ]
    envVars: ClassVar[dict[str, str]] = {
        "psk-sandbox": "DTLS_PSK_SANDBOX",
        "psk-file": "DTLS_PSK_FILE",
        "max-connections": "DTLS_MAX_CONNECTIONS",
        "client-auth": "DTLS_CLIENT_AUTH",
    }

    def postOptions(self) -> None:
        try:
            self["dtls"] = self.server_configuration(self)  # type: ignore[index, arg-type]
        except (CredentialsError, OSError, ValueError) as error:
            raise usage.UsageError("%s; see --help" % error) from None
        super().postOptions()  # type: ignore[misc]

    def server_configuration(self, options: Mapping[str, Any], node_id: int | None = 0) -> DtlsConfiguration:
        """The server configuration; C{node_id} is the cluster node (0 alone)."""
        configuration = self._common(options, is_client=False)
        sandbox = bool(options["psk-sandbox"])
        configuration.psk_store = (
            PskStore.from_file(options["psk-file"], sandbox) if options["psk-file"] else PskStore(sandbox=sandbox)
        )
        configuration.client_auth = ClientAuth(options["client-auth"])
        if configuration.client_auth is not ClientAuth.NONE and configuration.trust_anchors is None:
            raise CredentialsError("--client-auth needs --trust")
        if not configuration.psk_store and not configuration.certificate_chain:
            raise CredentialsError("a DTLS server needs --psk-file, --psk-sandbox or --certificate")
        length = options["cid-length"]
        configuration.cid_generator = NodeConnectionIdGenerator(length, node_id) if length else None
        configuration.session_cache = SessionCache()
        return configuration


class DtlsClientOptionsMixin(_DtlsOptionsBase):
    """Options of a role that connects with DTLS.  Leaves ``self["dtls"]``."""

    optFlags: ClassVar[list[list[Any]]] = [
        ["psk-sandbox", None, "Use the sandbox identity Client_identity/secretPSK of the plugtest servers."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["psk-identity", None, "", "PSK identity."],
        ["psk-secret", None, "", "PSK secret, base64."],
        ["server-name", None, "", "Name the server's certificate must carry (SNI too)."],
    ]
    envVars: ClassVar[dict[str, str]] = {
        "psk-sandbox": "DTLS_PSK_SANDBOX",
        "psk-identity": "DTLS_PSK_IDENTITY",
        "psk-secret": "DTLS_PSK_SECRET",
    }

    def postOptions(self) -> None:
        try:
            self["dtls"] = self.client_configuration(self)  # type: ignore[index, arg-type]
        except (CredentialsError, OSError, ValueError) as error:
            raise usage.UsageError("%s; see --help" % error) from None
        super().postOptions()  # type: ignore[misc]

    def client_configuration(self, options: Mapping[str, Any]) -> DtlsConfiguration:
        configuration = self._common(options, is_client=True)
        if options["psk-identity"]:
            try:
                secret = base64.b64decode(options["psk-secret"], validate=True)
            except (binascii.Error, ValueError):
                raise CredentialsError("--psk-secret is not base64") from None
            if not secret:
                raise CredentialsError("--psk-identity needs --psk-secret")
            configuration.psk_identity, configuration.psk = options["psk-identity"].encode("utf-8"), secret
        elif options["psk-sandbox"]:
            configuration.psk_identity = SANDBOX_CLIENT_IDENTITY
            configuration.psk = SANDBOX_IDENTITIES[SANDBOX_CLIENT_IDENTITY]
        configuration.server_name = options["server-name"] or None
        configuration.cid_length = options["cid-length"] if options["cid-length"] else None
        usable = [
            name
            for name in configuration.cipher_suites
            if (configuration.psk is not None) or not SUITES_BY_NAME[name].key_exchange.uses_psk
        ]
        if not usable:
            raise CredentialsError("PSK suites need --psk-identity/--psk-secret or --psk-sandbox")
        configuration.cipher_suites = tuple(usable)
        return configuration
