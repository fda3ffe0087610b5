"""Every long-running role, run for real on loopback and scraped once per test session.

``scrape_every_role()`` starts each role (with a peer to talk to) side by
side, scrapes ``/metrics`` twice and ``/ready`` once, stops them with SIGTERM
and keeps their log output and final summary. tests/test_metrics.py checks the
conventions on it; tests/test_k8s_manifests.py checks the dashboards' queries.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRAPE_BOUND = 60.0  # seconds a role gets to open its metrics port on a loaded machine


def _free_ports(count: int, spacing: int = 1) -> list[int]:
    """``count`` loopback port numbers whose ``spacing`` neighbours are free for TCP and UDP."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + spacing > 65535:
            continue
        try:
            for offset in range(spacing):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    with socket.socket(socket.AF_INET, kind) as check:
                        check.bind(("127.0.0.1", base + offset))
        except OSError:
            continue
        ports.append(base)
    return ports


def _role_commands() -> dict[str, list[str]]:
    """Each long-running role (its metric prefix: the role's name) with a loopback peer to talk to."""
    keepalive, stun, metrics_base, nat = _free_ports(4)
    coap = _free_ports(1, spacing=102)[0]
    cluster_public, cluster_management = _free_ports(2)
    return {
        "keepalive-server": ["keepalive-server", "--interface", "127.0.0.1", "--port", str(keepalive)],
        "keepalive-client": ["keepalive-client", "--server", "127.0.0.1", "--port", str(keepalive), "--clients", "2"],
        "stun-server": ["stun-server", "--interface", "127.0.0.1", "--port", str(stun)],
        "stun-client": ["stun-client", "--server", "127.0.0.1", "--port", str(stun), "--clients", "2",
                        "--start-delay", "0", "--interval", "1"],
        "coap-server": ["coap-server", "--port", str(coap), "--interfaces", "127.0.0.1", "--psk-sandbox",
                        "--dtls-cluster", f":{cluster_public};127.0.0.1:{cluster_management};1"],
        "nat": ["nat", f"127.0.0.1:{nat}", f"127.0.0.1:{coap + 1}", "--no-stdin-console"],
    }


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@functools.cache
def scrape_every_role() -> dict[str, dict[str, Any]]:
    """Role -> its /metrics text, /ready status, final summary fields and log output (roles run side by side)."""
    commands = _role_commands()
    metrics_ports = dict(zip(commands, _free_ports(len(commands)), strict=True))
    processes = {}
    for role, argv in commands.items():
        processes[role] = subprocess.Popen(
            [sys.executable, "-m", "nettester", *argv, "--metrics-port", str(metrics_ports[role]),
             "--metrics-interface", "127.0.0.1", "--log-format", "json", "--stats-interval", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for role, port in metrics_ports.items():
            deadline = time.monotonic() + SCRAPE_BOUND
            while True:
                try:
                    status, text = _get(f"http://127.0.0.1:{port}/metrics")
                    break
                except OSError:
                    if time.monotonic() > deadline or processes[role].poll() is not None:
                        raise AssertionError(f"{role} served no /metrics within {SCRAPE_BOUND} s") from None
                    time.sleep(0.2)
            assert status == 200
            _get(f"http://127.0.0.1:{port}/metrics")  # a second scrape: still no log line
            results[role] = {"metrics": text, "ready": _get(f"http://127.0.0.1:{port}/ready")[0]}
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for role, process in processes.items():
            output, _ = process.communicate(timeout=60)
            results.setdefault(role, {})["log"] = output
            finals = [json.loads(line) for line in output.splitlines()
                      if line.startswith("{") and '"final_summary"' in line]
            results[role]["summary"] = finals[-1]["text"] if finals else ""
    return results




ROLES = list(_role_commands())


def exported_sample_names() -> set[str]:
    """Every sample name (``_total``, ``_bucket``... included) some role exports, or declares: a labelled
    counter whose label values are free text (DTLS handshake failures) has no sample before its first event."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for result in scrape_every_role().values():
        text = result["metrics"]
        names.update(sample.name for family in text_string_to_metric_families(text) for sample in family.samples)
        for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
            names.update([f"{name}_bucket", f"{name}_count"] if kind == "histogram" else [name])
    return names
