"""The twistd plugins: ``twistd -n nettester <role> [options]``, and the nettester-epoll reactor."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

nettester = ServiceMaker(
    "nettester",
    "nettester.tap",
    "Prove where packets get lost: keep-alive, STUN, CoAP/DTLS testers and servers.",
    "nettester",
)

# ``twistd --reactor nettester-epoll -n nettester <role>``: the reactor ``nettester`` installs on Linux.
nettester_epoll = Reactor(
    "nettester-epoll",
    "nettester.reactor",
    "epoll, reading datagram sockets without Twisted's per-event logging context (Linux)",
)
