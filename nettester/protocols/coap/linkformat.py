"""CoRE Link Format (RFC 6690): write, parse and filter links.

The server writes ``/.well-known/core`` with ``format_links`` after
``filter_links`` applied the request's query (RFC 6690 section 4.1);
the client reads it with ``parse_links``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Attributes whose value is a space-separated list (RFC 6690 sections 3.1-3.2,
# RFC 8288 for rel): a filter matches any one of the listed values.
_LIST_ATTRIBUTES = frozenset(("rt", "if", "rel", "rev"))
# Attributes written unquoted (RFC 6690 section 2: ct and sz are ptokens).
_TOKEN_ATTRIBUTES = frozenset(("ct", "sz"))


class LinkFormatError(ValueError):
    """Text that is not an RFC 6690 link-format document."""


@dataclass(frozen=True, slots=True)
class Link:
    """One link: a target URI and its attributes (a value None means a flag like ``obs``)."""

    target: str
    attributes: tuple[tuple[str, str | None], ...] = ()

    def values(self, name: str) -> list[str | None]:
        """Every value of attribute ``name``, in order."""
        return [value for key, value in self.attributes if key == name]


def format_links(links: list[Link]) -> str:
    """``</a>;rt="x";ct=0,</b>;obs`` (RFC 6690 section 2)."""
    return ",".join(_format_link(link) for link in links)


def _format_link(link: Link) -> str:
    parts = [f"<{link.target}>"]
    for name, value in link.attributes:
        if value is None:
            parts.append(name)
        elif name in _TOKEN_ATTRIBUTES and value.isascii() and value.isdigit():
            parts.append(f"{name}={value}")
        else:
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{name}="{escaped}"')
    return ";".join(parts)


def parse_links(text: str) -> list[Link]:
    """Parse a link-format document.

    Raises ``LinkFormatError`` on anything RFC 6690 section 2 does not allow.
    """
    links: list[Link] = []
    position, end = 0, len(text)
    if not text.strip():
        return links
    while True:
        position = _skip_spaces(text, position)
        if position >= end or text[position] != "<":
            raise LinkFormatError(f"expected '<' at offset {position}")
        close = text.find(">", position)
        if close < 0:
            raise LinkFormatError("unterminated link target")
        target = text[position + 1: close]
        position = close + 1
        attributes: list[tuple[str, str | None]] = []
        while position < end and text[position] == ";":
            name_start = position + 1
            position = name_start
            while position < end and (text[position].isalnum() or text[position] in "-_.*!#$%&'+^`|~"):
                position += 1
            name = text[name_start:position]
            if not name:
                raise LinkFormatError(f"empty attribute name at offset {name_start}")
            value: str | None = None
            if position < end and text[position] == "=":
                value, position = _parse_value(text, position + 1)
            attributes.append((name, value))
        links.append(Link(target, tuple(attributes)))
        position = _skip_spaces(text, position)
        if position >= end:
            return links
        if text[position] != ",":
            raise LinkFormatError(f"expected ',' or ';' at offset {position}")
        position += 1


def _skip_spaces(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _parse_value(text: str, position: int) -> tuple[str, int]:
    """A quoted string (with backslash escapes) or a ptoken."""
    end = len(text)
    if position < end and text[position] == '"':
        chars: list[str] = []
        position += 1
        while position < end:
            char = text[position]
            if char == "\\":
                if position + 1 >= end:
                    break
                chars.append(text[position + 1])
                position += 2
            elif char == '"':
                return "".join(chars), position + 1
            else:
                chars.append(char)
                position += 1
        raise LinkFormatError("unterminated quoted attribute value")
    start = position
    while position < end and text[position] not in ",;\"<> \t":
        position += 1
    if position == start:
        raise LinkFormatError(f"empty attribute value at offset {start}")
    return text[start:position], position


def filter_links(links: list[Link], query: list[str]) -> list[Link]:
    """Apply ``/.well-known/core`` query filters (RFC 6690 section 4.1).

    Each ``name=value`` keeps the links having attribute ``name`` equal to
    ``value`` (or starting with it when ``value`` ends in ``*``); ``href``
    filters on the target; list attributes (rt, if, rel) match any listed
    value. Several filters must all match.
    """
    kept = links
    for argument in query:
        name, separator, wanted = argument.partition("=")
        if not separator:
            kept = [link for link in kept if link.values(name)]
            continue
        kept = [link for link in kept if _link_matches(link, name, wanted)]
    return kept


def _link_matches(link: Link, name: str, wanted: str) -> bool:
    if name == "href":
        candidates: list[str] = [link.target]
    else:
        candidates = []
        for value in link.values(name):
            if value is None:
                continue
            candidates.extend(value.split() if name in _LIST_ATTRIBUTES else [value])
    if wanted.endswith("*"):
        prefix = wanted[:-1]
        return any(candidate.startswith(prefix) for candidate in candidates)
    return wanted in candidates
