"""A cluster node run by N worker processes (``coap-server --workers N``): one node to its peers.

Every worker binds the node's DTLS port and its management port with
``SO_REUSEPORT`` and runs the whole stack of ``nettester.cluster.node``: a CID
router, a management endpoint and, with a group secret outside static mode,
the replication. Worker ``w`` of node ``n`` issues CIDs ``n, w, random...``
(``nettester.protocols.dtls.cid``), and the kernel delivers each datagram to
the worker it concerns, with no user-space hop inside the host
(``nettester.steering``):

- on the DTLS port, a ``tls12_cid`` record goes to worker ``CID byte 1 mod N``;
- on the management port, an IN record (another node forwarding one of our
  CIDs' records) goes to the worker named by the CID of the record inside it,
  and a STATE record (a replica) to the worker named by its CID, which it
  carries in the clear for that purpose (``nettester.cluster.wire``). The
  worker that holds a replica is therefore the one the kernel sends the
  session's records to once it takes the session over, from the DTLS port or
  forwarded: both programs take the worker byte modulo N, so a session
  replicated from a node with more (or fewer) workers is adopted by worker
  ``byte mod N`` and stays there;
- PING and PONG go to worker 0, the discovery worker;
- everything else (handshakes, OUT records, garbage) follows the kernel's
  4-tuple hash. An OUT record is an answer to send from the public socket,
  which any worker can do; since the hash keys on the sender's address, the
  OUT records from one peer node all reach one worker (a send each, no DTLS
  work).

Discovery (dynamic and Kubernetes mode). PING and PONG must reach one table:
the hash sends every datagram from a peer's management address to one
worker, so N tables would each see a part of the PONGs, and a node pinging
from N workers would show up with N timestamp sequences (``replay`` drops at
its peers). So only worker 0 runs the ``NodeTable`` (and the Kubernetes pod
listing), pings, and answers; its peers see the node once, at the shared
management address. It shares the table (:data:`NODES_KEY`, each change, and
whether the pods were listed) with its siblings through the parent
(``nettester.workers.WorkerContext``), whose :class:`SharedDiscovery` gives
their routers the same node changes, failover included, as worker 0's own.
The parent keeps the last table: a sibling started later, or again, starts
from it, and so does a restarted worker 0 (:class:`DiscoverySharing` seeds
its table with it, ``NodeTable.remember``, and shares nothing before: a
fresh table shared at once would tell the siblings that every node it has
not heard from yet is gone, and their routers would hand those nodes'
sessions to a successor). While worker 0 is down, PING and PONG fall to the
hash and the worker that gets them drops them (``ping_on_sibling_worker``);
a restart takes far less than the 10 s of silence after which a peer
removes the node.

Limits: a worker that dies loses its sessions (they live in its memory). With
replication on, a record of one of them that reaches the restarted worker
straight from its client is forwarded to the backup node holding the replica
(``AskBackup``, as for a restarted node), whose worker ``byte 1 mod N``
adopts the session; one that another node forwards to it is dropped, as a
restarted node does. Without replication their clients need a new handshake.
Records for a worker that is down fall to the hash meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from zope.interface import implementer

from nettester.cluster.discovery import DynamicDiscovery
from nettester.cluster.nodes import MAX_NODE_ID, NodeListeners
from nettester.interfaces import INodeDiscovery
from nettester.logs import Logger
from nettester.workers import WorkerContext

log = Logger()

Address = tuple[str, int]
NODES_KEY = "cluster_nodes"  # the WorkerContext key worker 0 shares its node table under


def encode_nodes(nodes: Mapping[int, Address], ready: bool) -> dict[str, Any]:
    """The shared form of a node table (JSON): ``{"nodes": [[id, host, port], ...], "ready": bool}``."""
    return {"nodes": [[node_id, host, port] for node_id, (host, port) in sorted(nodes.items())], "ready": ready}


def decode_nodes(value: Any) -> tuple[dict[int, Address], bool]:
    """The node table and readiness of :func:`encode_nodes`' form.

    :raises ValueError: saying what is wrong with it.
    """
    if not isinstance(value, dict) or not isinstance(value.get("nodes"), list):
        raise ValueError(f"not a shared node table: {value!r:.80}")
    nodes: dict[int, Address] = {}
    for entry in value["nodes"]:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ValueError(f"a node entry is not [id, host, port]: {entry!r:.80}")
        node_id, host, port = entry
        if not (isinstance(node_id, int) and 0 <= node_id <= MAX_NODE_ID and isinstance(host, str)
                and isinstance(port, int) and 0 < port < 65536):
            raise ValueError(f"a node entry is not [id, host, port]: {entry!r:.80}")
        nodes[node_id] = (host, port)
    return nodes, value.get("ready") is True


@implementer(INodeDiscovery)
class SharedDiscovery(NodeListeners):
    """A sibling worker's discovery: the node table worker 0 runs, as it shares it (see the module docstring).

    ``ready``: worker 0 was ready when it shared the table last (in
    Kubernetes: the pods were listed); False before the first table.
    """

    def __init__(self, own_node_id: int) -> None:
        super().__init__()
        self.own_node_id = own_node_id
        self._nodes: dict[int, Address] = {}
        self.ready = False

    def management_address(self, node_id: int) -> Address | None:
        return self._nodes.get(node_id)

    def nodes(self) -> dict[int, Address]:
        return dict(self._nodes)

    def received(self, value: Any) -> None:
        """A table worker 0 shared (None: it shared none yet); the listeners hear what changed."""
        if value is None:
            return
        try:
            nodes, ready = decode_nodes(value)
        except ValueError as error:
            log.warn("Cluster node {node}: unusable node table from the discovery worker ignored: {error}",
                     event="cluster_bad_shared_table", node=self.own_node_id, error=error)
            return
        nodes.pop(self.own_node_id, None)
        previous, self._nodes = self._nodes, nodes
        self.ready = ready
        for node_id in previous.keys() - nodes.keys():
            self._notify(node_id, None)
        for node_id, address in nodes.items():
            if previous.get(node_id) != address:
                self._notify(node_id, address)


class DiscoverySharing:
    """Worker 0's side: starts its table from the parent's kept copy, then shares every change.

    ``ready()``: whether the node is ready (``ClusterNodeService.is_ready``),
    shared with the table; call :meth:`publish` when it changes.
    """

    def __init__(self, workers: WorkerContext, discovery: DynamicDiscovery, ready: Callable[[], bool]) -> None:
        self._workers = workers
        self._discovery = discovery
        self._ready = ready
        self._synced = False  # the parent's kept copy is in: changes may be shared
        discovery.add_listener(self._changed)
        workers.on_shared(NODES_KEY, self._kept)

    def _kept(self, value: Any) -> None:
        if self._synced:
            return  # only the parent's first message is for us: nobody else shares this key
        if value is not None:
            try:
                nodes, _ = decode_nodes(value)
            except ValueError as error:
                log.warn("Cluster node {node}: the kept node table is unusable, starting afresh: {error}",
                         event="cluster_bad_shared_table", node=self._discovery.own_node_id, error=error)
                nodes = {}
            self._discovery.remember(nodes)
        self._synced = True
        self.publish()

    def _changed(self, node_id: int, address: Address | None) -> None:
        if self._synced:
            self.publish()

    def publish(self) -> None:
        if self._synced:
            self._workers.share(NODES_KEY, encode_nodes(self._discovery.nodes(), self._ready()))
