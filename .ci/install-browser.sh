#!/usr/bin/env bash
# What tests/test_browser_jupyter.py needs: Debian's chromium (the browser the test
# drives; playwright never downloads one) and the playwright Python package.
# Idempotent and quiet: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

if ! dpkg-query -W -f='${Status}' chromium 2>/dev/null | grep -q 'install ok installed'; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! python3 -c 'import playwright' 2>/dev/null; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet 'playwright>=1.49'
fi
