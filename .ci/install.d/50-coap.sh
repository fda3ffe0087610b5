#!/usr/bin/env bash
# CoAP interop peers (issue 5): libcoap 4.3 command-line tools from Debian
# (coap-client-notls / coap-server-notls, and the -openssl variants for
# coaps), and the build tools DTLSSocket needs (aiocoap's coaps transport,
# built from source by 70-interop.sh, setup.cfg's [interop] extra).
# Idempotent: nothing is installed when everything is already there.
set -euo pipefail

if ! command -v coap-client-notls >/dev/null || ! command -v coap-server-openssl >/dev/null; then
    apt-get install -y -qq --no-install-recommends libcoap3-bin >/dev/null
fi
if ! command -v autoreconf >/dev/null || ! command -v automake >/dev/null || ! command -v libtoolize >/dev/null; then
    apt-get install -y -qq --no-install-recommends autoconf automake libtool >/dev/null
fi
