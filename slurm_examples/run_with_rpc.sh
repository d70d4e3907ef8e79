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
job_id=$(env -u LLM_API_KEY sbatch --parsable --hold "$@")
job_id=${job_id%%;*}
job_dir=$(ff_job_dir "$job_id")
server=""
on_exit() {  # set before anything else can fail: a held job must never stay behind
  if [ -n "$(ff_job_state "$job_id")" ]; then
    echo "cancelling job $job_id (its RPC server is stopping)" >&2
    scancel "$job_id"
    while [ -n "$(ff_job_state "$job_id")" ]; do sleep 1; done  # until its processes are gone
  fi
  [ -z "$server" ] || ff_stop "$server"
  ff_remove_job_dir "$job_dir"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
ff_make_private "$job_dir" "$job_dir/rpc"

PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  python3 -m rpc serve "$functions" --tunnel_dir "$job_dir/rpc" &
server=$!

# Readiness: release the job only once the server answers.
deadline=$((SECONDS + 60))
until python3 -m rpc status --tunnel_dir "$job_dir/rpc" >/dev/null; do
  if ! ff_running "$server" || [ "$SECONDS" -ge "$deadline" ]; then
    echo "the RPC server did not come up (see above)" >&2
    exit 1
  fi
  sleep 0.5
done
scontrol release "$job_id"
echo "job $job_id released; serving $functions to it from $(hostname -s) until it ends"

ff_wait_job_end "$job_id" "$server"
if [ -n "$(ff_job_state "$job_id")" ]; then  # the job still runs: the server died
  echo "the RPC server stopped unexpectedly (see above)" >&2
  exit 1
fi
final=$(scontrol show job "$job_id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' || true)
summary=$(sort <<<"$final" | uniq -c | xargs)
echo "job $job_id has ended${summary:+ ($summary)}."
# Exit status 0 if every task COMPLETED (or SLURM no longer remembers the job).
[ -z "$final" ] || ! grep -qv '^COMPLETED$' <<<"$final"
