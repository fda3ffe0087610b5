"""The ``coap`` module: extended plugtest server, client, benchmark client and receive test."""

from nettester.module import ProtocolModule
from nettester.protocols.coap.roles import ROLES, SUMMARY, local

coap = ProtocolModule(name="coap", summary=SUMMARY, roles=ROLES, local=local)
