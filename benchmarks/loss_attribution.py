"""Loss attribution against the truth: STUN clients through a lossy loopback relay that keeps its own record.

``nettester stun-server`` on 127.0.0.1; a relay in this process between it
and ``nettester stun-client`` (``--clients`` clients, one request a second
each, for ``--seconds``) drops a seeded random share of the requests
(``--request-loss``, 2 %) and of the responses (``--response-loss``, 3 %)
and notes, per transaction id, the fate of every transmission. The client's
JSON log says, per resolved loss episode, how many transmissions were lost
on the way out and on the way back; an episode is right when both numbers
equal the relay's. Goals: every resolved episode right, at most 1 %
unattributed (open at stop), at most 3 KiB of client RSS per client (RSS of
the fleet minus that of a 1-client tester, per client). Server bytes per
session: the session table's own memory (tracemalloc) at ``--max-sessions``
sessions. Prints one line.

    python3 benchmarks/loss_attribution.py
    python3 benchmarks/loss_attribution.py --clients 200 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc

from harness import ROOT, free_udp_ports

COOKIE = b"\x21\x12\xa4\x42"


def start(command: list[str], stdout: int | object = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nettester", *command], cwd=ROOT, stdout=stdout,
                            stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_server(port: int, process: subprocess.Popen[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        for _ in range(150):
            probe.sendto(b"\x00\x01\x00\x00" + COOKIE + os.urandom(12), ("127.0.0.1", port))
            try:
                probe.recv(2048)
                return
            except TimeoutError:
                if process.poll() is not None:
                    break
    process.kill()
    raise SystemExit(f"stun-server did not start on port {port}")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Relay:
    """One UDP socket: client datagrams go to the server, server datagrams back to their TrID's client."""

    def __init__(self, port: int, server: tuple[str, int], seed: int, request_loss: float, response_loss: float):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 2**20)
        self.sock.bind(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.server = server
        self.rng = random.Random(seed)
        self.request_loss, self.response_loss = request_loss, response_loss
        self.origin: dict[bytes, tuple[str, int]] = {}
        self.fates: dict[bytes, list[str]] = {}  # TrID -> "forward" | "return" | "ok", per transmission

    def run_until(self, done: callable) -> None:  # type: ignore[valid-type]
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ)
        while not done():
            if not selector.select(0.1):
                continue
            for _ in range(256):
                try:
                    data, addr = self.sock.recvfrom(2048)
                except BlockingIOError:
                    break
                self.relay(data, addr)

    def relay(self, data: bytes, addr: tuple[str, int]) -> None:
        trid = data[8:20]
        if addr == self.server:
            fates = self.fates.get(trid)
            if fates is None:
                return
            if self.rng.random() < self.response_loss:
                fates[-1] = "return"  # the transmission reached the server; its answer dies here
            else:
                self.sock.sendto(data, self.origin[trid])
        else:
            self.origin[trid] = addr
            if self.rng.random() < self.request_loss:
                self.fates.setdefault(trid, []).append("forward")
            else:
                self.fates.setdefault(trid, []).append("ok")
                self.sock.sendto(data, self.server)


def session_bytes(sessions: int) -> float:
    """Bytes per session of a full SessionTable (key, packed state, dict slot)."""
    sys.path.insert(0, ROOT)
    from nettester.protocols.stun.attribution import SequenceTag, SessionTable

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    table = SessionTable(max_sessions=sessions)
    for n in range(sessions):
        table.record(SequenceTag(n.to_bytes(8, "big"), 1_000_000 + n), 1.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename")) / sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--request-loss", type=float, default=0.02)
    parser.add_argument("--response-loss", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-sessions", type=int, default=100_000)
    args = parser.parse_args()

    server_port, relay_port = free_udp_ports(2)
    server = start(["stun-server", "--port", str(server_port), "--interface", "127.0.0.1", "--stats-interval", "0",
                    "--log-level", "warn"])  # fmt: skip
    workdir = tempfile.mkdtemp(prefix="loss-attribution-")
    try:
        wait_for_server(server_port, server)
        relay = Relay(relay_port, ("127.0.0.1", server_port), args.seed, args.request_loss, args.response_loss)
        common = ["--interval", "1", "--start-delay", "0-1", "--stats-interval", "0", "--log-format", "json",
                  "--max-loss", "100"]  # fmt: skip
        log_path = os.path.join(workdir, "client.jsonl")
        with open(log_path, "wb") as log:
            client = start(["stun-client", "--server", "127.0.0.1", "--port", str(relay_port), "--clients",
                            str(args.clients), "--duration", f"{args.seconds:g}", "--seed", str(args.seed), *common],
                           stdout=log)  # fmt: skip
            baseline = start(["stun-client", "--server", "127.0.0.1", "--port", str(server_port), "--clients", "1",
                              "--duration", f"{args.seconds:g}", *common])  # fmt: skip
            measure_at = time.monotonic() + args.seconds * 0.9
            rss: dict[str, int] = {}

            def done() -> bool:
                if not rss and time.monotonic() >= measure_at:
                    rss["fleet"], rss["one"] = rss_bytes(client.pid), rss_bytes(baseline.pid)
                return client.poll() is not None

            relay.run_until(done)
            baseline.wait(timeout=30)
    finally:
        server.terminate()
        server.wait(timeout=10)

    resolved = right = 0
    wrong: list[str] = []
    summary: dict[str, object] = {}
    with open(log_path) as log:
        for line in log:
            record = json.loads(line)
            if record.get("event") == "loss_attributed":
                resolved += 1
                fates = relay.fates.get(bytes.fromhex(record["trid"].replace(":", "")), [])
                truth = (fates.count("forward"), fates.count("return"))
                if (record["lost_forward"], record["lost_return"]) == truth:
                    right += 1
                else:
                    wrong.append(f"{record['trid']} said {record['lost_forward']}/{record['lost_return']} "
                                 f"relay {truth[0]}/{truth[1]}")  # fmt: skip
            elif record.get("event") == "final_summary":
                summary = record
    lossy = sum(1 for fates in relay.fates.values() if any(fate != "ok" for fate in fates))
    forward, back, unattributed = (int(summary.get(key, 0)) for key in  # type: ignore[call-overload]
                                   ("lost_forward", "lost_return", "lost_unattributed"))  # fmt: skip
    episodes = resolved + unattributed
    per_client = (rss["fleet"] - rss["one"]) / (args.clients - 1) if rss and args.clients > 1 else float("nan")
    print(
        f"loss-attribution benchmark: clients={args.clients} 1 req/s {args.seconds:g}s "
        f"relay_drops={args.request_loss:.0%}/{args.response_loss:.0%} lossy_trids={lossy} "
        f"resolved={resolved} right={right} accuracy={100.0 * right / resolved if resolved else 0:.2f}% "
        f"unattributed={unattributed} ({100.0 * unattributed / episodes if episodes else 0:.2f}%) "
        f"lost_forward={forward} lost_return={back} attribution_invalid={summary.get('attribution_invalid')} "
        f"client_rss_per_client={per_client:.0f} bytes server_bytes_per_session={session_bytes(args.max_sessions):.0f} "
        f"(goals: every resolved episode right, unattributed <= 1%, <= 3072 bytes per client)"
        + (f" wrong: {'; '.join(wrong[:3])}" if wrong else "")
    )


if __name__ == "__main__":
    main()
