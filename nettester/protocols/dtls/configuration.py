"""What a DTLS connection is told (``DtlsConfiguration``) and what outlives
one handshake (``Session``, ``SessionCache``, ``EstablishedState``).

Shared by every connection of a server; sans-IO like the engine.
"""

from __future__ import annotations

import datetime
import enum
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Container

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nettester.interfaces import IConnectionIdGenerator
from nettester.protocols.dtls import suites
from nettester.protocols.dtls.credentials import PskStore

#: a peer's UDP address (host, port)
Address = tuple[str, int]

DEFAULT_SUITES = (
    "TLS_PSK_WITH_AES_128_CCM_8",
    "TLS_PSK_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256",
)


def posix_time(now: float) -> datetime.datetime:
    """The wall-clock time of an engine ``now`` that counts POSIX seconds,
    as ``reactor.seconds()`` does: what certificates are checked against."""
    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc)


class ClientAuth(enum.Enum):
    """Whether a server asks its clients for a certificate."""

    NONE = "none"
    WANTED = "wanted"
    NEEDED = "needed"


@dataclass(frozen=True)
class Session:
    """What session resumption needs (RFC 5246 section 7.3)."""

    session_id: bytes
    cipher_suite: int
    master_secret: bytes = field(repr=False)
    extended_master_secret: bool
    peer_identity: str | None


@dataclass(frozen=True)
class EstablishedState:
    """An established server connection reduced to what continues it on
    another node (``snapshot.py`` gives it a wire form): its session and the
    current epoch of each direction."""

    session: Session
    cid_negotiated: bool
    read_epoch: int
    read_keys: suites.KeyMaterial
    read_cid: bytes
    #: the replay window (RFC 6347 section 4.1.2.6): highest authenticated
    #: sequence number (-1: none yet) and the bitmap below it
    read_highest: int
    read_bitmap: int
    write_epoch: int
    write_keys: suites.KeyMaterial
    write_cid: bytes
    #: the sequence number the next record gets
    write_sequence: int
    peer_address: Address | None


class SessionCache:
    """A bounded LRU of server sessions, shared by a server's connections."""

    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def get(self, session_id: bytes) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None:
            self._sessions.move_to_end(session_id)
        return session

    def put(self, session: Session) -> None:
        self._sessions[session.session_id] = session
        self._sessions.move_to_end(session.session_id)
        while len(self._sessions) > self.capacity:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass
class DtlsConfiguration:
    """Everything a connection is told; shared by a server's connections."""

    is_client: bool
    cipher_suites: tuple[str, ...] = DEFAULT_SUITES
    # PSK: the client's identity and secret, the server's store.
    psk_identity: bytes | None = None
    psk: bytes | None = field(default=None, repr=False)
    psk_store: PskStore | None = None
    # X.509: own chain (leaf first) and key; peers verified against
    # trust_anchors, or not at all when it is None.
    certificate_chain: list[x509.Certificate] = field(default_factory=list)
    private_key: ec.EllipticCurvePrivateKey | None = field(default=None, repr=False)
    trust_anchors: list[x509.Certificate] | None = None
    client_auth: ClientAuth = ClientAuth.NONE
    server_name: str | None = None
    #: maps the engine's ``now`` to the wall-clock time certificates must be
    #: valid at (the engine reads no clock); ``now`` counts POSIX seconds by default
    certificate_time: Callable[[float], datetime.datetime] = posix_time
    # CID (RFC 9146): a client offers a CID of cid_length bytes (None: no
    # extension); a server takes its CIDs from cid_generator (None or
    # length 0: CID off), unique among cids_in_use.
    cid_length: int | None = 6
    cid_generator: IConnectionIdGenerator | None = None
    cids_in_use: Container[bytes] = frozenset()
    #: a server's HelloVerifyRequest secret shared by ``--workers`` processes (None: its own)
    cookie_secret: bytes | None = field(default=None, repr=False)
    require_extended_master_secret: bool = True
    mtu: int = 1400
    initial_retransmit_timeout: float = 1.0
    max_retransmit_timeout: float = 60.0
    max_retransmissions: int = 7
    handshake_timeout: float = 120.0
    session_cache: SessionCache | None = None
    session: Session | None = None
    #: bytes of handshake messages buffered at once (a certificate chain fits)
    max_handshake_message: int = 32768
    random: Callable[[int], bytes] = os.urandom

    def suites(self) -> list[suites.CipherSuite]:
        return [suites.SUITES_BY_NAME[name] for name in self.cipher_suites]
