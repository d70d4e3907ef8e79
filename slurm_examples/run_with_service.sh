#!/bin/bash
# Login node: let a job reach a TCP service of this login node (a database, an
# MLflow or license server, a model server...) while it runs. The reverse of
# connect.sh: here `fileforward --client` runs next to the service, and the job
# (reverse.sbatch) runs `fileforward --server`, which its programs connect to.
#
#   ./run_with_service.sh PORT [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]
#   ./run_with_service.sh 5000 reverse.sbatch curl -sS http://127.0.0.1:{port}/
#
# PORT is the service's port on this node's 127.0.0.1. The job is submitted on
# hold, `fileforward --client --port PORT` started on the job's tunnel directory
# ~/.cache/fileforward/jobs/JOBID/tunnel, then the job released. Runs until the job
# ends; Ctrl-C (or this script ending any other way first) cancels the job. Exit
# status 0 when the job COMPLETED.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/fileforward_helpers.sh"

if [ $# -lt 2 ] || [[ ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: run_with_service.sh PORT [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]" >&2
  exit 2
fi
port=$1
shift
if ! ff_listening "$port"; then
  echo "nothing listens on 127.0.0.1:$port here; start the service first" >&2
  exit 1
fi

ff_submit_held "$@"
fileforward --client --port "$port" --job "$ff_job_id" &
ff_login_pid=$!
# No need to wait for it: the job's fileforward --server waits for it (--connect-timeout).
ff_release_held "forwarding its connections to 127.0.0.1:$port"
ff_serve_held_job "fileforward --client"
