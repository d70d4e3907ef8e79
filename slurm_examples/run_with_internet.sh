#!/bin/bash
# Login node: submit a job and give it this node's internet while it runs. Here
# `fileforward serve --job JOBID` connects where the job's proxies ask; in the
# job (internet.sbatch), `fileforward run --job -- pip install ...` runs a
# command with an HTTP proxy (or -D / --http-proxy for a whole script).
#
#   ./run_with_internet.sh [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]
#   ./run_with_internet.sh internet.sbatch python3 train.py
#
# The job is submitted on hold, `fileforward serve` started on the job's directory
# ~/.cache/fileforward/jobs/JOBID/net (it logs every connection it makes for the
# job), then the job released. Runs until the job ends; Ctrl-C (or this script
# ending any other way first) cancels the job. Exit status 0 when the job COMPLETED.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/fileforward_helpers.sh"

if [ $# -eq 0 ]; then
  echo "usage: run_with_internet.sh [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]" >&2
  exit 2
fi

ff_submit_held "$@"
# -v: one line per connection (where to, bytes each way). Add --permit HOST:PORT
# (repeats) to limit where the job may connect.
fileforward serve --job "$ff_job_id" -v &
ff_login_pid=$!
# No need to wait for it: the job's proxy waits for it (--connect-timeout).
ff_release_held "carrying its connections to the internet"
ff_serve_held_job "fileforward serve"
