"""The CoAP layer's parameters (RFC 7252 section 4.8 and the stack's own bounds) and counters."""

from __future__ import annotations

from dataclasses import dataclass

from nettester.protocols.coap.message import OptionNumber

# RFC 7252 section 4.8.2 MAX_TRANSMIT_WAIT with the default parameters: ACK_TIMEOUT *
# (2 ** (MAX_RETRANSMIT + 1) - 1) * ACK_RANDOM_FACTOR = 2 * 31 * 1.5 s, when a CON sender gives up.
MAX_TRANSMIT_WAIT = 93.0

#: Critical options (RFC 7252 section 5.4.6: odd numbers) a request may carry:
#: those the layer and the resources implement. Any other critical option gets
#: 4.02 Bad Option (section 5.4.1), e.g. OSCORE (9), EDHOC (21), Q-Block1/2 (19, 31).
SUPPORTED_CRITICAL_OPTIONS = frozenset((
    OptionNumber.IF_MATCH, OptionNumber.URI_HOST, OptionNumber.IF_NONE_MATCH, OptionNumber.URI_PORT,
    OptionNumber.URI_PATH, OptionNumber.URI_QUERY, OptionNumber.ACCEPT, OptionNumber.BLOCK2,
    OptionNumber.BLOCK1, OptionNumber.PROXY_URI, OptionNumber.PROXY_SCHEME,
))


@dataclass(frozen=True, slots=True)
class TransmissionParameters:
    """RFC 7252 section 4.8 parameters and the stack's own limits."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    nstart: int = 1
    max_latency: float = 100.0
    #: Preferred block size exponent (RFC 7959): 6 = 1024 bytes.
    block_szx: int = 6
    #: Largest request body accepted (Size1 announced, or reassembled from
    #: Block1); beyond it 4.13 with Size1 telling the limit (RFC 7959 section
    #: 2.9.3). 8192 as Californium's MAX_RESOURCE_BODY_SIZE.
    max_body_size: int = 8192
    #: Largest response body reassembled from Block2 (client side).
    max_response_body_size: int = 1 << 20
    #: Block-wise transfers kept at once (uploads, and bodies being served):
    #: with max_body_size this bounds the memory block-wise can take.
    max_block_transfers: int = 4096
    #: Unfinished uploads of one peer; a new one evicts the peer's oldest.
    max_uploads_per_peer: int = 4
    #: Bytes of all unfinished uploads together; past it the least recently
    #: active upload of another peer goes (counted).
    max_upload_bytes: int = 8 << 20
    #: Critical options a request may carry (others get 4.02).
    supported_critical_options: frozenset[int] = SUPPORTED_CRITICAL_OPTIONS
    token_length: int = 8
    dedup_buckets: int = 4
    #: Hard cap of the deduplication store (about 400 bytes per entry with
    #: its cached answer): past it the oldest bucket goes early (counted).
    max_dedup_entries: int = 1 << 20
    #: RFC 7641 section 4.5: NON notifications turn CON now and then, so an
    #: observer that went away is noticed (its CON times out) and forgotten.
    notification_check_count: int = 100
    notification_check_interval: float = 24 * 3600.0

    @property
    def max_transmit_span(self) -> float:
        """RFC 7252 section 4.8.2."""
        return self.ack_timeout * ((1 << self.max_retransmit) - 1) * self.ack_random_factor

    @property
    def exchange_lifetime(self) -> float:
        """RFC 7252 section 4.8.2: span + 2 * MAX_LATENCY + PROCESSING_DELAY (= ACK_TIMEOUT)."""
        return self.max_transmit_span + 2 * self.max_latency + self.ack_timeout

    @property
    def non_lifetime(self) -> float:
        """RFC 7252 section 4.8.2: span + MAX_LATENCY."""
        return self.max_transmit_span + self.max_latency


@dataclass(slots=True)
class LayerStats:
    """Plain counters; the role exports them as metrics."""

    received: int = 0
    sent: int = 0
    garbage: int = 0
    format_errors: int = 0
    bad_options: int = 0
    duplicates: int = 0
    pings: int = 0
    resets_received: int = 0
    retransmissions: int = 0
    transmission_failures: int = 0
    unmatched: int = 0
    stale_notifications: int = 0
    block_errors: int = 0
