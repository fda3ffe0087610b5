#!/usr/bin/env bash
# CoAP interop peers (issue 5): libcoap 4.3 command-line tools from Debian
# (coap-client-notls / coap-server-notls, and the -openssl variants for coaps).
# Idempotent: nothing is installed when the tools are already there.
set -euo pipefail

if ! command -v coap-client-notls >/dev/null || ! command -v coap-server-notls >/dev/null; then
    apt-get install -y -qq --no-install-recommends libcoap3-bin >/dev/null
fi
