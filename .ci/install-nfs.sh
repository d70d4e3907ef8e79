#!/usr/bin/env bash
# What the two-node NFS emulation (tests/nfs_harness) needs on Debian 12: FUSE 3 and
# fusermount3 (fuse3, libfuse3-3), `ip netns` (iproute2) and the mfusepy binding.
# Idempotent and quiet: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

missing=()
for pkg in fuse3 libfuse3-3 iproute2; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
    || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import importlib.metadata as m, sys; sys.exit(m.version("mfusepy") != "3.1.1")' 2>/dev/null; then
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet 'mfusepy==3.1.1'
fi
