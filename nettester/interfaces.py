"""Every zope.interface and typing.Protocol of nettester, in one place.

The core (``tap``, ``cli``, ``local``) only talks to protocol modules through
these interfaces, so a new protocol module is a new file under
``nettester/plugins/`` and never an edit of the core.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from nettester.tally import Tally


class IRole(Interface):
    """One sub-command of ``nettester`` / ``twistd nettester``.

    A role is either a long-running service (``keepalive-server``) or a
    one-shot command (``keepalive-report``).
    """

    name = Attribute("Sub-command name, e.g. 'keepalive-server'.")
    summary = Attribute("One line shown in 'nettester --help'.")
    options = Attribute(
        "A nettester.options.RoleOptions subclass: the role's options, each "
        "also read from its environment variable."
    )

    def makeService(reactor, options):
        """Build the role from parsed options, on ``reactor``.

        Returns an ``IService``. When it also provides ``IReportingService``,
        the core prints its summary every stats interval and once more on
        stop, and serves its metrics.
        """


class ICommandRole(IRole):
    """A role that runs once and exits instead of serving."""

    def run(options, stdout):
        """Do the work synchronously, write results to ``stdout``.

        :returns: the process exit status (0 when everything was fine).
        """


class IReportingService(Interface):
    """A service with counters: summarised periodically and exported."""

    metrics = Attribute("The nettester.metrics.MetricSet holding its counters.")

    def summary():
        """An ordered mapping of the counters to print in a summary line.

        Keys are short snake_case names; values are numbers or short strings.
        A provider may also have ``refresh_summary()``, returning a Deferred
        that fires True once ``summary()`` is up to date (the ``--workers`` /
        ``--processes`` parent asks its children first), False when no
        periodic line is due any more; the periodic summary line waits for it.
        """


class ILocalScenario(Interface):
    """What one module contributes to ``nettester local``.

    A server plus a small client fleet, on loopback, started together and
    judged after ``--duration`` seconds.
    """

    name = Attribute("Module name shown in the verdict.")
    service = Attribute(
        "The IService running the server and its clients; providing "
        "IReportingService makes its summary part of the local run's output."
    )

    def verdict():
        """Judge the run once the service has stopped.

        :returns: a :class:`nettester.module.Verdict`.
        """


class IProtocolModule(Interface):
    """A pluggable protocol module, found with ``twisted.plugin.getPlugins``."""

    name = Attribute("Short module name, e.g. 'keepalive'.")
    summary = Attribute("One line describing the module.")
    roles = Attribute("Sequence of IRole providers, in the order to list them.")

    def local_scenario(reactor, options):
        """The module's part of ``nettester local``.

        :param reactor: provides IReactorTCP, IReactorUDP and IReactorTime.
        :param options: the parsed ``local`` options (``duration``, ...).
        :returns: an :class:`ILocalScenario`, or ``None`` when the module has none.
        """


class IDatagramReceiver(Interface):
    """The layer above an IDatagramLink (a CoAP endpoint)."""

    def datagramReceived(data: bytes, peer: Any) -> None:
        """One datagram (plaintext application data) from ``peer``.

        :param peer: an opaque hashable handle, stable for the life of the
            peer's association: the (host, port) tuple on plain UDP, the
            connection on DTLS (so it survives a DTLS CID address change).
        """


class IDatagramReadDescriptor(Interface):
    """A reactor read descriptor on a datagram socket whose ``doRead`` handles its own errors.

    It never returns a disconnect reason, so :mod:`nettester.reactor` calls it
    without Twisted's per-event wrapping (as it does for ``udp.Port``).
    """

    def doRead():
        """Read what is queued (a bounded batch); the descriptor stays open."""


class IDatagramLink(Interface):
    """What a message layer sends through: plain UDP or a DTLS endpoint.

    CoAP runs unchanged over both because it only sees this interface.
    """

    receiver = Attribute("The IDatagramReceiver that gets incoming datagrams.")
    scheme = Attribute("URI scheme served: 'coap' or 'coaps'.")

    def send_datagram(data, peer):
        """Send ``data`` to ``peer`` (a handle given to datagramReceived or
        returned by connect)."""

    def connect(address):
        """Client side: a Deferred firing with the peer handle for
        ``address`` (host, port), once any security handshake is done."""

    def peer_context(peer):
        """The :class:`nettester.link.PeerContext` of ``peer``: its current address
        and its security context (identity, cipher suite, CIDs, node id,
        route). Called only when a resource asks, never per datagram."""


class IConnectionIdGenerator(Interface):
    """Issues DTLS Connection IDs (RFC 9146) for a server.

    In a cluster the first byte is the node id, so any node can tell which
    node owns a CID from the record alone.
    """

    node_id = Attribute("The node id (0..255) encoded in every CID, or None.")
    length = Attribute("Length in bytes of every CID issued (0 disables CID).")

    def new_connection_id(inUse: Container[bytes]) -> bytes:
        """A fresh CID not contained in ``inUse`` (a container of bytes)."""

    def node_id_of(cid: bytes) -> int | None:
        """The node id a CID names, or None when CIDs carry no node id."""


class INodeDiscovery(Interface):
    """Where the other nodes of a DTLS CID cluster are: node id -> management address.

    Static discovery has a fixed table; dynamic and Kubernetes discovery learn
    it with PING/PONG over the management port. The router asks
    ``management_address`` for every forwarded record, so it must be a dict lookup.
    """

    own_node_id = Attribute("This node's id (0..255).")

    def management_address(node_id: int) -> tuple[str, int] | None:
        """The (host, port) management address of node ``node_id``, or None when
        it is unknown (or is this node)."""

    def nodes() -> Mapping[int, tuple[str, int]]:
        """A snapshot mapping of every known other node id -> management address."""

    def add_listener(listener: Callable[[int, tuple[str, int] | None], None]) -> None:
        """Call ``listener(node_id, address)`` for every node known now, then
        whenever a node appears or moves, and ``listener(node_id, None)`` when it leaves."""


class INatTable(Interface):
    """The sans-IO state of the NAT / load-balancer emulator (``nettester nat``).

    Every method takes the time as an argument; nothing reads a clock. Socket
    keys are opaque integers naming one outgoing socket: the adapter opens
    one lazily for a key it has not seen and closes the keys it is told to.
    """

    reverse_update = Attribute("True when backward traffic from another destination moves the entry there.")

    def forward(client, now):
        """Route a datagram from ``client``: a :class:`nettester.nat.table.Route`
        (socket key, destination address, and the key of an entry evicted to
        make room, to close), or None when no destination is usable."""

    def backward(socket_key, source, now):
        """The client address an answer arriving on ``socket_key`` from ``source``
        goes back to, or None when the key is unknown."""

    def expire(now):
        """Remove entries idle longer than the NAT timeout; return their socket keys."""

    def next_deadline():
        """When ``expire`` next has work to do, or None with no entries."""

    def clear(count):
        """Remove ``count`` random entries (all when None); return their socket keys."""

    def reassign(now):
        """New socket key and new random destination for every entry; return
        the old socket keys, to be closed."""

    def rebalance(now):
        """New random destination for every entry, same socket key.

        :returns: (entries whose destination changed, entries in total).
        """

    def add_destination(name, address):
        """Add a destination; False when it is already there."""

    def remove_destination(address):
        """Remove a destination, moving its entries elsewhere; False when unknown."""

    def info():
        """The console's ``info`` lines (entries, reverse mode, each destination's usage)."""


class DatagramCore(Protocol):
    """The one contract of every sans-IO datagram core (aioquic's shape).

    Bytes and the time go in; datagrams, one timer and events come out.
    ``nettester.pump.CorePump`` drives any of them from Twisted. A core
    tolerates ``handle_timer`` being called at or after ``get_timer()``.
    """

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """One datagram from ``addr``."""

    def datagrams_to_send(self) -> Iterable[tuple[bytes, Any]]:
        """What to write now, as ``(datagram, address)`` pairs; each is handed out once."""

    def get_timer(self) -> float | None:
        """When ``handle_timer`` is due next (in the same clock as ``now``), or None."""

    def handle_timer(self, now: float) -> None:
        """The timer fired: retransmit, expire, ping."""

    def next_event(self) -> Any | None:
        """The next event for the layer above, or None when there is none."""


class VersionedTimer(Protocol):
    """What a :class:`DatagramCore` may add so its pump asks for the timer less often.

    ``timer_version`` changes whenever ``get_timer()`` may have come earlier
    (a deadline moving later need not change it: the armed call then fires
    early and re-arms). ``CorePump`` skips ``get_timer()`` while it is
    unchanged and a call is armed.
    """

    timer_version: int


class StreamCore(Protocol):
    """The stream twin of :class:`DatagramCore` (h11's shape): one connection of a stream protocol.

    Bytes read and the time go in; bytes to write, one timer and events come
    out. ``nettester.protocols.keepalive.adapter.CoreProtocol`` drives one from
    a Twisted ``Protocol``. A core tolerates ``handle_timer`` being called at or
    after ``get_timer()``.
    """

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the connection, in order."""

    def data_to_send(self) -> bytes:
        """What to write now; each byte is handed out once."""

    def get_timer(self) -> float | None:
        """When ``handle_timer`` is due next (in the same clock as ``now``), or None."""

    def handle_timer(self, now: float) -> None:
        """The timer fired: send what is due, check deadlines."""

    def next_event(self) -> Any | None:
        """The next event for the adapter, or None when there is none."""


class MergedRun(Protocol):
    """What the parent of a load generator's ``--processes N`` prints: one process's lines, merged.

    ``nettester.supervisor.SupervisorService`` feeds it the children's
    merged :class:`nettester.tally.Tally` and their final results; each load
    generator's options make theirs (``merged_run()``), on the shared ground
    of ``nettester.report.merge.ProcessesRun``. Every line has the shape one
    process prints, so the user sees one run; the children print none of
    these lines (``nettester.workers.run_line``).
    """

    #: Whether the role prints ``<role> summary:`` lines (then :meth:`summary` gives their fields).
    summary_lines: bool
    #: Seconds to the first progress line and between the next ones; 0: the role prints none of its own.
    first_progress: float
    progress_interval: float
    #: The run id the processes share (``NETTESTER_RUN``).
    run_id: str
    #: ``--duration``: this long after it started the parent prints no more progress lines, and
    #: :meth:`duration_over` (0: never).
    duration: float

    def start(self, processes: int) -> None:
        """Print the run's start line (before the processes start, so it comes first)."""

    def duration_over(self) -> None:
        """Print the line one process prints when its ``--duration`` is over, if it prints one."""

    def progress(self, tally: Tally, now: float) -> None:
        """Print one progress line from the children's tallies taken at ``now`` (epoch seconds)."""

    def summary(self, tally: Tally) -> dict[str, Any]:
        """The summary line's fields for the merged ``tally``."""

    def conclude(self, tally: Tally, results: Sequence[Mapping[str, Any]], statuses: Sequence[int]) -> int:
        """The final lines, verdict and ``--report`` of the whole run from the children's final results
        (the report document each would have written and its judged counts); the exit status."""
