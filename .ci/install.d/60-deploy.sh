#!/usr/bin/env bash
# Deployment proofs (issue 11): mmdebstrap + buildah for the fresh-machine test
# and the image build (tests/test_fresh_machine.py, tests/test_image.py),
# kubectl (kustomize) for the overlays, promtool for /metrics.
# Idempotent: nothing is installed when the tools are already there.
set -euo pipefail

missing=()
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v buildah >/dev/null || missing+=(buildah)
command -v promtool >/dev/null || missing+=(prometheus)
# Any kubectl with kustomize will do (Debian's kubernetes-client, or one already installed).
command -v kubectl >/dev/null || missing+=(kubernetes-client)
if [ "${#missing[@]}" -gt 0 ]; then
    # The prometheus package must not start a daemon of its own on the CI machine.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
