"""DTLS 1.2 cipher suites, the TLS 1.2 PRF and record protection.

Every primitive comes from ``cryptography`` (AES-CCM, AES-GCM, AES-CBC) and
the standard library (HMAC-SHA256).  A ``RecordProtection`` seals and opens
one direction of one epoch; the record layer builds the additional data
(RFC 5246 section 6.2.3, RFC 9146 section 5) and hands it in, so this module
knows nothing about record headers.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM

MASTER_SECRET_LENGTH = 48
VERIFY_DATA_LENGTH = 12


def p_sha256(secret: bytes, seed: bytes, length: int) -> bytes:
    """P_SHA256 of RFC 5246 section 5: HMAC-SHA256 expansion of ``seed``."""
    output = bytearray()
    a_value = seed
    while len(output) < length:
        a_value = hmac.digest(secret, a_value, "sha256")
        output += hmac.digest(secret, a_value + seed, "sha256")
    return bytes(output[:length])


def prf(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """The TLS 1.2 PRF (RFC 5246 section 5), always P_SHA256 for our suites."""
    return p_sha256(secret, label + seed, length)


def master_secret(
    pre_master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
    session_hash: bytes | None,
) -> bytes:
    """The 48-byte master secret; with ``session_hash`` the extended master
    secret of RFC 7627 section 4, else RFC 5246 section 8.1."""
    if session_hash is not None:
        return prf(pre_master_secret, b"extended master secret", session_hash, MASTER_SECRET_LENGTH)
    return prf(pre_master_secret, b"master secret", client_random + server_random, MASTER_SECRET_LENGTH)


def finished_verify_data(master: bytes, is_client: bool, transcript_hash: bytes) -> bytes:
    """Finished.verify_data (RFC 5246 section 7.4.9)."""
    label = b"client finished" if is_client else b"server finished"
    return prf(master, label, transcript_hash, VERIFY_DATA_LENGTH)


def psk_pre_master_secret(psk: bytes, other_secret: bytes | None = None) -> bytes:
    """The PSK premaster secret: RFC 4279 section 2 (other_secret of N zero
    bytes) or RFC 5489 section 2 (other_secret the ECDH shared secret)."""
    if other_secret is None:
        other_secret = bytes(len(psk))
    return len(other_secret).to_bytes(2, "big") + other_secret + len(psk).to_bytes(2, "big") + psk


class KeyExchange(enum.Enum):
    """How the premaster secret is agreed and who is authenticated."""

    PSK = "PSK"
    ECDHE_ECDSA = "ECDHE_ECDSA"
    ECDHE_PSK = "ECDHE_PSK"

    @property
    def uses_psk(self) -> bool:
        return self is not KeyExchange.ECDHE_ECDSA

    @property
    def uses_ecdhe(self) -> bool:
        return self is not KeyExchange.PSK


class BulkCipher(enum.Enum):
    AES_128_CCM_8 = "AES_128_CCM_8"
    AES_128_GCM = "AES_128_GCM"
    AES_128_CBC_SHA256 = "AES_128_CBC_SHA256"


@dataclass(frozen=True)
class KeyMaterial:
    """The keys of one direction of one epoch (RFC 5246 section 6.3): the
    MAC key (CBC suites), the cipher key and the fixed IV (AEAD salt)."""

    mac_key: bytes = field(repr=False)
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)


@dataclass(frozen=True)
class CipherSuite:
    """One supported suite with its key block layout (RFC 5246 section 6.3)."""

    code: int
    name: str
    key_exchange: KeyExchange
    bulk: BulkCipher

    @property
    def mac_key_length(self) -> int:
        return 32 if self.bulk is BulkCipher.AES_128_CBC_SHA256 else 0

    @property
    def enc_key_length(self) -> int:
        return 16

    @property
    def fixed_iv_length(self) -> int:
        # AEAD: the 4-byte implicit nonce salt (RFC 5288 section 3, RFC 6655
        # section 3); CBC: TLS 1.2 uses an explicit per-record IV instead.
        return 0 if self.bulk is BulkCipher.AES_128_CBC_SHA256 else 4

    def key_material(self, key_block: bytes) -> tuple[KeyMaterial, KeyMaterial]:
        """(client write, server write) keys cut from the key block."""
        mac, key, iv = self.mac_key_length, self.enc_key_length, self.fixed_iv_length
        offset = 0
        parts = []
        for length in (mac, mac, key, key, iv, iv):
            parts.append(key_block[offset : offset + length])
            offset += length
        client_mac, server_mac, client_key, server_key, client_iv, server_iv = parts
        return KeyMaterial(client_mac, client_key, client_iv), KeyMaterial(server_mac, server_key, server_iv)

    def fits(self, material: KeyMaterial) -> bool:
        """Whether ``material`` has this suite's key lengths."""
        return (len(material.mac_key), len(material.key), len(material.iv)) == (
            self.mac_key_length,
            self.enc_key_length,
            self.fixed_iv_length,
        )

    def protection(self, material: KeyMaterial) -> RecordProtection:
        """The protection of one direction of one epoch keyed with ``material``."""
        if self.bulk is BulkCipher.AES_128_CCM_8:
            return AeadProtection(AESCCM(material.key, tag_length=8), material.iv, 8)
        if self.bulk is BulkCipher.AES_128_GCM:
            return AeadProtection(AESGCM(material.key), material.iv, 16)
        return CbcHmacProtection(material.key, material.mac_key, os.urandom)

    def protections(self, key_block: bytes) -> tuple["RecordProtection", "RecordProtection"]:
        """(client write, server write) protections from the key block."""
        client_write, server_write = self.key_material(key_block)
        return self.protection(client_write), self.protection(server_write)

    @property
    def key_block_length(self) -> int:
        return 2 * (self.mac_key_length + self.enc_key_length + self.fixed_iv_length)


SUITES: dict[int, CipherSuite] = {
    suite.code: suite
    for suite in (
        CipherSuite(0xC0A8, "TLS_PSK_WITH_AES_128_CCM_8", KeyExchange.PSK, BulkCipher.AES_128_CCM_8),
        CipherSuite(0x00A8, "TLS_PSK_WITH_AES_128_GCM_SHA256", KeyExchange.PSK, BulkCipher.AES_128_GCM),
        CipherSuite(0xC0AE, "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8", KeyExchange.ECDHE_ECDSA, BulkCipher.AES_128_CCM_8),
        CipherSuite(0xC02B, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", KeyExchange.ECDHE_ECDSA, BulkCipher.AES_128_GCM),
        CipherSuite(
            0xC037, "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256", KeyExchange.ECDHE_PSK, BulkCipher.AES_128_CBC_SHA256
        ),
    )
}
SUITES_BY_NAME: dict[str, CipherSuite] = {suite.name: suite for suite in SUITES.values()}


def key_block(master: bytes, client_random: bytes, server_random: bytes, suite: CipherSuite) -> bytes:
    """RFC 5246 section 6.3: note server_random comes first here."""
    return prf(master, b"key expansion", server_random + client_random, suite.key_block_length)


class RecordProtection:
    """Seals and opens record fragments of one direction of one epoch."""

    #: bytes added to a plaintext, upper bound (nonce/IV + tag/MAC + padding)
    overhead: int

    def seal(self, plaintext: bytes, additional_data: bytes, explicit_nonce: bytes) -> bytes:
        """The protected fragment for ``plaintext``."""
        raise NotImplementedError

    def open(self, fragment: bytes, additional_data_for: Callable[[int], bytes]) -> bytes | None:
        """The plaintext of ``fragment``, or None when it fails authentication.

        ``additional_data_for(plaintext_length)`` builds the additional data,
        which depends on the plaintext length the fragment turns out to have.
        """
        raise NotImplementedError


class AeadProtection(RecordProtection):
    """AES-CCM-8 / AES-GCM with an 8-byte explicit nonce (RFC 5288, RFC 6655):
    fragment = nonce_explicit + ciphertext + tag."""

    __slots__ = ("_aead", "_salt", "_tag_length")

    def __init__(self, aead: AESCCM | AESGCM, salt: bytes, tag_length: int) -> None:
        self._aead = aead
        self._salt = salt
        self._tag_length = tag_length
        self.overhead = 8 + tag_length

    def seal(self, plaintext: bytes, additional_data: bytes, explicit_nonce: bytes) -> bytes:
        return explicit_nonce + self._aead.encrypt(self._salt + explicit_nonce, plaintext, additional_data)

    def open(self, fragment: bytes, additional_data_for: Callable[[int], bytes]) -> bytes | None:
        plaintext_length = len(fragment) - 8 - self._tag_length
        if plaintext_length < 0:
            return None
        try:
            return self._aead.decrypt(self._salt + fragment[:8], fragment[8:], additional_data_for(plaintext_length))
        except InvalidTag:
            return None


class CbcHmacProtection(RecordProtection):
    """AES-128-CBC with HMAC-SHA256, MAC-then-encrypt (RFC 5246 section
    6.2.3.2): fragment = IV + CBC(plaintext + MAC + padding)."""

    __slots__ = ("_key", "_mac_key", "_random")
    _MAC_LENGTH = 32
    _BLOCK = 16

    def __init__(self, key: bytes, mac_key: bytes, random: Callable[[int], bytes]) -> None:
        self._key = algorithms.AES(key)
        self._mac_key = mac_key
        self._random = random
        self.overhead = self._BLOCK + self._MAC_LENGTH + self._BLOCK

    def seal(self, plaintext: bytes, additional_data: bytes, explicit_nonce: bytes) -> bytes:
        mac = hmac.digest(self._mac_key, additional_data + plaintext, "sha256")
        body_length = len(plaintext) + self._MAC_LENGTH + 1
        padding_length = (-body_length) % self._BLOCK
        padding = bytes([padding_length]) * (padding_length + 1)
        iv = self._random(self._BLOCK)
        encryptor = Cipher(self._key, modes.CBC(iv)).encryptor()
        return iv + encryptor.update(plaintext + mac + padding) + encryptor.finalize()

    def open(self, fragment: bytes, additional_data_for: Callable[[int], bytes]) -> bytes | None:
        ciphertext_length = len(fragment) - self._BLOCK
        minimum = self._BLOCK * ((self._MAC_LENGTH + 1 + self._BLOCK - 1) // self._BLOCK)
        if ciphertext_length < minimum or ciphertext_length % self._BLOCK:
            return None
        decryptor = Cipher(self._key, modes.CBC(fragment[: self._BLOCK])).decryptor()
        padded = decryptor.update(fragment[self._BLOCK :]) + decryptor.finalize()
        padding_length = padded[-1]
        padding_ok = padding_length + 1 + self._MAC_LENGTH <= len(padded)
        if not padding_ok:
            # Keep the work roughly the same as for good padding (RFC 5246
            # section 6.2.3.2 note on timing): MAC as if there were none.
            padding_length = 0
        padding_ok = (
            hmac.compare_digest(
                padded[len(padded) - padding_length - 1 :], bytes([padding_length]) * (padding_length + 1)
            )
            and padding_ok
        )
        plaintext_length = len(padded) - padding_length - 1 - self._MAC_LENGTH
        plaintext = padded[:plaintext_length]
        received_mac = padded[plaintext_length : plaintext_length + self._MAC_LENGTH]
        expected_mac = hmac.digest(self._mac_key, additional_data_for(plaintext_length) + plaintext, "sha256")
        mac_ok = hmac.compare_digest(received_mac, expected_mac)
        return plaintext if (mac_ok and padding_ok) else None


def sha256(data: bytes) -> bytes:
    """SHA-256 digest, the handshake hash of every supported suite."""
    return hashlib.sha256(data).digest()
