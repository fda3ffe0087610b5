#!/usr/bin/env bash
# STUN interop peers (issue 3): coturn (turnserver, turnutils_stunclient) and
# Debian's RFC 3489 'stun' client. aioice comes with the pip [test] extra.
# Idempotent: nothing is installed when the tools are already there.
set -euo pipefail

missing=()
command -v turnserver >/dev/null || missing+=(coturn)
command -v turnutils_stunclient >/dev/null || missing+=(coturn)
command -v stun >/dev/null || missing+=(stun-client)
if [ "${#missing[@]}" -gt 0 ]; then
    # coturn's package must not start a daemon of its own on the CI machine.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi
