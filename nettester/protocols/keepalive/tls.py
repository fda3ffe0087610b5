"""TLS for the keep-alive roles: server certificates and client verification.

pyOpenSSL through Twisted's TLS layer, TLS 1.2 and 1.3 (nothing older).
The server uses ``--cert``/``--key`` or, with neither, a self-signed
certificate generated at start; the client verifies against ``--ca`` (or the
system trust store) and ``--server-name`` with service-identity, or skips
verification with ``--insecure``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSSetupError(Exception):
    """Certificate material that cannot be used; the message says what to fix."""


# OpenSSL's reason for a failed handshake -> what it means and what to do, as each end logs it.
_TLS_FAILURES = {
    "certificate verify failed": "the server's certificate is not trusted (self-signed?): use --ca FILE or --insecure",
    "tlsv1 alert unknown ca": "the client does not trust this server's certificate (unknown CA): give the clients "
                              "--ca with the CA, or --insecure",
    "wrong version number": "the other end does not speak TLS: use --tls on both ends or on neither",
    "http request": "the other end does not speak TLS: use --tls on both ends or on neither",
}


def _identity_text(identity: object) -> str:
    """``example.org`` or ``127.0.0.1`` for service-identity's DNS_ID / IPAddress_ID."""
    value = getattr(identity, "hostname", None) or getattr(identity, "ip", None) or identity
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


def tls_failure_text(error: BaseException) -> str:
    """A TLS failure in words, with what to do: OpenSSL's error list or service-identity's verdict."""
    if isinstance(error, VerificationError):
        names = ", ".join(_identity_text(mismatch.mismatched_id) for mismatch in error.errors)
        return f"the server's certificate does not name {names}: use --server-name with a name it has, or --insecure"
    reasons = [entry[-1] for entry in error.args[0] if isinstance(entry, tuple) and entry] if (
        isinstance(error, SSL.Error) and error.args and isinstance(error.args[0], list)) else []
    for reason in reasons:
        if reason in _TLS_FAILURES:
            return _TLS_FAILURES[reason]
    return "; ".join(str(reason) for reason in reasons) or str(error) or type(error).__name__


@dataclass(frozen=True)
class ServerCertificate:
    """PEM key and certificate chain of the server, and its SHA-256 fingerprint."""

    key_pem: bytes
    chain_pem: tuple[bytes, ...]
    fingerprint: str
    self_signed: bool


def _fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def self_signed_certificate(names: tuple[str, ...] = ("localhost",),
                            addresses: tuple[str, ...] = ("127.0.0.1", "::1")) -> ServerCertificate:
    """A fresh P-256 key and a one-year self-signed certificate for ``names`` and ``addresses``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return ServerCertificate(key_pem, (certificate.public_bytes(serialization.Encoding.PEM),),
                             _fingerprint(certificate), self_signed=True)


def describe(certificate: ServerCertificate) -> str:
    """One phrase for the server's start line: which certificate, and its fingerprint to compare."""
    origin = "self-signed certificate" if certificate.self_signed else "certificate"
    return f"{origin} SHA-256 {certificate.fingerprint}"


PEM_CERTIFICATES = "expected one or more -----BEGIN CERTIFICATE----- blocks"


def _read(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as pem:
            return pem.read()
    except OSError as error:
        raise TLSSetupError(f"{option}: cannot read {path}: {error.strerror}") from None


def load_server_certificate(cert_path: str, key_path: str) -> ServerCertificate:
    """Read a PEM certificate chain (leaf first) and its PEM private key."""
    try:
        chain = x509.load_pem_x509_certificates(_read(cert_path, "--cert"))
    except ValueError:
        raise TLSSetupError(f"--cert: {cert_path} holds no PEM certificate; {PEM_CERTIFICATES}, leaf first") from None
    key_pem = _read(key_path, "--key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSSetupError(f"--key: {key_path} holds no unencrypted PEM private key; expected a "
                            "-----BEGIN PRIVATE KEY----- (or EC / RSA PRIVATE KEY) block") from None
    if key.public_key() != chain[0].public_key():
        raise TLSSetupError(f"--key: {key_path} does not match the first certificate of {cert_path}")
    chain_pem = tuple(certificate.public_bytes(serialization.Encoding.PEM) for certificate in chain)
    return ServerCertificate(key_pem, chain_pem, _fingerprint(chain[0]), self_signed=False)


def server_options(certificate: ServerCertificate) -> ssl.CertificateOptions:
    """The server's TLS context factory (TLS 1.2 and 1.3)."""
    # CertificateOptions' hints still name pyOpenSSL's PKey and X509; it takes (and
    # pyOpenSSL prefers) cryptography's keys and certificates.
    return ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(certificate.key_pem, password=None),  # type: ignore[arg-type]
        certificate=x509.load_pem_x509_certificate(certificate.chain_pem[0]),  # type: ignore[arg-type]
        extraCertChain=[x509.load_pem_x509_certificate(pem) for pem in certificate.chain_pem[1:]],  # type: ignore[misc]
        raiseMinimumTo=MINIMUM_VERSION,
    )


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedClientTLS:
    """``--insecure``: TLS without certificate verification, still sending SNI."""

    def __init__(self, server_name: str) -> None:
        self._context = ssl.CertificateOptions(raiseMinimumTo=MINIMUM_VERSION).getContext()
        self._sni = None if _is_ip(server_name) else server_name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        return connection


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def client_creator(server_name: str, ca_path: str | None, insecure: bool) -> IOpenSSLClientConnectionCreator:
    """The client's TLS connection creator: verified against ``ca_path`` (a PEM file of one or more
    CA certificates, e.g. a bundle) or the system store, unless insecure."""
    if insecure:
        return UnverifiedClientTLS(server_name)
    if ca_path:
        try:
            authorities = x509.load_pem_x509_certificates(_read(ca_path, "--ca"))
        except ValueError:
            raise TLSSetupError(f"--ca: {ca_path} holds no PEM certificate; {PEM_CERTIFICATES} (a CA bundle)") from None
        trust_root = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(authority.public_bytes(serialization.Encoding.PEM)) for authority in authorities])
    else:
        trust_root = ssl.platformTrust()
    return ssl.optionsForClientTLS(server_name, trustRoot=trust_root,
                                   extraCertificateOptions={"raiseMinimumTo": MINIMUM_VERSION})
