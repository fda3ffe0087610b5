"""PSK store, sandbox identities, certificate verification, CID generator."""

from __future__ import annotations

import datetime

import pytest
from zope.interface.verify import verifyObject

from nettester.interfaces import IConnectionIdGenerator
from nettester.protocols.dtls.certificates import issue, make_ca
from nettester.protocols.dtls.cid import NodeConnectionIdGenerator
from nettester.protocols.dtls.credentials import CredentialsError, PskStore, verify_chain


def test_psk_store_lines_and_sandbox() -> None:
    store = PskStore.from_lines(["# comment", "", "a=c2VjcmV0", "b=YQ=="])
    assert store.lookup(b"a") == b"secret" and store.lookup(b"b") == b"a"
    assert store.lookup(b"Client_identity") is None
    sandbox = PskStore(sandbox=True)
    assert sandbox.lookup(b"Client_identity") == b"secretPSK"
    assert sandbox.lookup(b"password") == b"sesame"
    assert sandbox.lookup(b"cali.anything") == b".fornium"
    assert sandbox.lookup(b"other") is None
    assert not PskStore() and sandbox
    for bad in (["no-separator"], ["=c2VjcmV0"], ["a=!!!"], ["a="]):
        with pytest.raises(CredentialsError):
            PskStore.from_lines(bad)


def test_verify_chain_checks_anchor_name_and_time() -> None:
    ca = make_ca()
    leaf = issue(ca, "server.example", ("server.example",))
    verify_chain(leaf.full_chain(), [ca.certificate], "server.example")
    verify_chain(leaf.full_chain(), [ca.certificate])  # a client certificate: no name
    with pytest.raises(CredentialsError):
        verify_chain(leaf.full_chain(), [ca.certificate], "other.example")
    with pytest.raises(CredentialsError):
        verify_chain(leaf.full_chain(), [make_ca().certificate], "server.example")
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    with pytest.raises(CredentialsError):
        verify_chain(leaf.full_chain(), [ca.certificate], "server.example", at=later)
    with pytest.raises(CredentialsError):
        verify_chain([], [ca.certificate])


def test_cid_generator() -> None:
    generator = NodeConnectionIdGenerator(6, 42)
    assert verifyObject(IConnectionIdGenerator, generator)
    taken = {generator.new_connection_id(set()) for _ in range(100)}
    assert all(len(cid) == 6 and cid[0] == 42 and generator.node_id_of(cid) == 42 for cid in taken)
    values = iter([b"\x00" * 5, b"\x00" * 5, b"\x01" * 5])
    repeating = NodeConnectionIdGenerator(6, 1, random=lambda n: next(values))
    assert repeating.new_connection_id({b"\x01" + b"\x00" * 5}) == b"\x01" * 6  # unique among live ones
    assert NodeConnectionIdGenerator(0).new_connection_id(set()) == b""
    assert NodeConnectionIdGenerator(4, None).node_id_of(b"abcd") is None
    for arguments in ((1, 0), (256, 0), (6, 256)):
        with pytest.raises(ValueError):
            NodeConnectionIdGenerator(*arguments)
