"""RFC 6690 link format: writing, parsing, /.well-known/core filtering."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nettester.protocols.coap.linkformat import Link, LinkFormatError, filter_links, format_links, parse_links

LINKS = [
    Link("/obs", (("obs", None), ("rt", "observe time"), ("ct", "0"))),
    Link("/large", (("rt", "block"), ("sz", "1280"), ("title", 'Large "resource"'))),
    Link("/link1", (("rt", "Type1 Type2"), ("if", "If1"))),
    Link("/link2", (("rt", "Type2 Type3"), ("if", "foo"))),
    Link("/path/sub1", (("title", "sub1"),)),
]


def test_format_quotes_and_flags() -> None:
    text = format_links(LINKS[:2])
    assert text == '</obs>;obs;rt="observe time";ct=0,</large>;rt="block";sz=1280;title="Large \\"resource\\""'
    assert parse_links(text) == LINKS[:2]


def test_parse_tolerates_spaces_and_unquoted_values() -> None:
    parsed = parse_links(' </a>;ct=40;rt=core.rd , </b>')
    assert parsed == [Link("/a", (("ct", "40"), ("rt", "core.rd"))), Link("/b")]
    assert parse_links("") == []


@pytest.mark.parametrize("text", ["/a", "<a", '</a>;rt="x', "</a>;=1", "</a> </b>", "</a>;ct="])
def test_parse_errors(text: str) -> None:
    with pytest.raises(LinkFormatError):
        parse_links(text)


@pytest.mark.parametrize(
    ("query", "targets"),
    [
        (["rt=Type2"], ["/link1", "/link2"]),
        (["rt=Type1"], ["/link1"]),
        (["rt=Type*"], ["/link1", "/link2"]),
        (["if=If1"], ["/link1"]),
        (["href=/path*"], ["/path/sub1"]),
        (["href=/obs"], ["/obs"]),
        (["obs"], ["/obs"]),
        (["ct=0"], ["/obs"]),
        (["rt=Type2", "if=foo"], ["/link2"]),
        (["title=sub*"], ["/path/sub1"]),
        (["rt=none"], []),
        ([], [link.target for link in LINKS]),
    ],
)
def test_filtering(query: list[str], targets: list[str]) -> None:
    assert [link.target for link in filter_links(LINKS, query)] == targets


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=6)
values = st.one_of(st.none(), st.text(max_size=12))
links = st.builds(
    Link,
    st.text(alphabet=st.characters(blacklist_characters=">"), max_size=15),
    st.lists(st.tuples(names, values), max_size=4).map(tuple),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(links, min_size=1, max_size=5))
def test_round_trip(generated: list[Link]) -> None:
    assert parse_links(format_links(generated)) == generated


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='<>;,="\\ abc/01', max_size=40))
def test_fuzz_only_link_format_error(text: str) -> None:
    try:
        parse_links(text)
    except LinkFormatError:
        pass
