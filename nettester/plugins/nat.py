"""The ``nat`` module: a NAT / UDP load-balancer emulator with a console (cf-nat's commands)."""

from nettester.module import ProtocolModule
from nettester.nat.roles import ROLE, SUMMARY, local

nat = ProtocolModule(name="nat", summary=SUMMARY, roles=(ROLE,), local=local)
