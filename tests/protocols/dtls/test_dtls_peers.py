"""peers.py on plain values: ClientHello reassembly in front of the cookie
gate, the peer table's bounds and evictions; then the endpoint under a flood
of half-open handshakes (task.Clock, no sockets)."""

from __future__ import annotations

from typing import Any

from dtls_pair import CLIENT_ADDRESS, Pair, psk_configs
from twisted.internet.task import Clock

from nettester.protocols.dtls import handshake as hs
from nettester.protocols.dtls import record
from nettester.protocols.dtls.connection import DtlsConnection
from nettester.protocols.dtls.cookie import Verdict
from nettester.protocols.dtls.endpoint import DtlsEndpoint
from nettester.protocols.dtls.peers import Admission, ClientHelloFragments, PeerTable

LONG_NAME = ".".join(["label%02d" % i for i in range(40)])  # a 319-byte SNI: a long ClientHello


def client_hello(**overrides: Any) -> tuple[DtlsConnection, bytes]:
    """A client and the body of its first ClientHello."""
    client_config, _ = psk_configs(**overrides)
    client = DtlsConnection(client_config, ("192.0.2.2", 5684))
    client.connect(0.0)
    datagrams = client.datagrams_to_send()
    assert client._client_hello is not None
    return client, client._client_hello.encode()


def fragments_record(body: bytes, pieces: list[tuple[int, int]], message_seq: int = 0, sequence: int = 0) -> bytes:
    """One epoch-0 record holding the fragments ``pieces`` (offset, length) of a ClientHello."""
    payload = b"".join(
        hs.encode_header(hs.CLIENT_HELLO, len(body), message_seq, offset, length) + body[offset : offset + length]
        for offset, length in pieces
    )
    return record.encode_plaintext_record(record.HANDSHAKE, record.DTLS_1_2, 0, sequence, payload)


def test_fragmented_client_hello_completes_the_handshake_and_keeps_the_cookie() -> None:
    """Issue 13: a ClientHello in fragments (here 4, one record each) gets a
    HelloVerifyRequest once reassembled, and a connection once it returns
    with the cookie, also in fragments."""
    pair = Pair(*psk_configs(mtu=120, server_name=LONG_NAME))
    pair.start()
    pair.run()
    first_flight = [d for direction, d in pair.wire if direction == "c2s"][:4]
    assert all(record.parse_records(d, 0)[0][0].fragment[0] == hs.CLIENT_HELLO for d in first_flight)
    assert pair.hello_verify_requests == 1
    assert pair.client.is_established and pair.server is not None and pair.server.is_established
    assert pair.now == 0.0


def test_two_fragments_in_one_record_and_two_records_in_one_datagram() -> None:
    _, body = client_hello(server_name=LONG_NAME)
    half = len(body) // 2
    admission = Admission()
    one_record = fragments_record(body, [(0, half), (half, len(body) - half)])
    assert admission.check(one_record, CLIENT_ADDRESS, 0.0).verdict is Verdict.VERIFY
    two_records = fragments_record(body, [(0, half)], sequence=0) + fragments_record(
        body, [(half, len(body) - half)], sequence=1
    )
    result = admission.check(two_records, CLIENT_ADDRESS, 0.0)
    assert result.verdict is Verdict.VERIFY
    # the HelloVerifyRequest echoes the highest record sequence number (RFC 6347 section 4.2.1)
    (reply,), _ = record.parse_records(result.reply, 0)
    assert reply.sequence_number == 1
    assert len(admission.fragments) == 0, "nothing held once complete"


def test_cookie_is_checked_on_the_reassembled_hello() -> None:
    client, body = client_hello(server_name=LONG_NAME)
    admission = Admission()
    half = len(body) // 2
    verify = admission.check(fragments_record(body, [(0, len(body))]), CLIENT_ADDRESS, 0.0)
    client.receive_datagram(verify.reply, None, 0.0)
    assert client._client_hello is not None and client._client_hello.cookie
    with_cookie = client._client_hello.encode()
    half = len(with_cookie) // 2
    assert admission.check(fragments_record(with_cookie, [(0, half)], 1), CLIENT_ADDRESS, 0.0).verdict is Verdict.DROP
    result = admission.check(fragments_record(with_cookie, [(half, len(with_cookie) - half)], 1), CLIENT_ADDRESS, 0.0)
    assert result.verdict is Verdict.ACCEPT
    # the connection is fed one record holding the whole hello, message_seq 1
    (fed,), _ = record.parse_records(result.datagram, 0)
    (fragment,) = hs.parse_fragments(fed.fragment)
    assert fragment.message_seq == 1 and fragment.body == with_cookie
    # the same fragments from another address are no use there
    other = ("192.0.2.77", 4000)
    admission.check(fragments_record(with_cookie, [(0, half)], 1), other, 0.0)
    late = admission.check(fragments_record(with_cookie, [(half, len(with_cookie) - half)], 1), other, 0.0)
    assert late.verdict is Verdict.VERIFY and late.reason == "bad_cookie"


def test_reassembly_area_is_bounded_per_source_and_in_total_and_forgets() -> None:
    fragments = ClientHelloFragments(max_client_hello=1000, area=2500, timeout=2.0)

    def start(address: tuple[str, int], length: int, now: float) -> tuple[str, Any, int]:
        return fragments.add(address, [(0, hs.Fragment(hs.CLIENT_HELLO, length, 0, 0, b"x" * 10))], now)

    assert start(("192.0.2.1", 1), 5000, 0.0)[0] == "client_hello_too_large"
    assert len(fragments) == 0
    for index in range(3):
        assert start(("192.0.2.1", 10 + index), 800, 0.0) == ("", None, 0)
    assert fragments.held == 2400
    # a fourth source needs room: the oldest goes, counted
    assert start(("192.0.2.1", 99), 800, 0.5)[2] == 1
    assert fragments.held == 2400 and fragments.evicted == 1
    assert not fragments.assembling(("192.0.2.1", 10)) and fragments.assembling(("192.0.2.1", 99))
    # after the timeout every partial older than it is forgotten, counted too
    assert start(("192.0.2.1", 100), 100, 2.1)[2] == 2
    assert fragments.held == 900 and fragments.evicted == 3


def test_peer_table_evicts_half_open_first_never_an_active_session() -> None:
    table: PeerTable[str] = PeerTable(max_connections=3, stale_after=300.0, max_half_open=2)
    table.add("established", ("192.0.2.1", 1), 0.0, half_open=True)
    table.established("established")
    table.add("first", ("192.0.2.1", 2), 1.0, half_open=True)
    table.add("second", ("192.0.2.1", 3), 2.0, half_open=True)
    assert table.half_open == 2
    assert table.make_room(3.0) == (True, [("first", "half_open")])
    table.add("third", ("192.0.2.1", 4), 3.0, half_open=True)
    table.established("third")
    assert table.make_room(4.0) == (True, [("second", "half_open")])
    table.add("fourth", ("192.0.2.1", 5), 4.0, half_open=False)
    # full of established sessions that are not stale: refused, nobody evicted
    assert table.make_room(5.0) == (False, [])
    table.touch("third", 300.0)
    table.touch("fourth", 300.0)
    assert table.make_room(301.0) == (True, [("established", "stale")])
    assert table.half_open_evictions == 2
    assert table.pressure_report(301.0) == 2 and table.pressure_report(302.0) == 0


def test_peer_table_cid_and_address_moves() -> None:
    table: PeerTable[str] = PeerTable()
    table.add("peer", ("192.0.2.1", 1), 0.0)
    table.set_cid("peer", b"\x01cid")
    table.move("peer", ("192.0.2.9", 9))
    assert table.at_address(("192.0.2.1", 1)) is None and table.at_address(("192.0.2.9", 9)) == "peer"
    assert table.with_cid(b"\x01cid") == "peer" and b"\x01cid" in table.by_cid
    assert table.add("other", ("192.0.2.9", 9), 1.0) == "peer"
    assert table.with_cid(b"\x01cid") is None and list(table) == ["other"]


class _Sink:
    """A transport that keeps what the endpoint writes, by destination."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, destination: tuple[str, int]) -> None:
        self.sent.append((data, destination))


def test_ten_thousand_half_open_handshakes_do_not_lock_out_a_good_client() -> None:
    """Issue 13: peers that answer the cookie and go quiet fill only the
    half-open bound; the oldest go first, so a good client still completes."""
    clock = Clock()
    client_config, server_config = psk_configs()
    server = DtlsEndpoint(clock, server_configuration=server_config, max_connections=500, max_half_open=200)
    sink = _Sink()
    server.transport = sink  # type: ignore[assignment]
    template, _ = client_hello()
    gate = server.admission.gate
    hello = template._client_hello
    assert hello is not None
    for index in range(10000):
        address = ("10.%d.%d.%d" % (index >> 16, (index >> 8) & 255, index & 255), 40000)
        verify = gate.judge(hello.encode(), 0, 0, address, 0.0)
        (reply,), _ = record.parse_records(verify.reply, 0)
        hello.cookie = hs.decode_hello_verify_request(hs.parse_fragments(reply.fragment)[0].body)
        datagram = record.encode_plaintext_record(
            record.HANDSHAKE, record.DTLS_1_2, 0, 1, hs.encode_message(hs.CLIENT_HELLO, 1, hello.encode())
        )
        hello.cookie = b""
        server.datagramReceived(datagram, address)
    assert server.peers.half_open == 200
    assert server.counters.half_open_evictions.value == 10000 - 200
    assert server.counters.dropped.get("max_connections") == 0
    # now a good client, on the same clock
    client = DtlsEndpoint(clock, client_configuration=client_config)
    client_sink = _Sink()
    client.transport = client_sink  # type: ignore[assignment]
    good = ("192.0.2.200", 5000)
    server_address = ("192.0.2.1", 5684)
    connected = client.connect(server_address)
    sink.sent.clear()
    for _ in range(20):
        to_server, client_sink.sent = client_sink.sent, []
        for data, _ in to_server:
            server.datagramReceived(data, good)
        to_client = [data for data, destination in sink.sent if destination == good]
        sink.sent.clear()
        for data in to_client:
            client.datagramReceived(data, server_address)
        if not to_server and not to_client:
            break
    peers: list[Any] = []
    connected.addCallback(peers.append)
    assert peers and peers[0].connection.is_established
    assert server.peers.with_cid(server.peers.at_address(good).connection.read_cid) is not None  # type: ignore[union-attr]
    assert clock.seconds() == 0.0, "no timer was needed"
