#!/usr/bin/env bash
# Base tools every test run needs: a compiler for udpload and wheels without binaries.
set -euo pipefail
apt-get install -y -qq --no-install-recommends gcc libc6-dev iproute2 >/dev/null
