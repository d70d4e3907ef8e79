#!/usr/bin/env bash
# Install what tests/test_slurm_examples.py needs to start a private single-node
# SLURM cluster on Debian 12: SLURM, munge, procps (the examples use ps) and curl
# (the reverse example's test fetches a page with it in a job).
# Run as root. Idempotent and quiet: does nothing when the commands are there.
#
# The packages' maintainer scripts would start system-wide munged/slurmctld/slurmd;
# the tests start their own daemons with their own config, so a policy-rc.d that
# denies every daemon start is in place for the duration of the install.
set -euo pipefail

packages=(munge slurm-wlm slurmctld slurmd slurm-client procps curl)
needed=(munged slurmctld slurmd sbatch scontrol squeue scancel sinfo ps curl)

missing=0
for cmd in "${needed[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing=1
done
if [ "$missing" = 0 ]; then
  exit 0
fi

policy=/usr/sbin/policy-rc.d
backup=""
if [ -e "$policy" ]; then
  backup="$(mktemp)"
  cp -p "$policy" "$backup"
fi
restore_policy() {
  if [ -n "$backup" ]; then
    cp -p "$backup" "$policy"
    rm -f "$backup"
  else
    rm -f "$policy"
  fi
}
trap restore_policy EXIT
printf '#!/bin/sh\n# installing packages: start no daemons\nexit 101\n' >"$policy"
chmod 755 "$policy"

source "$(dirname "$0")/apt.sh"
apt_install install-slurm.sh "${packages[@]}"
