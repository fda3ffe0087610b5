"""DTLS options for the roles that serve or use DTLS (coaps server, clients).

Mix into a RoleOptions subclass: ``class O(DtlsServerOptionsMixin,
RoleOptions)``.  ``postOptions`` checks the values and leaves
``self["dtls"]``, a ready ``DtlsConfiguration`` (or None where a role uses
DTLS only on demand, see ``dtls_wanted``); a server role then builds a
``DtlsEndpoint(reactor, server_configuration=options["dtls"],
max_connections=options["max-connections"])``.

The option names are the ones issues 4 and 5 give every DTLS role:
``--cert/--key/--trust``, ``--psk-file``, ``--psk-sandbox``, ``--client-auth
NONE|WANTED|NEEDED``, ``--cid-length``, ``--max-connections`` for servers, and
``--identity/--secret`` for clients.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, ClassVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.python import usage

from nettester.options import positive_float, positive_int
from nettester.protocols.dtls.cid import DEFAULT_CID_LENGTH, NodeConnectionIdGenerator
from nettester.protocols.dtls.connection import (
    DEFAULT_SUITES,
    ClientAuth,
    DtlsConfiguration,
    SessionCache,
)
from nettester.protocols.dtls.credentials import (
    SANDBOX_IDENTITIES,
    CredentialsError,
    PskStore,
)
from nettester.protocols.dtls.peers import DEFAULT_HALF_OPEN_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HALF_OPEN
from nettester.protocols.dtls.suites import SUITES_BY_NAME
from nettester.workers import shared_cookie_secret, worker_index

SANDBOX_CLIENT_IDENTITY = b"Client_identity"


def _cid_length(value: str) -> int:
    """0 (CID off) or 2..255 bytes (RFC 9146; a node-prefixed CID needs 2)."""
    try:
        length = int(value)
    except ValueError:
        length = -1
    if not (length == 0 or 2 <= length <= 255):
        raise ValueError("expected 0 (CID off) or a whole number 2..255, got %r" % value)
    return length


def _suite_list(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in SUITES_BY_NAME]
    if unknown or not names:
        raise ValueError("unknown cipher suite(s) %s; known: %s" % (", ".join(unknown), ", ".join(DEFAULT_SUITES)))
    return names


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise CredentialsError("%s %s: cannot read it (%s)" % (option, path, error.strerror or error)) from None


def load_certificates(path: str, option: str = "--cert") -> list[x509.Certificate]:
    """Every PEM certificate of ``path`` (a chain, leaf first, or anchors)."""
    data = _read(path, option)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise CredentialsError(
            "%s %s: no PEM certificate in it; expected one or more -----BEGIN CERTIFICATE----- blocks" % (option, path)
        )
    return certificates


def load_private_key(path: str, option: str = "--key") -> ec.EllipticCurvePrivateKey:
    """A PEM EC private key (P-256: the only curve our ECDSA suites sign with)."""
    data = _read(path, option)
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CredentialsError(
            "%s %s: no unencrypted PEM private key in it; expected a -----BEGIN PRIVATE KEY----- "
            "or -----BEGIN EC PRIVATE KEY----- block" % (option, path)
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError("%s %s is not a P-256 (secp256r1) EC private key" % (option, path))
    return key


def parse_secret(text: str) -> bytes:
    """A PSK secret: text, or ``hex:..`` / ``base64:..``."""
    try:
        if text.startswith("hex:"):
            return bytes.fromhex(text[4:])
        if text.startswith("base64:"):
            return base64.b64decode(text[7:], validate=True)
    except (ValueError, binascii.Error):
        raise CredentialsError(f"--secret: cannot decode {text!r} (expected text, hex:... or base64:...)") from None
    return text.encode()


def _psk_file(path: str, sandbox: bool) -> PskStore:
    """The PSK store of ``--psk-file``: errors name the option and the file."""
    try:
        return PskStore.from_file(path, sandbox)
    except OSError as error:
        raise CredentialsError("--psk-file %s: cannot read it (%s)" % (path, error.strerror or error)) from None
    except UnicodeDecodeError:
        raise CredentialsError("--psk-file %s: not UTF-8 text (one identity=base64secret per line)" % path) from None
    except CredentialsError as error:
        raise CredentialsError("--psk-file %s: %s" % (path, error)) from None


def _client_auth(value: str) -> str:
    try:
        return ClientAuth(value.strip().lower()).value
    except ValueError:
        raise ValueError(f"expected NONE, WANTED or NEEDED, got {value!r}") from None


class _DtlsOptionsBase:
    """What servers and clients share: suites, CID, MTU, timers, X.509."""

    optParameters: ClassVar[list[list[Any]]] = [
        ["dtls-suites", None, DEFAULT_SUITES, "DTLS cipher suites, most preferred first.", _suite_list],
        ["cid-length", None, DEFAULT_CID_LENGTH, "DTLS Connection ID length (RFC 9146); 0 turns CID off.", _cid_length],
        ["dtls-mtu", None, 1400, "Largest DTLS datagram sent.", positive_int],
        ["dtls-retransmit", None, 1.0, "Initial handshake retransmission timeout, seconds (doubles).", positive_float],
        ["cert", None, "", "DTLS PEM certificate chain (leaf first), P-256, for the ECDHE-ECDSA suites."],
        ["key", None, "", "DTLS PEM P-256 private key of --cert."],
        ["trust", None, "", "DTLS PEM trust anchors the peer's certificate must chain to."],
    ]
    envVars: ClassVar[Mapping[str, str]] = {
        "dtls-suites": "DTLS_SUITES",
        "cid-length": "DTLS_CID_LENGTH",
        "cert": "DTLS_CERTIFICATE",
        "key": "DTLS_PRIVATE_KEY",
        "trust": "DTLS_TRUST",
    }

    def _common(self, options: Mapping[str, Any], is_client: bool) -> DtlsConfiguration:
        configuration = DtlsConfiguration(
            is_client=is_client,
            cipher_suites=options["dtls-suites"],
            mtu=options["dtls-mtu"],
            initial_retransmit_timeout=options["dtls-retransmit"],
        )
        if bool(options["cert"]) != bool(options["key"]):
            raise CredentialsError("--cert and --key go together")
        if options["cert"]:
            configuration.certificate_chain = load_certificates(options["cert"], "--cert")
            configuration.private_key = load_private_key(options["key"], "--key")
        if options["trust"]:
            configuration.trust_anchors = load_certificates(options["trust"], "--trust")
        return configuration

    def dtls_wanted(self) -> bool:
        """Whether this role needs a DTLS configuration at all (coap roles: only for coaps)."""
        return True


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
        ["psk-file", None, "", "DTLS PSK store: one 'identity=base64secret' per line."],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Most live DTLS connections; the stalest goes first.",
            positive_int,
        ],
        [
            "max-half-open",
            None,
            DEFAULT_MAX_HALF_OPEN,
            "Most DTLS server handshakes in progress (past the cookie exchange); when a new one needs room, "
            "the oldest is evicted, never an established session.",
            positive_int,
        ],
        [
            "half-open-timeout",
            None,
            DEFAULT_HALF_OPEN_TIMEOUT,
            "Seconds a DTLS server handshake may take before it is dropped.",
            positive_float,
        ],
        ["client-auth", None, "none", "Ask DTLS clients for a certificate: NONE, WANTED or NEEDED.", _client_auth],
    ]
    envVars: ClassVar[Mapping[str, str]] = {
        "psk-sandbox": "DTLS_PSK_SANDBOX",
        "psk-file": "DTLS_PSK_FILE",
        "max-connections": "DTLS_MAX_CONNECTIONS",
        "max-half-open": "DTLS_MAX_HALF_OPEN",
        "half-open-timeout": "DTLS_HALF_OPEN_TIMEOUT",
        "client-auth": "DTLS_CLIENT_AUTH",
    }

    def postOptions(self) -> None:
        try:
            self["dtls"] = (  # type: ignore[index]
                self.server_configuration(self, self.cid_node_id())  # type: ignore[arg-type]
                if self.dtls_wanted()
                else None
            )
        except (CredentialsError, OSError, ValueError) as error:
            raise usage.UsageError("%s; see --help" % error) from None
        super().postOptions()  # type: ignore[misc]

    def has_server_credentials(self) -> bool:
        """Whether any DTLS credential option is set (a PSK source or a certificate)."""
        options: Any = self
        return bool(options["psk-file"] or options["psk-sandbox"] or options["cert"])

    def cid_node_id(self) -> int:
        """The node id our CIDs start with: 0 alone, the node's id in a cluster."""
        return 0

    def server_configuration(self, options: Mapping[str, Any], node_id: int | None = 0) -> DtlsConfiguration:
        """The server configuration; ``node_id`` is the cluster node (0 alone)."""
        configuration = self._common(options, is_client=False)
        sandbox = bool(options["psk-sandbox"])
        configuration.psk_store = (
            _psk_file(options["psk-file"], sandbox) if options["psk-file"] else PskStore(sandbox=sandbox)
        )
        configuration.client_auth = ClientAuth(options["client-auth"])
        if configuration.client_auth is not ClientAuth.NONE and configuration.trust_anchors is None:
            raise CredentialsError("--client-auth needs --trust")
        if not configuration.psk_store and not configuration.certificate_chain:
            raise CredentialsError("a DTLS server needs --psk-file, --psk-sandbox or --cert/--key")
        length = options["cid-length"]
        # --workers: the kernel steers a session's records by CID byte 1 (nettester.steering).
        configuration.cid_generator = (
            NodeConnectionIdGenerator(length, node_id, worker=worker_index()) if length else None
        )
        configuration.cookie_secret = shared_cookie_secret()
        configuration.session_cache = SessionCache()
        return configuration


class DtlsClientOptionsMixin(_DtlsOptionsBase):
    """Options of a role that connects with DTLS.  Leaves ``self["dtls"]``."""

    optFlags: ClassVar[list[list[Any]]] = [
        ["psk-sandbox", None, "Use the sandbox identity Client_identity/secretPSK of the plugtest servers."],
    ]
    optParameters: ClassVar[list[list[Any]]] = [
        ["identity", None, "", "DTLS PSK identity."],
        ["secret", None, "", "DTLS PSK secret: text, hex:... or base64:..."],
        ["server-name", None, "", "Name the server's certificate must carry (SNI too)."],
    ]
    envVars: ClassVar[Mapping[str, str]] = {
        "psk-sandbox": "DTLS_PSK_SANDBOX",
        "identity": "DTLS_PSK_IDENTITY",
        "secret": "DTLS_PSK_SECRET",
    }

    def postOptions(self) -> None:
        try:
            self["dtls"] = self.client_configuration(self) if self.dtls_wanted() else None  # type: ignore[index, arg-type]
        except (CredentialsError, OSError, ValueError) as error:
            raise usage.UsageError("%s; see --help" % error) from None
        super().postOptions()  # type: ignore[misc]

    def client_configuration(self, options: Mapping[str, Any]) -> DtlsConfiguration:
        """The client configuration: PSK (--identity/--secret or --psk-sandbox) and/or certificates."""
        if bool(options["identity"]) != bool(options["secret"]):
            raise CredentialsError("--identity and --secret go together")
        configuration = self._common(options, is_client=True)
        if options["identity"]:
            secret = parse_secret(options["secret"])
            if not secret:
                raise CredentialsError("--secret decodes to an empty secret")
            configuration.psk_identity, configuration.psk = options["identity"].encode("utf-8"), secret
        elif options["psk-sandbox"]:
            configuration.psk_identity = SANDBOX_CLIENT_IDENTITY
            configuration.psk = SANDBOX_IDENTITIES[SANDBOX_CLIENT_IDENTITY]
        if configuration.psk is None and configuration.trust_anchors is None and not configuration.certificate_chain:
            raise CredentialsError("DTLS needs --identity/--secret, --psk-sandbox, or --trust (and --cert/--key)")
        configuration.server_name = options["server-name"] or None
        configuration.cid_length = options["cid-length"] if options["cid-length"] else None
        usable = [
            name
            for name in configuration.cipher_suites
            if (configuration.psk is not None) or not SUITES_BY_NAME[name].key_exchange.uses_psk
        ]
        if not usable:
            raise CredentialsError("PSK suites need --identity/--secret or --psk-sandbox")
        configuration.cipher_suites = tuple(usable)
        return configuration
