"""The ``keepalive`` module: TCP/TLS keep-alive server, client fleet and report."""

from nettester.module import ProtocolModule
from nettester.protocols.keepalive.roles import ROLES, SUMMARY, local

keepalive = ProtocolModule(name="keepalive", summary=SUMMARY, roles=ROLES, local=local)
