"""The twistd plugin: ``twistd -n nettester <role> [options]``."""

from twisted.application.service import ServiceMaker

nettester = ServiceMaker(
    "nettester",
    "nettester.tap",
    "Prove where packets get lost: keep-alive, STUN, CoAP/DTLS testers and servers.",
    "nettester",
)
