"""TLS alert levels and descriptions (RFC 5246 section 7.2, RFC 4279
section 2, RFC 5746), with the names failure reasons are written in."""

from __future__ import annotations

WARNING, FATAL = 1, 2

CLOSE_NOTIFY = 0
UNEXPECTED_MESSAGE = 10
BAD_RECORD_MAC = 20
HANDSHAKE_FAILURE = 40
BAD_CERTIFICATE = 42
CERTIFICATE_EXPIRED = 45
CERTIFICATE_UNKNOWN = 46
ILLEGAL_PARAMETER = 47
UNKNOWN_CA = 48
ACCESS_DENIED = 49
DECODE_ERROR = 50
DECRYPT_ERROR = 51
PROTOCOL_VERSION = 70
INSUFFICIENT_SECURITY = 71
INTERNAL_ERROR = 80
USER_CANCELED = 90
NO_RENEGOTIATION = 100
UNSUPPORTED_EXTENSION = 110
UNRECOGNIZED_NAME = 112
UNKNOWN_PSK_IDENTITY = 115

ALERT_NAMES = {
    CLOSE_NOTIFY: "close_notify",
    UNEXPECTED_MESSAGE: "unexpected_message",
    BAD_RECORD_MAC: "bad_record_mac",
    21: "decryption_failed",
    22: "record_overflow",
    30: "decompression_failure",
    HANDSHAKE_FAILURE: "handshake_failure",
    41: "no_certificate",
    BAD_CERTIFICATE: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    CERTIFICATE_EXPIRED: "certificate_expired",
    CERTIFICATE_UNKNOWN: "certificate_unknown",
    ILLEGAL_PARAMETER: "illegal_parameter",
    UNKNOWN_CA: "unknown_ca",
    ACCESS_DENIED: "access_denied",
    DECODE_ERROR: "decode_error",
    DECRYPT_ERROR: "decrypt_error",
    60: "export_restriction",
    PROTOCOL_VERSION: "protocol_version",
    INSUFFICIENT_SECURITY: "insufficient_security",
    INTERNAL_ERROR: "internal_error",
    86: "inappropriate_fallback",
    USER_CANCELED: "user_canceled",
    NO_RENEGOTIATION: "no_renegotiation",
    UNSUPPORTED_EXTENSION: "unsupported_extension",
    UNRECOGNIZED_NAME: "unrecognized_name",
    UNKNOWN_PSK_IDENTITY: "unknown_psk_identity",
}


def alert_name(description: int) -> str:
    """The RFC name of an alert description; ``alert_<n>`` only for a code no
    RFC of DTLS 1.2 defines."""
    return ALERT_NAMES.get(description, "alert_%d" % description)
