"""Snapshots of established DTLS 1.2 server connections, so that a cluster
node can take over the connections of a node that died without a new
handshake: the owner replicates ``snapshot_connection(connection)`` to a
backup node, which calls ``restore_connection`` when the owner is gone.

A snapshot holds the session's master secret and the record keys of both
directions: it must only travel encrypted (and authenticated) and must never
be logged.

Format version 1, integers big-endian::

    offset  size  field
    0       1     format version (1)
    1       1     flags: 1 CID negotiated, 2 extended master secret,
                  4 peer identity present
    2       2     cipher suite
    4       2     read epoch
    6       8     read replay window: highest sequence number (signed, -1: none)
    14      8     read replay window: bitmap (bit i: highest - i received)
    22      2     write epoch
    24      8     write: next sequence number
    32      2     peer port
    34      ...   vectors with a 1-byte length: read MAC key, read key,
                  read IV, read CID, write MAC key, write key, write IV,
                  write CID, session id, master secret, peer host (text);
                  then the peer identity with a 2-byte length (UTF-8)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record, suites
from nettester.protocols.dtls.connection import (
    DtlsConfiguration,
    DtlsConnection,
    EstablishedState,
    Session,
)

FORMAT_VERSION = 1
_HEADER = struct.Struct("!BBHHqQHQH")
_CID_NEGOTIATED, _EXTENDED_MASTER_SECRET, _HAS_IDENTITY = 1, 2, 4
_MAX_SESSION_ID = 32  # RFC 5246 section 7.4.1.2


class SnapshotError(ValueError):
    """A connection that cannot be snapshotted or a snapshot that cannot be
    restored; ``reason`` is short snake_case text (a metrics label)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def snapshot_connection(connection: DtlsConnection) -> bytes:
    """The versioned binary snapshot of an established server connection
    (see the module docstring for the layout).

    It contains the master secret and the record keys: send it only over an
    encrypted, authenticated channel and never log it.
    """
    if not connection.is_established:
        raise SnapshotError("not_established")
    if connection.is_client:
        raise SnapshotError("not_server")
    state = connection._established_state()
    session = state.session
    if state.peer_address is None:
        raise SnapshotError("no_peer_address")
    host, port = state.peer_address[0], state.peer_address[1]
    flags = (
        (_CID_NEGOTIATED if state.cid_negotiated else 0)
        | (_EXTENDED_MASTER_SECRET if session.extended_master_secret else 0)
        | (_HAS_IDENTITY if session.peer_identity is not None else 0)
    )
    try:
        host_bytes = host.encode("utf-8")
        identity = (session.peer_identity or "").encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates
        raise SnapshotError("unencodable_peer") from error
    parts = [
        _HEADER.pack(
            FORMAT_VERSION,
            flags,
            session.cipher_suite,
            state.read_epoch,
            state.read_highest,
            state.read_bitmap,
            state.write_epoch,
            state.write_sequence,
            port,
        ),
        *_keys_vectors(state.read_keys),
        _vector(state.read_cid),
        *_keys_vectors(state.write_keys),
        _vector(state.write_cid),
        _vector(session.session_id),
        _vector(session.master_secret),
        _vector(host_bytes),
        _vector(identity, 2),
    ]
    return b"".join(parts)


def restore_connection(
    configuration: DtlsConfiguration,
    snapshot: bytes,
    sequence_gap: int,
) -> DtlsConnection:
    """An established server connection continuing ``snapshot``, as if its
    handshake had just completed here (no HandshakeCompleted event).

    Its next write sequence number is the snapshot's plus ``sequence_gap``:
    the dead node may have sent records after it took the snapshot, and a
    sequence number sent twice under the same key is a repeated AEAD nonce
    (the nonce is the salt and the epoch + sequence number: RFC 6347 section
    4.1, RFC 5288 section 3, RFC 6655 section 3), which RFC 5116 section 3
    forbids.  The read
    replay window goes on from the snapshot's, so records the owner accepted
    before the snapshot are replays here.  Raises ``SnapshotError`` for any bad input.
    """
    if configuration.is_client:
        raise SnapshotError("not_server")
    if sequence_gap < 0:
        raise SnapshotError("bad_sequence_gap")
    state = _decode(snapshot)
    suite = suites.SUITES[state.session.cipher_suite]
    if suite.name not in configuration.cipher_suites:
        raise SnapshotError("suite_not_configured")
    generator = configuration.cid_generator
    cid_length = generator.length if generator is not None else 0
    if state.cid_negotiated and len(state.read_cid) != cid_length:
        # The endpoint parses tls12_cid records with its own CID length (RFC 9146 section 4).
        raise SnapshotError("cid_length_mismatch")
    write_sequence = state.write_sequence + sequence_gap
    if write_sequence > record.MAX_SEQUENCE:
        raise SnapshotError("sequence_exhausted")  # RFC 6347 section 4.1: no wrap, no reuse
    return DtlsConnection._restore(configuration, dataclasses.replace(state, write_sequence=write_sequence))


def _vector(value: bytes, length_size: int = 1) -> bytes:
    if len(value) >= 1 << (8 * length_size):
        raise SnapshotError("field_too_long")
    return hs.vector(length_size, value)


def _keys_vectors(keys: suites.KeyMaterial) -> list[bytes]:
    return [_vector(keys.mac_key), _vector(keys.key), _vector(keys.iv)]


def _keys(reader: hs.Reader, suite: suites.CipherSuite) -> suites.KeyMaterial:
    """MAC key, key and IV, each a 1-byte-length vector, of the lengths ``suite`` uses."""
    material = suites.KeyMaterial(reader.vector(1), reader.vector(1), reader.vector(1))
    if not suite.fits(material):
        raise SnapshotError("bad_length")
    return material


def _decode(snapshot: bytes) -> EstablishedState:
    """The state in ``snapshot``, every field checked."""
    if not snapshot:
        raise SnapshotError("truncated")
    if snapshot[0] != FORMAT_VERSION:
        raise SnapshotError("bad_version")
    reader = hs.Reader(snapshot)
    try:
        (
            _version,
            flags,
            suite_code,
            read_epoch,
            read_highest,
            read_bitmap,
            write_epoch,
            write_sequence,
            port,
        ) = _HEADER.unpack(reader.take(_HEADER.size))
    except hs.DecodeError:  # the only one take() raises: truncated
        raise SnapshotError("truncated") from None
    if flags & ~(_CID_NEGOTIATED | _EXTENDED_MASTER_SECRET | _HAS_IDENTITY):
        raise SnapshotError("bad_flags")
    suite = suites.SUITES.get(suite_code)
    if suite is None:
        raise SnapshotError("unknown_suite")
    if read_epoch == 0 or write_epoch == 0:
        raise SnapshotError("bad_epoch")  # epoch 0 is unprotected: no established connection uses it
    try:
        record.ReplayWindow.continuing(read_highest, read_bitmap)
    except ValueError as error:
        raise SnapshotError("bad_replay_window") from error
    if write_sequence > record.MAX_SEQUENCE + 1:
        raise SnapshotError("bad_sequence")
    try:
        read_keys, read_cid = _keys(reader, suite), reader.vector(1)
        write_keys, write_cid = _keys(reader, suite), reader.vector(1)
        session_id, master_secret, host_bytes = reader.vector(1), reader.vector(1), reader.vector(1)
        identity_bytes = reader.vector(2)
    except hs.DecodeError:  # vector() without bounds only runs out: truncated
        raise SnapshotError("truncated") from None
    if reader.remaining:
        raise SnapshotError("bad_length")
    cid_negotiated = bool(flags & _CID_NEGOTIATED)
    if not cid_negotiated and (read_cid or write_cid) or cid_negotiated and not read_cid:
        raise SnapshotError("bad_cid")  # a server always gives itself a CID (RFC 9146 section 3)
    if len(session_id) > _MAX_SESSION_ID or len(master_secret) != suites.MASTER_SECRET_LENGTH:
        raise SnapshotError("bad_length")
    try:
        host = host_bytes.decode("utf-8")
        ipaddress.ip_address(host)
        identity = identity_bytes.decode("utf-8")
    except ValueError as error:  # UnicodeDecodeError is one
        raise SnapshotError("bad_peer") from error
    if not flags & _HAS_IDENTITY and identity:
        raise SnapshotError("bad_peer")
    return EstablishedState(
        session=Session(
            session_id,
            suite_code,
            master_secret,
            bool(flags & _EXTENDED_MASTER_SECRET),
            identity if flags & _HAS_IDENTITY else None,
        ),
        cid_negotiated=cid_negotiated,
        read_epoch=read_epoch,
        read_keys=read_keys,
        read_cid=read_cid,
        read_highest=read_highest,
        read_bitmap=read_bitmap,
        write_epoch=write_epoch,
        write_keys=write_keys,
        write_cid=write_cid,
        write_sequence=write_sequence,
        peer_address=(host, port),
    )
