"""The ``local`` role: every module's loopback scenario at once, found like any other module."""

from nettester.local import local

__all__ = ["local"]
