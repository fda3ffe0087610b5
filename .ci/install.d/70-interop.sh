#!/usr/bin/env bash
# Python peers that are built from source (setup.cfg's [interop] extra: aiocoap's
# tinydtls transport, DTLSSocket, needs the autotools 50-coap.sh installs), into
# the venv the README's test command then reuses (it creates it the same way).
# Idempotent: pip skips what is installed.
set -euo pipefail

python3 -m venv .venv
.venv/bin/pip install -q -e '.[interop]'
