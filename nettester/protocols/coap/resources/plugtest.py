"""ETSI CoAP plugtest (2014) resources, as Californium's plugtest server offers them.

Every resource answers what the ETSI test descriptions (TD_COAP_CORE,
TD_COAP_LINK, TD_COAP_BLOCK, TD_COAP_OBS) expect of the server under test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from hashlib import blake2b

import cbor2
from twisted.internet import defer
from twisted.internet.task import deferLater

from nettester.protocols.coap.endpoint import Answer
from nettester.protocols.coap.linkformat import Link, format_links
from nettester.protocols.coap.message import (
    Code,
    ContentFormat,
    Message,
    MessageType,
    OptionNumber,
    code_name,
    encode_uint,
    response,
)
from nettester.protocols.coap.resources.base import Exchange, PeriodicResource, Resource

LARGE_SIZE = 1280
MAX_CREATED = 100  # children of large-create kept; the oldest goes first
SEPARATE_DELAY = 1.0
SHUTDOWN_PASSWORD = b"sesame"
TEXT = ContentFormat.TEXT_PLAIN
#: Californium's Max-Age of GET /test and of the observable resources' notifications:
#: a client whose observation was dropped re-registers once it runs out (TD_COAP_OBS_04).
TEST_MAX_AGE = 30
OBSERVE_MAX_AGE = 5
#: The text/plain content format as a link attribute (RFC 6690 section 3.3).
CT_TEXT = ("ct", "0")


def large_body(size: int = LARGE_SIZE) -> bytes:
    """A readable, line-structured text of ``size`` bytes (numbered 64-byte lines)."""
    lines = []
    for number in range((size + 63) // 64):
        lines.append(f"|{number:03d}| plugtest large resource, block-wise transfer (RFC 7959) |".ljust(63, "-"))
    return ("\n".join(lines) + "\n").encode()[:size]


_TYPE_NAMES = tuple(MessageType(number).name for number in range(4))  # cheaper than MessageType(n) per request


def describe_request(exchange: Exchange) -> str:
    """``Type: 0 (CON)`` / ``Code: 1 (GET)`` / ``MID:`` / ``Token:`` lines."""
    request = exchange.request
    return (
        f"Type: {int(request.mtype)} ({_TYPE_NAMES[request.mtype]})\n"
        f"Code: {request.code} ({code_name(request.code)})\n"
        f"MID: {request.mid}\n"
        f"Token: {request.token.hex() or '-'}"
    )


def text_response(code: int, body: str) -> Message:
    """A text/plain response."""
    return response(code, body.encode(), TEXT)


def max_age(answer: Message, seconds: int) -> Message:
    """``answer`` with a Max-Age option (RFC 7252 section 5.10.5)."""
    answer.set_uint_option(OptionNumber.MAX_AGE, seconds)
    return answer


def content_format_missing() -> Message:
    """4.00 for a PUT or POST without Content-Format, as Californium's plugtest resources answer."""
    return text_response(Code.BAD_REQUEST, "Content-Format not set")


_TEST_MAX_AGE_OPTION = (OptionNumber.MAX_AGE, encode_uint(TEST_MAX_AGE))


class DefaultTest(Resource):
    """``test``: TD_COAP_CORE_01..04 (GET, POST creates a location, PUT, DELETE)."""

    def get(self, exchange: Exchange) -> Answer:
        answer = text_response(Code.CONTENT, describe_request(exchange))
        answer.options.append(_TEST_MAX_AGE_OPTION)  # what max_age() adds, encoded once
        return answer

    def post(self, exchange: Exchange) -> Answer:
        answer = response(Code.CREATED)
        for segment in (b"location1", b"location2", b"location3"):
            answer.options.append((OptionNumber.LOCATION_PATH, segment))
        return answer

    def put(self, exchange: Exchange) -> Answer:
        if exchange.request.has_option(OptionNumber.IF_NONE_MATCH):
            # RFC 7252 section 5.10.8.2: the resource exists.
            return response(Code.PRECONDITION_FAILED)
        return response(Code.CHANGED)

    def delete(self, exchange: Exchange) -> Answer:
        return response(Code.DELETED)


class Text(Resource):
    """A resource answering GET with a fixed text (``seg1/seg2/seg3``...)."""

    def __init__(self, name: str, body: str, attributes: tuple[tuple[str, str | None], ...] = ()) -> None:
        super().__init__(name, attributes or (("title", f"{name} resource"),))
        self.body = body

    def get(self, exchange: Exchange) -> Answer:
        return text_response(Code.CONTENT, self.body)


class PathSub(Resource):
    """``path/subN``: answers its own path (TD_COAP_LINK_09), as Californium's ``getURI()``."""

    def get(self, exchange: Exchange) -> Answer:
        return text_response(Code.CONTENT, self.path)


class Path(Resource):
    """``path``: GET lists the sub-resources in link format (TD_COAP_LINK_09)."""

    def get(self, exchange: Exchange) -> Answer:
        links = [resource.link() for resource in self.walk() if resource is not self and resource.visible]
        return response(Code.CONTENT, format_links(links).encode(), ContentFormat.LINK_FORMAT)


class Query(Resource):
    """``query``: echoes the request and its Uri-Query (TD_COAP_CORE_13)."""

    def get(self, exchange: Exchange) -> Answer:
        query = "&".join(exchange.request.uri_query)
        return text_response(Code.CONTENT, f"{describe_request(exchange)}\nQuery: {query}")


class Separate(Resource):
    """``separate``: an empty ACK at once, the response a second later (TD_COAP_CORE_09)."""

    def __init__(self, name: str, body: Callable[[Exchange], bytes] | None = None,
                 attributes: tuple[tuple[str, str | None], ...] = ()) -> None:
        super().__init__(name, attributes)
        self.body = body

    def get(self, exchange: Exchange) -> Answer:
        exchange.accept()
        payload = self.body(exchange) if self.body else describe_request(exchange).encode()
        later: defer.Deferred[Message] = deferLater(
            exchange.site.reactor, SEPARATE_DELAY, lambda: response(Code.CONTENT, payload, TEXT)
        )
        return later


class Large(Resource):
    """``large``: 1280 bytes, served block-wise (TD_COAP_BLOCK_01/02)."""

    def __init__(self, name: str = "large", body: bytes | None = None,
                 title: str = "Large resource") -> None:
        super().__init__(name, (("rt", "block"), ("title", title)))
        self.body = body if body is not None else large_body()
        self.content_format: int = TEXT

    def link(self) -> Link:
        """ct and sz follow the current body (Californium updates them after an upload)."""
        link = super().link()
        return Link(link.target, (("ct", str(self.content_format)),) + link.attributes
                    + (("sz", str(len(self.body))),))

    def get(self, exchange: Exchange) -> Answer:
        return response(Code.CONTENT, self.body, self.content_format)


class LargeUpdate(Large):
    """``large-update``: GET the body, PUT a new one block-wise (TD_COAP_BLOCK_03); observable."""

    observable = True

    def __init__(self) -> None:
        super().__init__("large-update", title="Large resource that can be updated using PUT method")

    def get(self, exchange: Exchange) -> Answer:
        accept = exchange.request.accept
        if accept is not None and accept != self.content_format:
            return response(Code.NOT_ACCEPTABLE)
        return response(Code.CONTENT, self.body, self.content_format)

    def put(self, exchange: Exchange) -> Answer:
        content_format = exchange.request.content_format
        if content_format is None:
            return content_format_missing()
        self.body = exchange.request.payload
        self.content_format = content_format
        self.changed()
        return response(Code.CHANGED)


class LargeCreate(Resource):
    """``large-create``: POST creates a child (TD_COAP_BLOCK_04); GET lists them as link format."""

    def __init__(self) -> None:
        super().__init__("large-create", (("ct", "40"), ("rt", "block"),
                                          ("title", "Large resource that can be created using POST method")))
        self._next = 1

    def get(self, exchange: Exchange) -> Answer:
        links = [child.link() for child in self.children.values()]
        return response(Code.CONTENT, format_links(links).encode(), ContentFormat.LINK_FORMAT)

    def post(self, exchange: Exchange) -> Answer:
        name = str(self._next)
        self._next += 1
        if len(self.children) >= MAX_CREATED:
            self.remove(next(iter(self.children)))  # bounded memory: the oldest child goes
        content_format = exchange.request.content_format
        child = Stored(name, exchange.request.payload, TEXT if content_format is None else content_format)
        self.add(child)
        answer = response(Code.CREATED)
        for segment in child.path.strip("/").split("/"):
            answer.options.append((OptionNumber.LOCATION_PATH, segment.encode()))
        return answer


class Stored(Resource):
    """A body stored by a client: GET returns it, PUT replaces it, DELETE removes it."""

    def __init__(self, name: str, body: bytes, content_format: int) -> None:
        super().__init__(name, (("ct", str(content_format)),))
        self.body = body
        self.content_format = content_format

    def get(self, exchange: Exchange) -> Answer:
        return response(Code.CONTENT, self.body, self.content_format)

    def put(self, exchange: Exchange) -> Answer:
        self.body = exchange.request.payload
        self.changed()
        return response(Code.CHANGED)

    def delete(self, exchange: Exchange) -> Answer:
        assert self.parent is not None
        self.parent.remove(self.name)
        return response(Code.DELETED)


class LargePost(Resource):
    """``large-post``: a block-wise text POST answered upper-cased (TD_COAP_BLOCK_04, as Californium)."""

    def __init__(self) -> None:
        super().__init__("large-post", (("rt", "block"), ("title", "Handle POST with two-way blockwise transfer")))

    def post(self, exchange: Exchange) -> Answer:
        content_format = exchange.request.content_format
        if content_format is None:
            return content_format_missing()
        if content_format != TEXT:
            return response(Code.UNSUPPORTED_CONTENT_FORMAT)
        return response(Code.CHANGED, exchange.request.payload.upper(), TEXT)


class Clock(PeriodicResource):
    """``obs`` and friends: the server time, notified every interval (TD_COAP_OBS), Max-Age 5."""

    def __init__(self, name: str, interval: float, confirmable: bool = True, padding: int = 0) -> None:
        super().__init__(name, interval, (CT_TEXT, ("rt", "observe"), ("title", "Observable resource which changes "
                                                                                 f"every {interval:g} seconds")))
        self.confirmable_notifications = confirmable
        self.padding = padding
        self._override: tuple[bytes, int] | None = None

    def render(self) -> bytes:
        """The current time, padded to ``padding`` bytes for obs-large."""
        now = self.site.reactor.seconds()
        body = time.strftime("%H:%M:%S", time.gmtime(now)).encode()
        if self.padding:
            body = (body + b"\n" + large_body(self.padding))[: self.padding]
        return body

    def get(self, exchange: Exchange) -> Answer:
        if self._override is not None:
            answer = response(Code.CONTENT, self._override[0], self._override[1])
        else:
            answer = response(Code.CONTENT, self.render(), TEXT)
        return max_age(answer, OBSERVE_MAX_AGE)

    def tick(self) -> None:
        self._override = None
        self.changed()

    def put(self, exchange: Exchange) -> Answer:
        """TD_COAP_OBS_04/08: a PUT sets the state (until the next tick) and notifies.

        A new Content-Format ends every observation with 4.06 (RFC 7641
        section 4.2, done by the layer for each notification).
        """
        content_format = exchange.request.content_format
        if content_format is None:
            return content_format_missing()
        self._override = (exchange.request.payload, content_format)
        self.changed()
        return response(Code.CHANGED)

    def delete(self, exchange: Exchange) -> Answer:
        """TD_COAP_OBS_06: observers learn 4.04 and the relation ends."""
        self.end_observations(Code.NOT_FOUND)
        return response(Code.DELETED)


class ObserveReset(Resource):
    """``obs-reset``: POST ``sesame`` ends the observations of every observable resource (Californium's).

    The observers are forgotten without a word (they re-register when the
    last notification's Max-Age runs out); with ``?notfound`` they get 4.04.
    Another payload gets 4.03.
    """

    def post(self, exchange: Exchange) -> Answer:
        if exchange.request.payload != SHUTDOWN_PASSWORD:
            return response(Code.FORBIDDEN)
        not_found = "notfound" in exchange.query()
        for resource in exchange.site.root.walk():
            if resource.observable:
                if not_found:
                    resource.end_observations(Code.NOT_FOUND)
                else:
                    resource.drop_observations()
        return response(Code.CHANGED)


class LocationQuery(Resource):
    """``location-query``: POST answers 2.01 with Location-Query (TD_COAP_CORE_12)."""

    def post(self, exchange: Exchange) -> Answer:
        answer = response(Code.CREATED)
        answer.options.append((OptionNumber.LOCATION_QUERY, b"first=1"))
        answer.options.append((OptionNumber.LOCATION_QUERY, b"second=2"))
        return answer


class MultiFormat(Resource):
    """``multi-format``: text, XML, JSON or CBOR by Accept, else 4.06 (TD_COAP_CORE_20)."""

    FORMATS = (ContentFormat.TEXT_PLAIN, ContentFormat.XML, ContentFormat.JSON, ContentFormat.CBOR)

    def __init__(self) -> None:
        super().__init__("multi-format", (("ct", "0 41 50 60"), ("title", "Resource that exists in different "
                                                                            "content formats")))

    def get(self, exchange: Exchange) -> Answer:
        accept = exchange.request.accept
        accept = ContentFormat.TEXT_PLAIN if accept is None else accept
        if accept not in self.FORMATS:
            return response(Code.NOT_ACCEPTABLE)
        request = exchange.request
        fields = {"type": MessageType(request.mtype).name, "code": code_name(request.code), "mid": request.mid,
                  "accept": int(accept)}
        if accept == ContentFormat.XML:
            body = ("<msg " + " ".join(f'{k}="{v}"' for k, v in fields.items()) + "/>").encode()
        elif accept == ContentFormat.JSON:
            body = json.dumps(fields).encode()
        elif accept == ContentFormat.CBOR:
            body = cbor2.dumps(fields)
        else:
            body = "\n".join(f"{k}: {v}" for k, v in fields.items()).encode()
        return response(Code.CONTENT, body, accept)


class Validate(Resource):
    """``validate``: an ETag; a GET naming it gets 2.03 Valid (TD_COAP_CORE_21/22)."""

    observable = True

    def __init__(self) -> None:
        super().__init__("validate", (("title", "Resource which varies"),))
        self.body = b"validate me"
        self.content_format: int = TEXT

    @property
    def etag(self) -> bytes:
        """A 4-byte digest of the current body."""
        return blake2b(self.body, digest_size=4).digest()

    def get(self, exchange: Exchange) -> Answer:
        etag = self.etag
        if etag in exchange.request.option_values(OptionNumber.ETAG):
            return response(Code.VALID, options=[(OptionNumber.ETAG, etag)])
        return response(Code.CONTENT, self.body, self.content_format, [(OptionNumber.ETAG, etag)])

    def put(self, exchange: Exchange) -> Answer:
        if_match = exchange.request.option_values(OptionNumber.IF_MATCH)
        if if_match and self.etag not in if_match and b"" not in if_match:
            return response(Code.PRECONDITION_FAILED)  # RFC 7252 section 5.10.8.1
        self.body = exchange.request.payload
        content_format = exchange.request.content_format
        self.content_format = TEXT if content_format is None else content_format
        self.changed()
        return response(Code.CHANGED, options=[(OptionNumber.ETAG, self.etag)])


class Create(Resource):
    """``create1``: PUT with If-None-Match creates once, then 4.12 (TD_COAP_CORE_23).

    Hidden from ``/.well-known/core`` until created; a 4.12 clears it again
    (Californium's automatic reset, so the test can be repeated).
    """

    def __init__(self) -> None:
        super().__init__("create1", (("title", "Resource which does not exist yet (to perform atomic PUT)"),))
        self.body: bytes | None = None
        self.content_format: int = TEXT

    @property
    def visible(self) -> bool:  # type: ignore[override]
        return self.body is not None

    def get(self, exchange: Exchange) -> Answer:
        if self.body is None:
            return response(Code.NOT_FOUND)
        return response(Code.CONTENT, self.body, self.content_format)

    def put(self, exchange: Exchange) -> Answer:
        request = exchange.request
        if self.body is not None and request.has_option(OptionNumber.IF_NONE_MATCH):
            self.body = None
            return response(Code.PRECONDITION_FAILED)
        content_format = request.content_format
        if content_format is None:
            return content_format_missing()
        self.body = request.payload
        self.content_format = content_format
        return response(Code.CREATED)

    def delete(self, exchange: Exchange) -> Answer:
        self.body = None
        return response(Code.DELETED)


class Shutdown(Resource):
    """``shutdown``: POST ``sesame`` stops the server (after answering); listed, as in Californium."""

    def __init__(self, on_shutdown: Callable[[], object]) -> None:
        super().__init__("shutdown")
        self.on_shutdown = on_shutdown

    def post(self, exchange: Exchange) -> Answer:
        if exchange.request.payload != SHUTDOWN_PASSWORD:
            return response(Code.FORBIDDEN)
        exchange.site.reactor.callLater(0.5, self.on_shutdown)
        return text_response(Code.CHANGED, "shutdown")


def plugtest_resources(notify_interval: float, on_shutdown: Callable[[], object]) -> list[Resource]:
    """The ETSI plugtest tree's top-level resources (link attributes as Californium shows them)."""
    seg1 = Text("seg1", "Long path resource seg1", (CT_TEXT, ("title", "Long path resource")))
    seg2 = seg1.add(Text("seg2", "Long path resource seg2", (CT_TEXT, ("title", "Long path resource"))))
    seg2.add(Text("seg3", "Long path resource seg3", (CT_TEXT, ("title", "Long path resource"))))
    path = Path("path", (("ct", "40"), ("title", "Hierarchical link description entry")))
    for index in (1, 2, 3):
        path.add(PathSub(f"sub{index}", (("title", "Hierarchical link description sub-resource"),)))
    return [
        DefaultTest("test", (CT_TEXT, ("title", "Default test resource"))),
        seg1,
        Query("query", (CT_TEXT, ("title", "Resource accepting query parameters"))),
        Separate("separate", attributes=(CT_TEXT, ("title", "Resource which cannot be served immediately and "
                                                            "which cannot be acknowledged in a piggy-backed way"))),
        Large(),
        LargeUpdate(),
        LargeCreate(),
        LargePost(),
        Separate("large-separate", lambda exchange: large_body(),
                 (CT_TEXT, ("rt", "block"), ("sz", str(LARGE_SIZE)),
                  ("title", "Large resource which cannot be served immediately"))),
        Clock("obs", notify_interval),
        Clock("obs-non", notify_interval, confirmable=False),
        Clock("obs-large", notify_interval, padding=LARGE_SIZE),
        Clock("obs-pumping", notify_interval / 10),
        Clock("obs-pumping-non", notify_interval / 10, confirmable=False),
        ObserveReset("obs-reset"),
        LocationQuery("location-query", (("title", "Perform POST transaction with responses containing "
                                                   "several Location-Query options (CON mode)"),)),
        MultiFormat(),
        Text("link1", "link1", (("rt", "Type1 Type2"), ("if", "If1"), ("title", "Link test resource"))),
        Text("link2", "link2", (("rt", "Type2 Type3"), ("if", "If2"), ("title", "Link test resource"))),
        Text("link3", "link3", (("rt", "Type1 Type3"), ("if", "foo"), ("title", "Link test resource"))),
        path,
        Validate(),
        Create(),
        Shutdown(on_shutdown),
    ]
