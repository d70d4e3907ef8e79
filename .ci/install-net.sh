#!/usr/bin/env bash
# Install the clients tests/test_netforward.py drives through the proxies on
# Debian 12: curl, git, and openssl (the HTTPS stand-in's self-signed certificate).
# Run as root. Idempotent and quiet: does nothing when the commands are there.
set -euo pipefail

packages=(curl git openssl ca-certificates)
needed=(curl git openssl)

missing=0
for cmd in "${needed[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 0 ]; then
  exit 0
fi

source "$(dirname "$0")/apt.sh"
apt_install install-net.sh "${packages[@]}"
