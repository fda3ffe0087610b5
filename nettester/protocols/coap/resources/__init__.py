"""Resources of the CoAP server roles: the tree machinery, the ETSI plugtest
resources and the extended server's benchmark / receive-test / context ones."""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime

from nettester.protocols.coap.resources.base import Exchange, PeriodicResource, Resource, Site

__all__ = ["Exchange", "PeriodicResource", "Resource", "Site", "build_site"]


def build_site(reactor: IReactorTime, resources: Iterable[Resource]) -> Site:
    """A site whose root holds ``resources``."""
    site = Site(reactor)
    for resource in resources:
        site.root.add(resource)
    return site
