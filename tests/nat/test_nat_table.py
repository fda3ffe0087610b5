"""The sans-IO NAT table and drop policy: exact, reactor-free."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from nettester.interfaces import INatTable
from nettester.nat.table import (
    DropPolicy,
    NatTable,
    Route,
    SizeLimit,
    looks_like_dtls,
    parse_size_limit,
)

A = ("10.0.0.1", 5684)
B = ("10.0.0.2", 5684)
C = ("10.0.0.3", 5684)
CLIENT = ("192.0.2.1", 40000)
CLIENT2 = ("192.0.2.2", 40000)


def table(*destinations: tuple[str, int], **kwargs: object) -> NatTable:
    return NatTable(
        [(f"{host}:{port}", (host, port)) for host, port in destinations],
        rng=random.Random(7),
        **kwargs,  # type: ignore[arg-type]
    )


def test_provides_the_interface() -> None:
    assert verifyObject(INatTable, table(A))


def test_new_entry_gets_a_socket_key_and_is_sticky() -> None:
    nat = table(A, B, C)
    first = nat.forward(CLIENT, 0.0)
    assert isinstance(first, Route)
    for step in range(1, 20):
        assert nat.forward(CLIENT, step * 0.1) == first
    assert len(nat) == 1


def test_different_clients_get_different_keys_and_spread_over_destinations() -> None:
    nat = table(A, B, C)
    routes = [nat.forward(("192.0.2.1", port), 0.0) for port in range(1000, 1090)]
    assert len({route.key for route in routes if route}) == 90
    usage = {d.address: d.usage for d in nat.destinations()}
    assert sum(usage.values()) == 90
    assert all(count > 10 for count in usage.values()), usage


def test_backward_returns_the_client_and_counts_no_violation() -> None:
    nat = table(A)
    route = nat.forward(CLIENT, 0.0)
    assert route == Route(route.key, A)
    assert nat.backward(route.key, A, 0.1) == CLIENT
    assert nat.violations == 0
    assert nat.backward(9999, A, 0.1) is None


def test_entries_expire_after_the_nat_timeout_without_traffic() -> None:
    nat = table(A, nat_timeout=30.0)
    route = nat.forward(CLIENT, 0.0)
    second = nat.forward(CLIENT2, 10.0)
    assert nat.next_deadline() == 30.0
    assert nat.expire(29.9) == []
    assert nat.backward(route.key, A, 20.0) == CLIENT  # an answer refreshes it
    assert nat.next_deadline() == 40.0
    assert nat.expire(40.0) == [second.key]
    assert nat.key_of(CLIENT2) is None
    assert nat.expire(50.0) == [route.key]
    assert len(nat) == 0 and nat.next_deadline() is None
    assert nat.destinations()[0].usage == 0


def test_max_entries_evicts_the_least_recently_used() -> None:
    nat = table(A, max_entries=2)
    nat.forward(CLIENT, 0.0)
    nat.forward(CLIENT2, 1.0)
    nat.forward(CLIENT, 2.0)
    second = nat.key_of(CLIENT2)
    route = nat.forward(("192.0.2.3", 1), 3.0)
    assert route.evicted == second, "the adapter must close the evicted entry's socket"
    assert nat.key_of(CLIENT2) is None and nat.key_of(CLIENT) is not None
    assert len(nat) == 2 and nat.evicted == 1


def test_violation_is_counted_and_reverse_update_moves_the_entry() -> None:
    nat = table(A, B)
    route = nat.forward(CLIENT, 0.0)
    other = B if route.destination == A else A
    assert nat.backward(route.key, other, 0.1) == CLIENT
    assert nat.violations == 1
    assert nat.destination_of(CLIENT) == route.destination
    nat.reverse_update = True
    assert nat.backward(route.key, other, 0.2) == CLIENT
    assert nat.violations == 2
    assert nat.destination_of(CLIENT) == other
    assert {d.address: d.usage for d in nat.destinations()} == {other: 1, route.destination: 0}


def test_answer_from_an_unknown_source_passes_but_counts() -> None:
    nat = table(A, B, reverse_update=True)
    route = nat.forward(CLIENT, 0.0)
    assert nat.backward(route.key, ("203.0.113.9", 1), 0.1) == CLIENT
    assert nat.violations == 1 and nat.destination_of(CLIENT) == route.destination


def test_silent_destination_becomes_stale_then_is_probed_back() -> None:
    nat = table(A, B, lb_timeout=15.0)
    clients = [("192.0.2.1", port) for port in range(1, 41)]
    for client in clients:
        nat.forward(client, 0.0)
    # A answers everything, B never answers.
    for t in (5.0, 10.0, 16.0):
        for client in clients:
            route = nat.forward(client, t)
            if route.destination == A:
                nat.backward(route.key, A, t)
    assert nat.stale_marked == 1
    assert all(nat.destination_of(client) == A for client in clients)
    # No new entry goes to B while stale ...
    assert all(nat.forward(("198.51.100.1", p), 20.0).destination == A for p in range(20))
    # ... but after another --tlb, B is probed again, and an answer revives it.
    routes = [nat.forward(("198.51.100.2", p), 31.1) for p in range(20)]
    probe = next(route for route in routes if route.destination == B)
    nat.backward(probe.key, B, 31.2)
    assert nat.destinations()[1].stale_since is None


def test_single_destination_never_goes_stale() -> None:
    nat = table(A, lb_timeout=1.0)
    for t in range(10):
        assert nat.forward(CLIENT, float(t)).destination == A
    assert nat.stale_marked == 0


def test_clear_all_and_clear_some() -> None:
    nat = table(A, B)
    for port in range(10):
        nat.forward(("192.0.2.1", port), 0.0)
    removed = nat.clear(3)
    assert len(removed) == 3 and len(nat) == 7
    assert len(nat.clear(None)) == 7 and len(nat) == 0
    assert sum(d.usage for d in nat.destinations()) == 0
    assert nat.clear(5) == []


def test_reassign_gives_new_keys_and_returns_the_old_ones() -> None:
    nat = table(A, B, C)
    before = {port: nat.forward(("192.0.2.1", port), 0.0) for port in range(30)}
    old = nat.reassign(1.0)
    assert sorted(old) == sorted(route.key for route in before.values())
    after = {port: nat.forward(("192.0.2.1", port), 2.0) for port in range(30)}
    assert not {route.key for route in after.values()} & set(old)
    assert any(after[p].destination != before[p].destination for p in range(30))
    assert nat.backward(old[0], A, 3.0) is None


def test_rebalance_keeps_keys_and_reports_changed_of_total() -> None:
    nat = table(A, B, C)
    before = {port: nat.forward(("192.0.2.1", port), 0.0) for port in range(30)}
    changed, total = nat.rebalance(1.0)
    after = {port: nat.forward(("192.0.2.1", port), 2.0) for port in range(30)}
    assert total == 30
    assert changed == sum(after[p].destination != before[p].destination for p in range(30)) > 0
    assert all(after[p].key == before[p].key for p in range(30))
    assert sum(d.usage for d in nat.destinations()) == 30


def test_add_and_remove_destinations() -> None:
    nat = table(A)
    for port in range(10):
        nat.forward(("192.0.2.1", port), 0.0)
    assert nat.add_destination("b:5684", B) is True
    assert nat.add_destination("b:5684", B) is False
    assert nat.remove_destination(A) is True
    assert nat.remove_destination(A) is False
    assert all(nat.destination_of(("192.0.2.1", p)) == B for p in range(10))
    assert nat.info() == ["10 NAT entries, reverse address update disabled.", "Destination: b:5684, usage: 10"]
    assert nat.remove_destination(B) is True
    assert nat.forward(CLIENT, 1.0) is None


def test_info_lines() -> None:
    nat = table(A, B, reverse_update=True)
    assert nat.info() == [
        "0 NAT entries, reverse address update enabled.",
        "Destination: 10.0.0.1:5684, usage: 0",
        "Destination: 10.0.0.2:5684, usage: 0",
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["fwd", "back", "expire", "clear", "reassign", "rebalance", "add", "remove"]),
            st.integers(0, 5),
            st.floats(0, 5),
        ),
        max_size=60,
    )
)
def test_usage_counts_stay_consistent_under_any_command_sequence(steps: list[tuple[str, int, float]]) -> None:
    addresses = [(f"10.0.0.{i}", 1) for i in range(4)]
    nat = NatTable([("a", addresses[0]), ("b", addresses[1])], nat_timeout=3.0, lb_timeout=2.0, max_entries=4,
                   rng=random.Random(1))
    now = 0.0
    for command, number, delay in steps:
        now += delay
        client = ("192.0.2.1", number)
        if command == "fwd":
            nat.forward(client, now)
        elif command == "back":
            nat.backward(number, addresses[number % 4], now)
        elif command == "expire":
            nat.expire(now)
        elif command == "clear":
            nat.clear(number or None)
        elif command == "reassign":
            nat.reassign(now)
        elif command == "rebalance":
            nat.rebalance(now)
        elif command == "add":
            nat.add_destination(str(number), addresses[number % 4])
        else:
            nat.remove_destination(addresses[number % 4])
        assert len(nat) <= 4
        targets = [nat.destination_of(("192.0.2.1", p)) for p in range(6)]
        assert sum(target is not None for target in targets) == len(nat)
        for destination in nat.destinations():
            assert destination.usage == targets.count(destination.address)


def test_looks_like_dtls() -> None:
    assert looks_like_dtls(bytes([22, 254, 253]) + bytes(10))
    assert looks_like_dtls(bytes([25, 254, 253]) + bytes(10))
    assert not looks_like_dtls(bytes([22, 3, 3]) + bytes(10))
    assert not looks_like_dtls(b"\x40\x01\x00\x01")  # CoAP
    assert not looks_like_dtls(bytes([23, 254]))


def test_parse_size_limit() -> None:
    assert parse_size_limit("1000") == SizeLimit(1000, 100.0)
    assert parse_size_limit("200:50") == SizeLimit(200, 50.0)
    for bad in ("", "x", "0", "10:101", "10:-1", "10:x"):
        with pytest.raises(ValueError, match="SIZE"):
            parse_size_limit(bad)


def test_drop_policy_percentages_follow_the_seeded_random() -> None:
    policy = DropPolicy(forward_percent=30.0, backward_percent=0.0, rng=random.Random(3))
    drops = sum(policy.forward_drop(b"x") == "forward_random" for _ in range(10000))
    assert 2700 < drops < 3300
    assert all(policy.backward_drop(b"x") is None for _ in range(1000))


def test_drop_policy_size_limit_and_dtls_filter() -> None:
    policy = DropPolicy(size_limit=SizeLimit(20, 100.0), dtls_only=True, rng=random.Random(3))
    record = bytes([23, 254, 253]) + bytes(10)
    assert policy.forward_drop(record) is None
    assert policy.backward_drop(record + bytes(7)) is None
    assert policy.forward_drop(record + bytes(8)) == "size_limit"
    assert policy.backward_drop(b"\x40\x01\x00\x01") == "not_dtls"
    half = DropPolicy(size_limit=SizeLimit(1, 50.0), rng=random.Random(3))
    dropped = sum(half.forward_drop(b"xx") == "size_limit" for _ in range(4000))
    assert 1800 < dropped < 2200


def test_entries_left_without_destination_join_the_next_one_added() -> None:
    nat = table(A)
    nat.forward(CLIENT, 0.0)
    assert nat.remove_destination(A)
    assert nat.forward(CLIENT, 1.0) is None
    assert nat.add_destination("a again", A)
    assert nat.destinations()[0].usage == 1
    assert nat.forward(CLIENT, 2.0).destination == A
    assert nat.destinations()[0].usage == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30) | st.from_regex(r"\[?[0-9a-f:.]{0,12}\]?:[0-9²¹]{0,6}", fullmatch=True))
def test_address_and_size_parsers_raise_only_value_error(text: str) -> None:
    from nettester.addresses import parse_host_port

    for parse in (lambda t: parse_host_port(t), lambda t: parse_host_port(t, "", 0), parse_size_limit):
        try:
            parse(text)
        except ValueError as error:
            assert "expected" in str(error)


def test_forwarding_reuses_the_entrys_route_until_it_changes() -> None:
    nat = table(A, B)
    first = nat.forward(CLIENT, 0.0)
    assert nat.forward(CLIENT, 1.0) is first
    nat.reassign(2.0)
    moved = nat.forward(CLIENT, 3.0)
    assert moved is not first and moved.key != first.key
    assert DropPolicy().active is False and DropPolicy(size_limit=SizeLimit(5)).active is True
