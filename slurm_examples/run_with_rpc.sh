#!/bin/bash
# Login node: submit a job and serve it the functions of rpc_server.py (or
# $RPC_FUNCTIONS, MODULE:ATTR) until it ends. Works for job arrays too: every task
# talks to this one server.
#
#   ./run_with_rpc.sh [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]
#   ./run_with_rpc.sh rpc_job.py https://www.example.org/
#   ./run_with_rpc.sh rpc_array.py
#
# The job is submitted on hold, the server started on the job's own tunnel
# directory ~/.cache/fileforward/jobs/JOBID/rpc, and the job released once the
# server answers. Ctrl-C (or this script ending any other way before the job)
# cancels the job: it cannot work without its server.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/fileforward_helpers.sh"

if [ $# -eq 0 ]; then
  echo "usage: run_with_rpc.sh [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]" >&2
  exit 2
fi
functions=${RPC_FUNCTIONS:-rpc_server:FUNCTIONS}

# The job gets this environment (sbatch exports it), except the LLM API key:
# that stays on the login node, with the functions that use it.
llm_api_key=${LLM_API_KEY:-}
unset LLM_API_KEY
ff_submit_held "$@"

LLM_API_KEY=$llm_api_key PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  python3 -m rpc serve "$functions" --job "$ff_job_id" &
ff_login_pid=$!

# Readiness: release the job only once the server answers.
deadline=$((SECONDS + 60))
until python3 -m rpc status --job "$ff_job_id" >/dev/null; do
  if ! ff_running "$ff_login_pid" || [ "$SECONDS" -ge "$deadline" ]; then
    echo "the RPC server did not come up (see above)" >&2
    exit 1
  fi
  sleep 0.5
done
ff_release_held "serving $functions to it"
ff_serve_held_job "the RPC server"
