"""TLS for CoAP over TCP (coaps+tcp, RFC 8323 section 8.2): pyOpenSSL through Twisted's TLS layer.

The server uses ``--cert``/``--key`` or, with neither, a self-signed
certificate made at start (as the keep-alive server does); ``--trust`` and
``--client-auth`` ask clients for a certificate; ``--trust-all`` accepts any
client chain that verifies up to its own root. Both ends offer ALPN
``coap`` (RFC 8323 section 8.2). The client verifies the server against
``--trust`` (name: ``--server-name`` or the URI's host); without ``--trust``
it does not verify, and says so.

PSK (the DTLS ``--psk-file`` / ``--psk-sandbox`` identities) needs pyOpenSSL
PSK callbacks (``Context.set_psk_server_callback``); ``psk_supported`` says
whether this pyOpenSSL has them. Without them coaps+tcp serves certificates only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl

from nettester.logs import Logger
from nettester.protocols.dtls.core import identity_of_certificate
from nettester.protocols.dtls.options import load_certificates, load_private_key
from nettester.protocols.keepalive.tls import (
    MINIMUM_VERSION,
    ServerCertificate,
    describe,
    load_server_certificate,
    self_signed_certificate,
)

log = Logger()

#: RFC 8323 section 8.2: the ALPN protocol id of CoAP over TLS.
ALPN_COAP = b"coap"


def psk_supported() -> bool:
    """Whether this pyOpenSSL can do TLS-PSK (it needs the PSK callbacks)."""
    return hasattr(SSL.Context, "set_psk_server_callback")


@dataclass(frozen=True)
class TlsServer:
    """The coaps+tcp server's context factory and how to describe its certificate."""

    context_factory: ssl.CertificateOptions
    description: str


def _pem(certificates: list[x509.Certificate]) -> list[ssl.Certificate]:
    return [ssl.Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))
            for certificate in certificates]


def server_tls(options: Mapping[str, Any]) -> TlsServer:
    """The server's TLS from the coap-server options (``cert``, ``key``, ``trust``, ``client-auth``)."""
    if options["cert"]:
        certificate: ServerCertificate = load_server_certificate(options["cert"], options["key"])
    else:
        certificate = self_signed_certificate()
    client_auth = options["client-auth"] or "none"
    trust_all = bool(options.get("trust-all"))
    # --trust-all verifies the client's chain up to its own top (_own_root), not to --trust.
    verify = client_auth != "none" and not trust_all
    trust = load_certificates(options["trust"], "--trust") if options["trust"] and verify else []
    if (options["psk-file"] or options["psk-sandbox"]) and not psk_supported():
        log.warn("coaps+tcp: this pyOpenSSL has no PSK callbacks, so TLS serves the certificate only "
                 "(the PSK identities stay DTLS-only)", event="coap_tls_no_psk")
    # pyOpenSSL takes cryptography objects (its own X509 and PKey are deprecated); Twisted's hints predate that.
    factory = ssl.CertificateOptions(
        privateKey=serialization.load_pem_private_key(certificate.key_pem, password=None),  # type: ignore[arg-type]
        certificate=x509.load_pem_x509_certificate(certificate.chain_pem[0]),  # type: ignore[arg-type]
        extraCertChain=[x509.load_pem_x509_certificate(pem) for pem in certificate.chain_pem[1:]],  # type: ignore[misc]
        verify=verify,
        requireCertificate=client_auth == "needed",
        # Twisted's trust store still wants pyOpenSSL's X509 here.
        caCerts=[anchor.original for anchor in _pem(trust)] if verify else None,
        acceptableProtocols=[ALPN_COAP],
        raiseMinimumTo=MINIMUM_VERSION,
    )
    if trust_all:
        # The context is made once and cached; set before any connection uses it.
        mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if client_auth == "needed" else 0)
        factory.getContext().set_verify(mode, _own_root)
    return TlsServer(factory, describe(certificate))


#: OpenSSL verification errors that only say the top of the client's chain is no trust anchor of
#: ours: self-signed leaf, self-signed root in the chain, issuer of the top not found, lone leaf.
_UNTRUSTED_TOP = frozenset((18, 19, 20, 21))


def _own_root(connection: SSL.Connection, certificate: Any, error: int, depth: int, ok: int) -> bool:
    """``--trust-all`` (Californium's meaning): the chain the client sent must verify (signatures,
    validity, CA constraints) up to its own top, whichever that is; an unknown root is no error."""
    return bool(ok) or error in _UNTRUSTED_TOP


def client_tls(host: str, options: Mapping[str, Any]) -> Any:
    """The client's TLS connection creator (verified against ``--trust``) or, without it, an
    unverified context factory; ``--cert``/``--key`` is the client certificate (the file's other
    certificates are sent after it, as its chain)."""
    client_certificate = None
    chain: list[x509.Certificate] = []
    if options.get("cert"):
        chain = load_certificates(options["cert"], "--cert")
        key = load_private_key(options["key"], "--key")
        client_certificate = ssl.PrivateCertificate.loadPEM(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
            + chain[0].public_bytes(serialization.Encoding.PEM).decode())
    if options.get("trust"):
        trust_root = ssl.trustRootFromCertificates(_pem(load_certificates(options["trust"], "--trust")))
        return ssl.optionsForClientTLS(options.get("server-name") or host, trustRoot=trust_root,
                                       clientCertificate=client_certificate, acceptableProtocols=[ALPN_COAP],
                                       extraCertificateOptions={"raiseMinimumTo": MINIMUM_VERSION,
                                                                **_chain_above(chain)})
    log.warn("coaps+tcp: the server's certificate is not verified (give --trust to verify it)",
             event="coap_tls_unverified")
    extra: dict[str, Any] = {}
    if client_certificate is not None:
        extra = {"privateKey": client_certificate.privateKey.original,
                 "certificate": client_certificate.original, **_chain_above(chain)}
    return ssl.CertificateOptions(verify=False, acceptableProtocols=[ALPN_COAP], raiseMinimumTo=MINIMUM_VERSION,
                                  **extra)


def _chain_above(chain: list[x509.Certificate]) -> dict[str, Any]:
    """``CertificateOptions`` arguments sending the certificates above a client's leaf (Twisted
    refuses a chain, even an empty one, without a certificate)."""
    return {"extraCertChain": chain[1:]} if len(chain) > 1 else {}


def tls_context(transport: Any) -> tuple[str | None, str | None]:
    """(peer identity, cipher suite) of a TLS transport, (None, None) before the handshake."""
    handle = getattr(transport, "getHandle", None)
    connection = handle() if handle is not None else None
    if not isinstance(connection, SSL.Connection):
        return None, None
    peer = connection.get_peer_certificate()
    identity = identity_of_certificate(peer.to_cryptography()) if peer is not None else None
    return identity, connection.get_cipher_name()
