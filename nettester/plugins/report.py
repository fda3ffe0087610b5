"""The ``report`` module: ``nettester plot`` draws the JSON run reports of the client roles."""

from nettester.module import ProtocolModule
from nettester.report.roles import ROLES, SUMMARY

report = ProtocolModule(name="report", summary=SUMMARY, roles=ROLES)
