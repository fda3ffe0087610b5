"""CoAP URIs (RFC 7252 section 6) and the request a client builds from one; Twisted-free.

The options of the client roles parse their URI argument here, and the
client roles build their request here, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from nettester.protocols.coap.message import CON, NON, Code, Message, OptionNumber, encode_uint

# RFC 7252 sections 6.1 and 6.2, RFC 8323 sections 8.1 and 8.2.
DEFAULT_PORTS = {"coap": 5683, "coaps": 5684, "coap+tcp": 5683, "coaps+tcp": 5684}
METHODS = {"GET": Code.GET, "POST": Code.POST, "PUT": Code.PUT, "DELETE": Code.DELETE,
           "FETCH": Code.FETCH, "PATCH": Code.PATCH, "IPATCH": Code.IPATCH}


@dataclass(frozen=True)
class CoapUri:
    """A parsed ``coap://``, ``coaps://``, ``coap+tcp://`` or ``coaps+tcp://`` URI (RFC 7252 section 6.4,
    RFC 8323 section 8)."""

    scheme: str
    host: str
    port: int
    path: tuple[str, ...]
    query: tuple[str, ...]

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for IDatagramLink.connect."""
        return (self.host, self.port)


def parse_uri(text: str) -> CoapUri:
    """Split a CoAP URI into host, port, path segments and query arguments."""
    parts = urlsplit(text.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"expected a coap://, coaps://, coap+tcp:// or coaps+tcp:// URI, got {text!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {text!r}")
    if parts.fragment:
        raise ValueError("a CoAP URI has no fragment (RFC 7252 section 6.4)")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    # Section 6.4 steps 8-9: one Uri-Path per segment, one Uri-Query per argument, percent-decoded.
    segments = tuple(unquote(segment) for segment in parts.path.split("/")[1:])
    if segments == ("",):
        segments = ()
    query = tuple(unquote(argument) for argument in parts.query.split("&") if argument) if parts.query else ()
    return CoapUri(scheme, parts.hostname, port, segments, query)


def build_request(uri: CoapUri, method: str, payload: bytes = b"", confirmable: bool = True,
                  content_format: int | None = None, accept: int | None = None) -> Message:
    """The request message for ``uri``."""
    options: list[tuple[int, bytes]] = [(OptionNumber.URI_PATH, segment.encode()) for segment in uri.path]
    options += [(OptionNumber.URI_QUERY, argument.encode()) for argument in uri.query]
    if content_format is not None:
        options.append((OptionNumber.CONTENT_FORMAT, encode_uint(content_format)))
    if accept is not None:
        options.append((OptionNumber.ACCEPT, encode_uint(accept)))
    return Message(CON if confirmable else NON, METHODS[method.upper()], 0, b"", options, payload)
