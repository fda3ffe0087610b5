"""Resource tree: what a CoAP server role serves through a ``CoapEndpoint``.

A ``Site`` is the endpoint's request handler. It finds the resource by
its Uri-Path (one dictionary lookup on the raw option values), dispatches
by method, answers ``/.well-known/core`` from the tree's link attributes
(RFC 6690 section 4, with filtering), and keeps the observers of observable
resources (RFC 7641): a GET with Observe: 0 registers, every
``Resource.changed`` renders the resource again for each observer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from nettester.addresses import unmapped_host
from nettester.link import PeerContext
from nettester.logs import Logger
from nettester.protocols.coap.exchanges import IncomingRequest, ObserveRelation
from nettester.protocols.coap.linkformat import Link, filter_links, format_links
from nettester.protocols.coap.message import Code, ContentFormat, Message, OptionNumber, Peer, response

if TYPE_CHECKING:
    from nettester.protocols.coap.endpoint import Answer, CoapEndpoint

log = Logger()

WELL_KNOWN_CORE = (b".well-known", b"core")
_METHOD_NAMES = {Code.GET: "get", Code.POST: "post", Code.PUT: "put", Code.DELETE: "delete",
                 Code.FETCH: "fetch", Code.PATCH: "patch", Code.IPATCH: "ipatch"}


class Exchange:
    """One request as a resource sees it: the message, the peer, where it came in.

    Notifications are rendered through an Exchange too (the observer's
    registration request, with no ``incoming`` to answer).
    """

    __slots__ = ("request", "peer", "site", "endpoint", "incoming")

    def __init__(self, request: Message, peer: Peer, site: Site, endpoint: CoapEndpoint,
                 incoming: IncomingRequest | None = None) -> None:
        self.request = request
        self.peer = peer
        self.site = site
        self.endpoint = endpoint
        self.incoming = incoming

    def accept(self) -> None:
        """Send the empty ACK now: the response will be separate (RFC 7252 section 5.2.2)."""
        if self.incoming is not None:
            self.endpoint.accept(self.incoming)

    def peer_context(self) -> PeerContext:
        """The link's view of the peer (address, security context), IPv4 peers of a dual-stack socket unmapped."""
        context = self.endpoint.peer_context(self.peer)
        host = unmapped_host(context.address[0])
        previous = context.previous_address
        if host != context.address[0] or (previous is not None and unmapped_host(previous[0]) != previous[0]):
            context = replace(
                context, address=(host, context.address[1]),
                previous_address=None if previous is None else (unmapped_host(previous[0]), previous[1]),
            )
        return context

    def query(self) -> dict[str, str]:
        """Uri-Query as a dict: ``a=b`` -> {"a": "b"}, a bare ``a`` -> {"a": ""}."""
        pairs: dict[str, str] = {}
        for argument in self.request.uri_query:
            name, _, value = argument.partition("=")
            pairs[name] = value
        return pairs


class Resource:
    """A node of the tree. Override ``get``/``post``/``put``/``delete``.

    ``attributes`` are its RFC 6690 link attributes; ``observable`` resources
    accept observers and notify them on ``changed``, with CON
    notifications unless ``confirmable_notifications`` is False.
    """

    observable = False
    confirmable_notifications = True
    visible = True
    #: True when the answer to a GET is a function of the request's options alone, for the life of the
    #: resource: the layer then answers the next identical plain GET from memory, without calling ``get``.
    static = False

    def __init__(self, name: str, attributes: tuple[tuple[str, str | None], ...] = ()) -> None:
        self.name = name
        self.attributes = attributes
        self.children: dict[str, Resource] = {}
        self.parent: Resource | None = None
        self.observers: list[ObserveRelation] = []
        self._site: Site | None = None

    # -- tree

    def add(self, child: Resource) -> Resource:
        """Attach a child (replacing one of the same name) and return it."""
        child.parent = self
        self.children[child.name] = child
        site = self.site_or_none()
        if site is not None:
            site.tree_changed()
        return child

    def remove(self, name: str) -> None:
        """Detach a child and everything under it; its observers are told 4.04."""
        child = self.children.pop(name, None)
        if child is None:
            return
        site = self.site_or_none()
        for resource in child.walk():
            resource.end_observations(Code.NOT_FOUND)
        if site is not None:
            site.tree_changed()

    def walk(self) -> Iterator[Resource]:
        """This resource and every descendant."""
        yield self
        for child in self.children.values():
            yield from child.walk()

    @property
    def path(self) -> str:
        """``/a/b``."""
        names: list[str] = []
        node: Resource | None = self
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(names))

    def site_or_none(self) -> Site | None:
        """The site this resource is part of, None while detached."""
        node: Resource | None = self
        while node is not None:
            if node._site is not None:
                return node._site
            node = node.parent
        return None

    @property
    def site(self) -> Site:
        """The site this resource is part of."""
        site = self.site_or_none()
        if site is None:
            raise RuntimeError(f"{self.path} is not part of a site")
        return site

    def link(self) -> Link:
        """This resource's link for ``/.well-known/core``."""
        attributes = self.attributes
        if self.observable and not any(name == "obs" for name, _ in attributes):
            attributes = attributes + (("obs", None),)
        return Link(self.path, attributes)

    # -- methods (RFC 7252 section 5.8)

    def get(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    def post(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    def put(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    def delete(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    def fetch(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    def patch(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    def ipatch(self, exchange: Exchange) -> Answer:
        return response(Code.METHOD_NOT_ALLOWED)

    # -- observe (RFC 7641)

    def changed(self) -> None:
        """The state changed: render a notification for every observer."""
        if not self.observers:
            return
        site = self.site
        for relation in list(self.observers):
            if not relation.active:
                continue
            answer = self.get(Exchange(relation.request, relation.peer, site, site.endpoint_of(relation)))
            if not isinstance(answer, Message):
                raise TypeError(f"{self.path}: notifications need a synchronous GET")
            site.notify(self, relation, answer)

    def end_observations(self, code: int) -> None:
        """Tell every observer the resource is gone (RFC 7641 section 3.2: a non-2.xx ends it)."""
        site = self.site_or_none()
        for relation in list(self.observers):
            if site is not None and relation.active:
                site.notify(self, relation, response(code))
        self.observers.clear()
        self.observer_count_changed()

    def drop_observations(self) -> None:
        """Forget every observer without telling it (Californium's obs-reset): the
        observer notices when the last notification's Max-Age runs out."""
        site = self.site_or_none()
        for relation in list(self.observers):
            if site is not None and relation.active:
                site.endpoint_of(relation).cancel_relation(relation, "reset by the server")
        self.observers.clear()
        self.observer_count_changed()

    def observer_count_changed(self) -> None:
        """Hook: the number of observers changed (start or stop a periodic source)."""

    def close(self) -> None:
        """The server stops: forget the observers without telling them."""
        self.observers.clear()
        self.observer_count_changed()


class PeriodicResource(Resource):
    """An observable resource that changes every ``interval`` while observed."""

    observable = True

    def __init__(self, name: str, interval: float, attributes: tuple[tuple[str, str | None], ...] = ()) -> None:
        super().__init__(name, attributes)
        self.interval = interval
        self._ticker: LoopingCall | None = None

    def tick(self) -> None:
        """Advance the state; the default only notifies."""
        self.changed()

    def observer_count_changed(self) -> None:
        if self.observers and self._ticker is None:
            self._ticker = LoopingCall(self.tick)
            self._ticker.clock = self.site.reactor
            self._ticker.start(self.interval, now=False)
        elif not self.observers and self._ticker is not None:
            self._ticker.stop()
            self._ticker = None


class SiteHandler:
    """The RequestHandler of one endpoint serving a (shared) Site."""

    __slots__ = ("site", "endpoint")

    def __init__(self, site: Site, endpoint: CoapEndpoint) -> None:
        self.site = site
        self.endpoint = endpoint

    def handle_request(self, incoming: IncomingRequest) -> Answer:
        return self.site.handle_request(incoming, self.endpoint)

    def observe_cancelled(self, relation: ObserveRelation, reason: str) -> None:
        self.site.observe_cancelled(relation)


class Site:
    """A resource tree, served by one or more endpoints (several ports, coap and coaps)."""

    def __init__(self, reactor: IReactorTime, root: Resource | None = None) -> None:
        self.reactor = reactor
        self.root = root or Resource("")
        self.root._site = self
        self._routes: dict[tuple[bytes, ...], Resource] = {}
        self._observed: dict[ObserveRelation, tuple[Resource, CoapEndpoint]] = {}
        self._endpoints: list[CoapEndpoint] = []
        self.tree_changed()

    def attach(self, endpoint: CoapEndpoint) -> None:
        """Serve this tree through ``endpoint`` too."""
        endpoint.handler = SiteHandler(self, endpoint)
        self._endpoints.append(endpoint)

    def close(self) -> None:
        """Stop every periodic source and forget every observer (the server stops)."""
        for resource in self.root.walk():
            resource.close()
        self._observed.clear()

    def endpoint_of(self, relation: ObserveRelation) -> CoapEndpoint:
        """The endpoint an observer registered through."""
        return self._observed[relation][1]

    def tree_changed(self) -> None:
        """Rebuild the path index (resources were added or removed)."""
        routes: dict[tuple[bytes, ...], Resource] = {}
        for resource in self.root.walk():
            key = tuple(segment.encode() for segment in resource.path.split("/") if segment)
            routes[key] = resource
        self._routes = routes
        for endpoint in self._endpoints:
            endpoint.core.static_answers.clear()  # a static answer may be of a resource now gone

    def find(self, path: str) -> Resource | None:
        """The resource at ``/a/b``, or None."""
        return self._routes.get(tuple(segment.encode() for segment in path.split("/") if segment))

    # -- serving

    def handle_request(self, incoming: IncomingRequest, endpoint: CoapEndpoint) -> Answer:
        """Find the resource and let it answer (see ``SiteHandler``)."""
        request = incoming.request
        options = request.options
        if options and options[-1][0] >= OptionNumber.PROXY_URI and (
            request.has_option(OptionNumber.PROXY_URI) or request.has_option(OptionNumber.PROXY_SCHEME)
        ):
            # RFC 7252 section 5.7.2: this server is no forward proxy.
            return response(Code.PROXYING_NOT_SUPPORTED)
        key = tuple([value for number, value in options if number == OptionNumber.URI_PATH])
        resource = self._routes.get(key)
        if resource is None:
            if key == WELL_KNOWN_CORE:
                return self._well_known_core(request)
            return response(Code.NOT_FOUND)
        method = _METHOD_NAMES.get(request.code)
        if method is None:
            return response(Code.METHOD_NOT_ALLOWED)
        exchange = Exchange(request, incoming.peer, self, endpoint, incoming)
        incoming.static = resource.static and method == "get"
        answer = getattr(resource, method)(exchange)
        accept = incoming.accept
        if accept is not None and isinstance(answer, Message) and answer.payload and answer.code >> 5 == 2:
            content_format = answer.content_format
            if (content_format if content_format is not None else ContentFormat.OCTET_STREAM) != accept:
                # RFC 7252 section 5.10.4: the wanted format cannot be returned.
                return response(Code.NOT_ACCEPTABLE)
        if incoming.observe == 0 and resource.observable and request.code == Code.GET:
            if isinstance(answer, Message):
                self._register(resource, endpoint, incoming, answer)
                return None
            if isinstance(answer, defer.Deferred):
                answer.addCallback(self._register_later, resource, endpoint, incoming)
        return answer

    def observe_cancelled(self, relation: ObserveRelation) -> None:
        """Forget an observer the endpoint dropped (reset, timeout, deregistration)."""
        found = self._observed.pop(relation, None)
        if found is not None and relation in found[0].observers:
            found[0].observers.remove(relation)
            found[0].observer_count_changed()

    # -- observe bookkeeping

    def _register(self, resource: Resource, endpoint: CoapEndpoint, incoming: IncomingRequest,
                  answer: Message) -> None:
        if answer.code >> 5 == 2:
            answer.set_option(OptionNumber.OBSERVE, b"")
        relation = endpoint.respond(incoming, answer)
        if relation is not None:
            self._observed[relation] = (resource, endpoint)
            resource.observers.append(relation)
            resource.observer_count_changed()

    def _register_later(self, answer: Message, resource: Resource, endpoint: CoapEndpoint,
                        incoming: IncomingRequest) -> None:
        if not incoming.answered:
            self._register(resource, endpoint, incoming, answer)
        return None

    def notify(self, resource: Resource, relation: ObserveRelation, answer: Message) -> None:
        """Send one notification (a non-2.xx one ends the relation, RFC 7641 section 3.2)."""
        self.endpoint_of(relation).notify(relation, answer, resource.confirmable_notifications)

    # -- /.well-known/core

    def _well_known_core(self, request: Message) -> Message:
        """RFC 6690 section 4: every visible resource, filtered by the query."""
        if request.code != Code.GET:
            return response(Code.METHOD_NOT_ALLOWED)
        links = [resource.link() for resource in self.root.walk() if resource is not self.root and resource.visible]
        links = filter_links(links, request.uri_query)
        return response(Code.CONTENT, format_links(links).encode(), ContentFormat.LINK_FORMAT)
