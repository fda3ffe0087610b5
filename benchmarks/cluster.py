"""What forwarding costs in the DTLS CID cluster: coaps ``coap-bench`` through ``nettester nat``.

Four processes, each the real role: two ``coap-server`` nodes in a static
cluster (management records authenticated, as k8s/coap-cluster.yaml runs
them), ``nettester nat`` in front, and ``coap-bench`` (PSK, CID, closed loop,
CON GET ``benchmark?rlen=40``) through the NAT. Two runs of the same load:

- direct: the NAT sends every record to node 1, which owns every session;
- forwarded: the clients shake hands with node 1, then the NAT's console moves
  them all to node 2 (``add`` node 2, ``remove`` node 1), so every record
  reaches node 2, whose CID router forwards it to node 1 (an IN record), and
  node 1's answer goes back through node 2 (an OUT record).

After a warm-up the bench's progress lines (one a second) give the requests
answered in the measuring window, and /proc gives the CPU time both node
processes used in it. On a shared machine the wall-clock rate moves with the
neighbours' load, the CPU time per request does not, so the forwarding cost
is read as extra node CPU microseconds per request. One result line:

``cluster forwarding: direct N us/req (R req/s), forwarded M us/req (S req/s): +X us/req (+P %), throughput ratio T``

and where the extra CPU goes: the owner's us/req (against its direct figure) and the relaying node's.

    python3 benchmarks/cluster.py
    python3 benchmarks/cluster.py --clients 20 --seconds 10 --no-secret --no-backward

With ``--no-backward`` node 1 answers from its own public address; the NAT
still delivers those answers (and counts them as from another destination).
``--reverse`` adds the NAT's reverse address update (``nettester nat -r``):
node 1's first direct answer moves the client's NAT entry to node 1, so only
the first record of each client is forwarded (what Californium's README
suggests against the forwarding cost); it measures that setup, not forwarding.

``--relay-only`` measures the relaying node alone, without coap-bench, the NAT
and DTLS around it: one real ``coap-server`` node 2, and this script playing
both the clients (``tls12_cid`` records whose CID names node 1) and node 1
(it answers every IN record with an OUT record, MAC included), closed loop
with ``--in-flight`` records outstanding. One result line:

``relaying node (with MAC, answers backward, 2 in flight): U user + K kernel = T us/req (R req/s)``

``--failover`` measures what the clients of a lost node see: three dynamic
nodes with a secret (so they replicate their sessions), ``nettester nat
--tlb 3000`` in front of all three, and ``coap-bench`` through it; the node
holding the most sessions is killed with SIGKILL ``--kill-after`` seconds
into the run. The nodes log JSON;
their summaries give the sessions the killed node held and the handshakes, their
``cluster_takeover`` lines when each session was taken over. One result line:

``cluster fail-over (...): node N killed (SIGKILL) holding S sessions: T taken over A to B s later,
H new handshakes; bench: ...`` (one line)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from harness import ROOT, free_udp_ports, process_cpu_seconds

PROGRESS = re.compile(r"^(\d+) requests \(")
TOTAL = re.compile(r"^\d+ requests in ")
PATH = "benchmark?rlen=40"
NODE_OPTIONS = ("--interfaces", "127.0.0.1", "--port", "0", "--no-plugtest", "--dtls-only", "--benchmark",
                "--psk-sandbox")
QUIET = ("--log-level", "warn", "--stats-interval", "3600")


def cpu_seconds(pids: list[int]) -> list[tuple[float, float]]:
    """(user, system) CPU time of each of these processes so far."""
    return [process_cpu_seconds(pid) for pid in pids]


def nettester(*arguments: str, stdin: int | None = subprocess.DEVNULL,
              stdout: int | IO[str] | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "nettester", *arguments], cwd=ROOT, stdin=stdin, stdout=stdout,
                            text=True)


def coap_bench(nat_port: int, clients: int, *options: str) -> subprocess.Popen[str]:
    """coaps ``coap-bench`` through the NAT, one progress line a second on its stdout."""
    return nettester("coap-bench", "--psk-sandbox", "--clients", str(clients), *options, "--report-interval", "1",
                     "--log-level", "warn", f"coaps://127.0.0.1:{nat_port}/{PATH}", stdout=subprocess.PIPE)


def stop(*processes: subprocess.Popen[str] | None) -> None:
    """SIGTERM every process still running, then wait for all of them."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        if process is not None:
            process.wait(timeout=30)


def setup(args: argparse.Namespace) -> str:
    """How the nodes ran, for the result line: MAC or not, how the owner answers."""
    mac = "without MAC" if args.no_secret else "with MAC"
    if args.reverse:
        return f"{mac}, answers direct, NAT reverse update"
    return f"{mac}, answers direct" if args.no_backward else f"{mac}, answers backward"


@dataclass(frozen=True)
class Measured:
    """One run's window; ``per_node`` is each node's (user, system) CPU seconds, node 1 first."""

    requests: int
    seconds: float
    per_node: list[tuple[float, float]]
    errors_line: str

    @property
    def node_user(self) -> float:
        return sum(user for user, _ in self.per_node)

    @property
    def node_system(self) -> float:
        return sum(system for _, system in self.per_node)

    @property
    def node_cpu(self) -> float:
        return self.node_user + self.node_system

    @property
    def us_per_request(self) -> float:
        return self.node_cpu * 1e6 / max(self.requests, 1)

    @property
    def system_us_per_request(self) -> float:
        """The kernel's share (sockets, loopback delivery)."""
        return self.node_system * 1e6 / max(self.requests, 1)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def node_us_per_request(self, index: int) -> tuple[float, float]:
        """(user, kernel) microseconds per request of one node."""
        user, system = self.per_node[index]
        return user * 1e6 / max(self.requests, 1), system * 1e6 / max(self.requests, 1)


def run(forwarded: bool, args: argparse.Namespace) -> Measured:
    """One run; the requests answered and the node CPU used in the measuring window."""
    public1, public2, management1, management2, nat_port = free_udp_ports(5)
    secret = [] if args.no_secret else ["--dtls-cluster-group-security", "benchmark secret"]
    backward = ["--no-dtls-cluster-backward"] if args.no_backward or args.reverse else []
    common = [*NODE_OPTIONS, *QUIET, *secret, *backward]
    nodes = [
        nettester("coap-server", *common, "--dtls-cluster",
                  f"127.0.0.1:{public1};127.0.0.1:{management1};1,---;127.0.0.1:{management2};2"),
        nettester("coap-server", *common, "--dtls-cluster",
                  f"127.0.0.1:{public2};127.0.0.1:{management2};2,---;127.0.0.1:{management1};1"),
    ]
    nat = nettester("nat", f"127.0.0.1:{nat_port}", f"127.0.0.1:{public1}", "--log-level", "warn",
                    *(["--reverse"] if args.reverse else []), stdin=subprocess.PIPE)
    bench: subprocess.Popen[str] | None = None
    try:
        time.sleep(args.startup)  # the nodes and the NAT open their sockets
        bench = coap_bench(nat_port, args.clients)
        assert bench.stdout is not None and nat.stdin is not None
        start: tuple[float, int, list[tuple[float, float]]] | None = None
        pids = [node.pid for node in nodes]
        for tick, line in enumerate(_progress_lines(bench.stdout), start=1):
            requests = int(PROGRESS.match(line).group(1))  # type: ignore[union-attr]
            if tick == args.warmup and forwarded:
                # Every session is node 1's: moving the clients to node 2 makes it forward every record.
                moves = f"add 127.0.0.1:{public2}\nremove 127.0.0.1:{public1}\n"
                if args.reverse:  # node 1 known again, so its answers can move the entries back
                    moves += f"add 127.0.0.1:{public1}\n"
                nat.stdin.write(moves)
                nat.stdin.flush()
            if tick == args.warmup + 1:
                start = (time.monotonic(), requests, cpu_seconds(pids))
            if start is not None and tick == args.warmup + 1 + args.seconds:
                per_node = [(user - user0, system - system0)
                            for (user, system), (user0, system0) in zip(cpu_seconds(pids), start[2], strict=True)]
                return Measured(requests - start[1], time.monotonic() - start[0], per_node, line)
        raise RuntimeError("coap-bench ended early; run it by hand to see why")
    finally:
        stop(bench, nat, *nodes)


def relay_only(args: argparse.Namespace) -> str:
    """The relaying node's CPU per relayed request, driven by this process (see the module docstring)."""
    sys.path.insert(0, ROOT)
    from nettester.cluster.wire import TYPE_IN, TYPE_OUT, ManagementCodec

    secret = None if args.no_secret else b"benchmark secret"
    codec = ManagementCodec(secret)
    client, owner = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (client, owner):
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
    public, management = free_udp_ports(2)
    node = nettester("coap-server", *NODE_OPTIONS, *QUIET,
                     *([] if secret is None else ["--dtls-cluster-group-security", secret.decode()]),
                     *(["--no-dtls-cluster-backward"] if args.no_backward else []), "--dtls-cluster",
                     f"127.0.0.1:{public};127.0.0.1:{management};2,---;127.0.0.1:{owner.getsockname()[1]};1")
    # RFC 9146 section 4: type 25, version, epoch, sequence number, CID (node 1's first byte), length, payload.
    record = bytes([25, 254, 253, 0, 1, 0, 0, 0, 0, 0, 1]) + bytes([1, 9, 9, 9, 9, 9]) + b"\x00\x30" + bytes(48)
    answer = bytes([25, 254, 253, 0, 1, 0, 0, 0, 0, 0, 2]) + bytes([1, 9, 9, 9, 9, 9]) + b"\x00\x10" + bytes(16)

    def relay(requests: int) -> None:
        """Closed loop: each answer the client receives sends its next record."""
        for _ in range(args.in_flight):
            client.sendto(record, ("127.0.0.1", public))
        for count in range(requests):
            forwarded = codec.decode(owner.recv(2048))
            assert getattr(forwarded, "kind", None) == TYPE_IN, forwarded
            if args.no_backward:
                owner.sendto(answer, forwarded.client)  # type: ignore[union-attr]
            else:
                owner.sendto(codec.encode_records(TYPE_OUT, forwarded.client, answer),  # type: ignore[union-attr]
                             ("127.0.0.1", management))
            client.recv(2048)
            if count < requests - args.in_flight:
                client.sendto(record, ("127.0.0.1", public))

    try:
        time.sleep(args.startup)
        relay(2000)  # warm-up
        requests = max(1, args.requests)
        before, start = cpu_seconds([node.pid])[0], time.monotonic()
        relay(requests)
        (user, system), seconds = cpu_seconds([node.pid])[0], time.monotonic() - start
    finally:
        stop(node)
    user, system = (user - before[0]) * 1e6 / requests, (system - before[1]) * 1e6 / requests
    return (f"relaying node ({setup(args)}, {args.in_flight} in flight): {user:.1f} user + {system:.1f} kernel = "
            f"{user + system:.1f} us/req ({requests / seconds:.0f} req/s)")


def failover(args: argparse.Namespace) -> str:
    """Kill one of three replicating nodes under load; what its sessions and the clients went through."""
    *ports, nat_port = free_udp_ports(7)
    publics, managements = ports[:3], ports[3:]
    group = ",".join(f"127.0.0.1:{port}" for port in managements)
    logs = [tempfile.TemporaryFile("w+") for _ in range(3)]
    os.environ["PYTHONUNBUFFERED"] = "1"  # every log line is in the file when the node is killed
    nodes = [
        nettester("coap-server", *NODE_OPTIONS, "--log-format", "json", "--stats-interval", "1",
                  "--dtls-cluster-group-security", "benchmark secret", "--dtls-cluster-group", group,
                  "--dtls-cluster", f"127.0.0.1:{public};127.0.0.1:{management};{node_id}", stdout=log)
        for node_id, (public, management, log) in enumerate(zip(publics, managements, logs, strict=True), start=1)
    ]
    nat = nettester("nat", f"127.0.0.1:{nat_port}", *(f"127.0.0.1:{port}" for port in publics), "--tlb", "3000",
                    "--log-level", "warn")
    bench: subprocess.Popen[str] | None = None
    killed_at, victim = None, 0
    try:
        time.sleep(args.startup + 2)  # the nodes find each other (PING/PONG)
        bench = coap_bench(nat_port, args.clients, "--requests", str(args.requests), "--timeout", "30")
        assert bench.stdout is not None
        ticks, result = 0, "coap-bench printed no total"
        for line in bench.stdout:
            line = line.strip()
            ticks += bool(PROGRESS.match(line))
            if TOTAL.match(line):
                result = line
            if ticks == args.kill_after and killed_at is None:
                killed_at = time.time()
                held = [_last_summary(_events(log), killed_at)["dtls_connections"] for log in logs]
                victim = held.index(max(held))
                nodes[victim].kill()
        bench.wait(timeout=120)
    finally:
        stop(bench, nat, *nodes)
    if killed_at is None:
        raise RuntimeError("coap-bench ended before the kill; raise --requests")
    events = [_events(log) for log in logs]
    survivors = [node_events for index, node_events in enumerate(events) if index != victim]
    handshakes_before = sum(_last_summary(node_events, killed_at)["dtls_handshakes"] for node_events in survivors)
    finals = [next(e for e in reversed(node_events) if e.get("label") == "final summary") for node_events in survivors]
    new_handshakes = sum(final["dtls_handshakes"] for final in finals) - handshakes_before
    delays = sorted(_seconds(event["ts"]) - killed_at for node_events in survivors for event in node_events
                    if event.get("event") == "cluster_takeover")
    taken = f"{len(delays)} taken over {delays[0]:.1f} to {delays[-1]:.1f} s later" if delays else "none taken over"
    return (f"cluster fail-over (3 dynamic nodes, NAT --tlb 3000, {args.clients} clients): node {victim + 1} killed "
            f"(SIGKILL) holding {_last_summary(events[victim], killed_at)['dtls_connections']} sessions: {taken}, "
            f"{new_handshakes} new handshakes; bench: {result}")


def _events(log: IO[str]) -> list[dict[str, Any]]:
    """The JSON log lines a node wrote so far (its output is unbuffered)."""
    log.seek(0)
    return [json.loads(line) for line in log if line.startswith("{")]


def _seconds(timestamp: str) -> float:
    """Epoch seconds of a JSON log line's ``ts`` (ISO 8601, UTC)."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _last_summary(events: list[dict[str, object]], before: float) -> dict[str, Any]:
    """A node's last periodic summary logged before ``before`` (epoch seconds)."""
    return next(event for event in reversed(events)
                if event.get("label") == "summary" and _seconds(str(event["ts"])) < before)


def _progress_lines(stream: IO[str]) -> Iterator[str]:
    """coap-bench's progress lines, as they come."""
    return (line.strip() for line in stream if PROGRESS.match(line.strip()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20, help="coap-bench clients (DTLS sessions)")
    parser.add_argument("--seconds", type=int, default=10, help="measuring window of each run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of load before the window")
    parser.add_argument("--startup", type=float, default=2.0, help="seconds the servers get to start")
    parser.add_argument("--no-secret", action="store_true", help="unauthenticated management records (no MAC)")
    parser.add_argument("--no-backward", action="store_true",
                        help="node 1 answers forwarded requests directly (--no-dtls-cluster-backward)")
    parser.add_argument("--reverse", action="store_true",
                        help="node 1 answers directly and the NAT updates its entries from the answers (-r): "
                             "Californium's way around the forwarding cost")
    parser.add_argument("--failover", action="store_true", help="kill a node under load (see above)")
    parser.add_argument("--kill-after", type=int, default=4, help="--failover: seconds of load before the kill")
    parser.add_argument("--relay-only", action="store_true", help="measure the relaying node alone (see above)")
    parser.add_argument("--in-flight", type=int, default=2, help="--relay-only: records outstanding")
    parser.add_argument("--requests", type=int, default=None,
                        help="--relay-only: requests measured (40000); --failover: requests per client (8000)")
    args = parser.parse_args()
    if args.failover:
        args.requests = args.requests or 8000
        print(failover(args))
        return
    if args.relay_only:
        args.requests = args.requests or 40000
        print(relay_only(args))
        return
    direct = run(False, args)
    print(f"direct:    {direct.requests} requests in {direct.seconds:.1f} s, node CPU {direct.node_cpu:.2f} s; "
          f"last: {direct.errors_line}", flush=True)
    forwarded = run(True, args)
    print(f"forwarded: {forwarded.requests} requests in {forwarded.seconds:.1f} s, node CPU "
          f"{forwarded.node_cpu:.2f} s; last: {forwarded.errors_line}", flush=True)
    extra = forwarded.us_per_request - direct.us_per_request
    extra_system = forwarded.system_us_per_request - direct.system_us_per_request
    print(f"cluster forwarding ({setup(args)}, {args.clients} clients): direct {direct.us_per_request:.1f} us/req "
          f"({direct.rate:.0f} req/s), forwarded {forwarded.us_per_request:.1f} us/req ({forwarded.rate:.0f} req/s): "
          f"{extra:+.1f} us/req ({extra * 100 / direct.us_per_request:+.1f} %; kernel {extra_system:+.1f}, "
          f"user {extra - extra_system:+.1f}), throughput ratio {forwarded.rate / direct.rate:.2f}")
    owner, relay = forwarded.node_us_per_request(0), forwarded.node_us_per_request(1)
    alone = direct.node_us_per_request(0)
    print(f"per node, forwarded: owner {sum(owner):.1f} us/req (user {owner[0]:.1f}, kernel {owner[1]:.1f}; "
          f"direct {sum(alone):.1f}), relaying node {sum(relay):.1f} us/req "
          f"(user {relay[0]:.1f}, kernel {relay[1]:.1f})")


if __name__ == "__main__":
    main()
