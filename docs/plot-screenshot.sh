#!/usr/bin/env bash
# Regenerates docs/plot.png, the README's picture of `nettester plot`, from real loopback runs (about 80 s):
# - 10 stun-clients through `nettester nat` dropping 3 % forward and 3 % backward, whose every mapping is
#   reassigned (`reassign` on the NAT console) after 40 s: loss by direction and NAT mapping changes;
# - 20 keepalive-clients whose server is stopped after 28 s and started again 8 s later: closes by cause.
# Needs the [plots] extra and Debian's chromium. Usage: docs/plot-screenshot.sh [path/to/nettester]
set -euo pipefail
cd "$(dirname "$0")/.."
NETTESTER=${1:-.venv/bin/nettester}
WORK=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
quiet=(--log-level critical --stats-interval 0)

"$NETTESTER" stun-server --interface 127.0.0.1 --port 47478 "${quiet[@]}" & pids+=($!)
"$NETTESTER" nat 127.0.0.1:47479 127.0.0.1:47478 --forward-drop 3 --backward-drop 3 --seed 7 \
    --console-port 47480 --no-stdin-console "${quiet[@]}" & pids+=($!)
"$NETTESTER" keepalive-server --interface 127.0.0.1 --port 47300 "${quiet[@]}" & server=$!
sleep 3
"$NETTESTER" stun-client --server 127.0.0.1 --port 47479 --clients 10 --interval 1 --start-delay 0-1 \
    --duration 75 --report "$WORK/stun.json" "${quiet[@]}" & stun=$!
"$NETTESTER" keepalive-client --server 127.0.0.1 --port 47300 --clients 20 --duration 75 \
    --report "$WORK/keepalive.json" "${quiet[@]}" & keepalive=$!
sleep 28 && kill "$server" && wait "$server" || true
sleep 8
"$NETTESTER" keepalive-server --interface 127.0.0.1 --port 47300 "${quiet[@]}" & pids+=($!)
sleep 4
python3 -c "import socket; s = socket.create_connection(('127.0.0.1', 47480)); s.sendall(b'reassign\n'); \
print(s.recv(200).decode().strip()); s.close()"
wait "$stun" || true; wait "$keepalive" || true  # both fail their verdicts, as they should
"$NETTESTER" plot -o "$WORK/report.html" "$WORK/stun.json" "$WORK/keepalive.json"
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$WORK/profile" \
    --window-size=1150,2450 --screenshot=docs/plot.png "file://$WORK/report.html" 2>/dev/null
echo "docs/plot.png written"
