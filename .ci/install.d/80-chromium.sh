#!/usr/bin/env bash
# nettester plot (issue 10): tests/report/test_report_plot.py opens the HTML report in
# Debian's headless Chromium and checks the screenshot. Idempotent.
set -euo pipefail
command -v chromium >/dev/null || apt-get install -y -qq --no-install-recommends chromium >/dev/null
