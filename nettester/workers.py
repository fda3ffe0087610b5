"""``--workers N`` for servers and ``--processes N`` for load generators: one role, N processes.

The parent re-executes the same role (``python -m nettester <role> <its
arguments>``) N times. A child learns it is worker ``i`` of ``N`` from the
environment (``NETTESTER_WORKER=i/N``): a server worker opens its ports with
``SO_REUSEPORT`` (so all N share each port, see ``nettester.supervisor``), a
load-generator process runs its share of ``--clients``, numbered as in one
process (its first client is ``first_client``) and prints no line about the
whole run (``nettester.report.merge.RunLine``). Each child reports its summary counters, metric
samples and (a load generator) its ``nettester.tally.Tally`` to the parent
as JSON lines on descriptor 3; the parent prints the merged lines, serves
the merged ``/metrics`` and restarts a worker that dies.

What the workers must share comes from the parent too: the HelloVerifyRequest
cookie secret (``NETTESTER_COOKIE_SECRET``, hex), so a ClientHello answered
by one worker may come back to another; the PSK store and the cluster
identity come from the same arguments and environment in every child. State
that changes while they run (a cluster node's table of live nodes) goes from
one worker to the others through the parent (:class:`WorkerContext`). The
processes of a load generator share one run id (``NETTESTER_RUN``), which
keep-alive connection ids carry.

This module is Twisted-free (options classes import it); the process
management is ``nettester.supervisor``.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.python import usage

from nettester.steering import ProgramFactory

if TYPE_CHECKING:
    from nettester.interfaces import MergedRun

WORKER_ENV = "NETTESTER_WORKER"  # "index/count" in a child
COOKIE_SECRET_ENV = "NETTESTER_COOKIE_SECRET"  # hex, set by the parent of server workers
RUN_ENV = "NETTESTER_RUN"  # hex, set by the parent of load generators: the run id they share
REPORT_FD = 3  # a child writes its JSON report lines here


def worker_count(value: str) -> int:
    """``--workers`` / ``--processes``: a whole number of at least 1, or ``auto`` (one per usable core)."""
    if value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"expected a whole number of at least 1 or 'auto', got {value!r}")
    return count


worker_count.coerceDoc = "A number of processes, or 'auto' (one per core)."  # type: ignore[attr-defined]


def current_worker(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """``(index, count)`` in a worker child, None in a parent or a process on its own."""
    raw = environ.get(WORKER_ENV)
    if not raw:
        return None
    index, _, count = raw.partition("/")
    return int(index), int(count)


def worker_index(environ: Mapping[str, str] = os.environ) -> int | None:
    """This server worker's index (what the CID's byte 1 carries), None outside ``--workers``."""
    worker = current_worker(environ)
    return worker[0] if worker is not None else None


def shared_cookie_secret(environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The HelloVerifyRequest secret every worker shares, None outside ``--workers``."""
    raw = environ.get(COOKIE_SECRET_ENV)
    return bytes.fromhex(raw) if raw else None


def shared_run_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The run id every process of a ``--processes`` run shares, None in a process on its own."""
    return environ.get(RUN_ENV) or None


def report_line(message: Mapping[str, Any], fd: int = REPORT_FD) -> bool:
    """Write one JSON line to the parent (a child's descriptor 3), whole; False when the parent is gone."""
    data = (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


def share(total: int, index: int, count: int) -> int:
    """Process ``index``'s part of ``total`` split over ``count`` (the first ones take the remainder)."""
    return total // count + (1 if index < total % count else 0)


SharedListener = Callable[[Any], None]


class WorkerContext:
    """What a server worker's role may use of ``--workers`` beyond its shared ports.

    ``index`` and ``count``: this worker and how many there are.
    ``share(key, value)``: hand a JSON value to the sibling workers; the
    parent keeps the last value of each key for the workers it starts later
    (a restarted one too). ``on_shared(key, listener)``: ``listener(value)``
    for each value the siblings share under ``key``; its first call comes
    with the parent's first message, with the value the parent kept or None,
    so a role can tell "nothing yet" from "not heard yet". ``steer_with(sock,
    factory)``: steer the reuseport group of ``sock`` with ``factory(slots)``
    instead of the DTLS port's program (``nettester.steering``). Built by
    ``nettester.supervisor.WorkerChildService``.
    """

    def __init__(self, index: int, count: int, publish: Callable[[str, Any], None],
                 steer_with: Callable[[socket.socket, ProgramFactory], None]) -> None:
        self.index = index
        self.count = count
        self._publish = publish
        self.steer_with = steer_with
        self._listeners: dict[str, list[SharedListener]] = {}
        self._values: dict[str, Any] | None = None  # None until the parent's first message

    def share(self, key: str, value: Any) -> None:
        self._publish(key, value)

    def on_shared(self, key: str, listener: SharedListener) -> None:
        self._listeners.setdefault(key, []).append(listener)
        if self._values is not None:
            listener(self._values.get(key))

    def shared_received(self, values: Mapping[str, Any]) -> None:
        """A ``shared`` line from the parent: its kept values first, then each update."""
        first = self._values is None
        self._values = {**(self._values or {}), **values}
        for key, listeners in self._listeners.items():
            if first or key in values:
                for listener in listeners:
                    listener(self._values.get(key))


class _MultiProcessOptions:
    """What both mixins share: the role's own argument list, kept for re-executing it."""

    process_option: ClassVar[str]
    #: Summary fields that are a live level, not a running total: a dead
    #: worker's last value is dropped instead of kept.
    live_fields: ClassVar[frozenset[str]] = frozenset({"open", "observers", "dtls_connections", "replicas"})
    #: Summary fields every worker reports alike (a cluster node's count of
    #: other nodes): merged once, not added up.
    agreed_fields: ClassVar[frozenset[str]] = frozenset({"nodes"})
    role_argv: list[str]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """Parse as usual (``postOptions`` included), then check and apply the process count.

        Done here, not in ``postOptions``: a role's options class overrides
        that without always calling up the chain.
        """
        import sys

        self.role_argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)  # type: ignore[misc]
        self.check_processes()

    def check_processes(self) -> None:
        """Raise UsageError for a process count these options cannot use; adapt a child's options."""

    def process_count(self) -> int:
        return int(self[self.process_option])  # type: ignore[index]


class WorkersOptionsMixin(_MultiProcessOptions):
    """``--workers N|auto`` for a server role: N processes share its ports (list it first in the bases)."""

    process_option = "workers"
    optParameters: ClassVar[list[list[Any]]] = [
        ["workers", None, 1, "Server processes sharing each port with SO_REUSEPORT ('auto': one per core); DTLS "
         "records with a Connection ID are steered in the kernel to the worker that owns the session.",
         worker_count],
    ]
    envVars: ClassVar[dict[str, str]] = {"workers": "NETTESTER_WORKERS"}

    def check_processes(self) -> None:
        if self.process_count() > 1 and current_worker() is None:
            if self.get("port", None) == 0:  # type: ignore[attr-defined]
                raise usage.UsageError("--workers needs a fixed --port: every worker must bind the same one")
            cluster = self.get("cluster", None)  # type: ignore[attr-defined]
            if cluster is not None and 0 in (cluster.dtls_address[1], cluster.management_address[1]):
                raise usage.UsageError("--workers needs fixed ports in the cluster option: give its DTLS and "
                                       "management interfaces a port other than 0 (every worker binds the same)")


class ProcessesOptionsMixin(_MultiProcessOptions):
    """``--processes N|auto`` for a load generator: its ``--clients`` split over N processes (list it first).

    In a child, ``clients`` is its share and ``first_client`` the number its
    first client has in the whole run, so a client keeps one number in every
    line (``Client 7: ...``) however many processes there are.
    """

    process_option = "processes"
    #: The options divided among the processes.
    split_options: ClassVar[tuple[str, ...]] = ("clients",)
    optParameters: ClassVar[list[list[Any]]] = [
        ["processes", None, 1, "Split --clients over this many processes ('auto': one per core); the lines "
         "printed are one process's, merged.", worker_count],
    ]
    first_client: int = 0

    def check_processes(self) -> None:
        count = self.process_count()
        for name in self.split_options:
            if self[name] < count:  # type: ignore[index]
                raise usage.UsageError(f"--processes {count} needs at least {count} --{name}, got {self[name]}")  # type: ignore[index]
        worker = current_worker()
        if worker is not None:
            index, workers = worker
            clients: int = self["clients"]  # type: ignore[index]
            self.first_client = sum(share(clients, earlier, workers) for earlier in range(index))
            for name in self.split_options:
                self[name] = share(self[name], *worker)  # type: ignore[index]

    def merged_run(self) -> MergedRun:
        """What the parent prints for the whole run: each load generator's options make their own."""
        raise NotImplementedError(f"{type(self).__name__} does not say what its --processes parent prints")


# A server's summary fields that are statistics of a distribution, not counts:
# merged as the worst worker (an upper bound of the merged percentile, loss or
# mean), ``min`` ones as the best. (Load generators merge their tallies
# instead, see ``nettester.tally``.)
_STATISTIC = re.compile(r"(^|_)(p\d+(\.\d+)?|pct|avg|mean|max|lag)(_|$)")
_MINIMUM = re.compile(r"(^|_)min(_|$)")
_IDENTITY = re.compile(r"(^|_)id$")  # node_id: the same in every worker, not a count


def merge_summaries(parts: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]] = (),
                    live_fields: frozenset[str] = frozenset(),
                    agreed_fields: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One summary from the server workers' ``parts`` (running totals, dead workers' last ones included).

    Counts add up; fields in ``live_fields`` add up over ``live`` only (the
    workers running now); fields in ``agreed_fields`` are the largest value
    of the live workers (of every part once none runs): each worker reports
    the same, one that lags a moment behind the others counts less (a
    sibling that has not heard of a new node yet); identities (``node_id``)
    and text fields that agree are kept, others listed; statistics
    (percentiles, ``_pct``, ``_avg``, ``_max``) take the worst worker,
    ``_min`` the best. Field order is the first part's.
    """
    merged: dict[str, Any] = {}
    values: dict[str, list[Any]] = {}
    for part in parts:
        for key, value in part.items():
            values.setdefault(key, []).append(value)
    live_values: dict[str, list[Any]] = {}
    for part in live:
        for key, value in part.items():
            live_values.setdefault(key, []).append(value)
    for key, seen in values.items():
        if key in live_fields:
            merged[key] = sum(live_values.get(key, []))
        elif key in agreed_fields:
            merged[key] = max(live_values.get(key) or seen)
        elif not _IDENTITY.search(key) and all(
                isinstance(value, (int, float)) and not isinstance(value, bool) for value in seen):
            if _MINIMUM.search(key):
                merged[key] = min(seen)
            elif _STATISTIC.search(key):
                merged[key] = max(seen)
            elif any(isinstance(value, float) for value in seen):
                merged[key] = round(sum(seen), 3)  # a rate: no float noise in the line (15416.599999999999)
            else:
                merged[key] = sum(seen)
        else:
            distinct = list(dict.fromkeys(seen))
            merged[key] = distinct[0] if len(distinct) == 1 else ",".join(str(value) for value in distinct)
    return merged


MetricSample = tuple[str, dict[str, str], float]
MetricFamily = tuple[str, str, str, list[MetricSample]]  # name, type, help, samples


def metric_families(collector: Any) -> list[MetricFamily]:
    """A Prometheus collector's families as plain tuples (JSON-able), as a scrape would see them."""
    return [
        (family.name, family.type, family.documentation,
         [(sample.name, dict(sample.labels), sample.value) for sample in family.samples])
        for family in collector.collect()
    ]


def prometheus_families(families: Iterable[Sequence[Any]]) -> list[Any]:
    """Plain families (:data:`MetricFamily`, or their JSON lists) as ``prometheus_client`` metrics."""
    from prometheus_client.core import Metric

    metrics = []
    for name, kind, help_text, samples in families:
        family = Metric(name, help_text, kind)
        for sample_name, labels, value in samples:
            family.add_sample(sample_name, dict(labels), value)
        metrics.append(family)
    return metrics


def merge_metric_families(parts: Iterable[Sequence[Sequence[Any]]], live: Iterable[Sequence[Sequence[Any]]] = ()
                          ) -> list[MetricFamily]:
    """Metric families of one shape (the workers', or a process's DTLS endpoints') summed sample by sample.

    Counters add up over ``parts`` (dead workers' last values included, so
    they stay monotonic); gauges over ``live`` only (pass the same list
    twice when every part is live). Labelled samples add up label by label.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}

    def add(family: Sequence[Any]) -> None:
        name, kind, help_text, samples = family
        _, _, sums = families.setdefault(name, (kind, help_text, {}))
        for sample_name, labels, value in samples:
            key = (sample_name, tuple(sorted(labels.items())))
            sums[key] = sums.get(key, 0.0) + value

    for part in parts:
        for family in part:
            if family[1] != "gauge":
                add(family)
    for part in live:
        for family in part:
            if family[1] == "gauge":
                add(family)
    return [
        (name, kind, help_text, [(sample, dict(labels), value) for (sample, labels), value in sums.items()])
        for name, (kind, help_text, sums) in families.items()
    ]


def merge_exit_statuses(statuses: Sequence[int]) -> int:
    """The load generators' exit status: theirs when they agree, else 1 (some requests failed)."""
    distinct = set(statuses)
    return distinct.pop() if len(distinct) == 1 else 1
