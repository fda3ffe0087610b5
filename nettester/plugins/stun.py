"""The ``stun`` module: RFC 8489 server (with RFC 5780), the many-client loss tester and its report."""

from nettester.module import ProtocolModule
from nettester.protocols.stun.roles import ROLES, SUMMARY, local

stun = ProtocolModule(name="stun", summary=SUMMARY, roles=ROLES, local=local)
