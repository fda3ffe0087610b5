"""DTLS credentials: the PSK store and X.509 certificate verification."""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

#: The sandbox identities of the Californium plugtest servers (opt-in,
#: ``--psk-sandbox``): fixed pairs plus any identity starting with "cali.".
SANDBOX_IDENTITIES = {b"Client_identity": b"secretPSK", b"password": b"sesame"}
SANDBOX_PREFIX = b"cali."
SANDBOX_PREFIX_SECRET = b".fornium"


class CredentialsError(ValueError):
    """A PSK file or certificate that cannot be used."""


@dataclass
class PskStore:
    """PSK identity -> secret (RFC 4279), optionally with the sandbox set."""

    secrets: dict[bytes, bytes] = field(default_factory=dict)
    sandbox: bool = False

    def lookup(self, identity: bytes) -> bytes | None:
        """The secret for ``identity``, or None."""
        secret = self.secrets.get(identity)
        if secret is None and self.sandbox:
            secret = SANDBOX_IDENTITIES.get(identity)
            if secret is None and identity.startswith(SANDBOX_PREFIX):
                secret = SANDBOX_PREFIX_SECRET
        return secret

    def __bool__(self) -> bool:
        return bool(self.secrets) or self.sandbox

    @classmethod
    def from_lines(cls, lines: list[str] | tuple[str, ...], sandbox: bool = False) -> "PskStore":
        """Parse ``identity=base64secret`` lines (the identity holds no '=');
        '#' starts a comment line."""
        secrets: dict[bytes, bytes] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            # Split at the first '=': identities hold none, base64 may end in '='.
            identity, separator, encoded = line.partition("=")
            if not separator or not identity:
                raise CredentialsError("line %d: expected identity=base64secret" % number)
            try:
                secret = base64.b64decode(encoded, validate=True)
            except ValueError as error:  # binascii.Error, or non-ASCII text
                raise CredentialsError("line %d: secret is not base64" % number) from error
            if not secret:
                raise CredentialsError("line %d: empty secret" % number)
            secrets[identity.encode("utf-8")] = secret
        return cls(secrets, sandbox)

    @classmethod
    def from_file(cls, path: str, sandbox: bool = False) -> "PskStore":
        with open(path, encoding="utf-8") as handle:
            return cls.from_lines(handle.read().splitlines(), sandbox)


def verify_chain(
    chain: list[x509.Certificate],
    trust_anchors: list[x509.Certificate],
    server_name: str | None = None,
    at: datetime.datetime | None = None,
) -> None:
    """Verify ``chain`` (leaf first) against ``trust_anchors``.

    With ``server_name`` the leaf must name it (a server seen by a client);
    the leaf must hold a P-256 key, the only curve our ECDSA suites sign
    with.  Raises ``CredentialsError``.
    """
    if not chain:
        raise CredentialsError("empty certificate chain")
    leaf = chain[0]
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CredentialsError("leaf certificate key is not P-256")
    builder = verification.PolicyBuilder().store(verification.Store(trust_anchors))
    if at is not None:
        builder = builder.time(at)
    # Keep the CA checks of the Web PKI profile; a leaf checked for a name
    # gets the Web PKI leaf checks too, a client leaf (devices) any extensions.
    builder = builder.extension_policies(
        ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
        ee_policy=(
            verification.ExtensionPolicy.webpki_defaults_ee()
            if server_name is not None
            else verification.ExtensionPolicy.permit_all()
        ),
    )
    try:
        if server_name is not None:
            builder.build_server_verifier(verification.DNSName(server_name)).verify(leaf, chain[1:])
        else:
            builder.build_client_verifier().verify(leaf, chain[1:])
    except verification.VerificationError as error:
        raise CredentialsError("certificate chain rejected: %s" % error) from error
