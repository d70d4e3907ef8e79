#!/bin/bash
# Login node: reach the web service of job JOBID (jupyter.sbatch, web_app.sbatch).
#
#   ./connect.sh JOBID [PORT]
#
# Waits until the job's service is up, forwards it to 127.0.0.1:PORT here (a free
# port unless given) with `fileforward --server`, and prints the ssh command and
# URL (with the service's token) for your laptop. Runs until the job ends or you
# press Ctrl-C; run it again to reconnect.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/fileforward_helpers.sh"

usage="usage: connect.sh JOBID [PORT]
Forward the web service of job JOBID (jupyter.sbatch, web_app.sbatch) to
127.0.0.1:PORT on this node (a free port unless PORT is given)."
case ${1:-} in
  -h | --help) echo "$usage"; exit 0 ;;
esac
if [ $# -eq 0 ] || [ $# -gt 2 ] || [[ ! $1 =~ ^[0-9]+$ ]]; then
  echo "$usage" >&2
  exit 2
fi
job_id=$1
job_dir=$(ff_job_dir "$job_id")
port=${2:-$(ff_free_port)}

# Readiness: the job writes service.info once its service answers.
state=""
until [ -e "$job_dir/service.info" ]; do
  new_state=$(ff_job_state "$job_id")
  if [ -z "$new_state" ]; then
    echo "job $job_id is not running (finished, cancelled or unknown); see its output file" >&2
    exit 1
  fi
  [ "$new_state" != "$state" ] && echo "job $job_id is $new_state; waiting for its service..."
  state=$new_state
  sleep "$FF_POLL_SECONDS"
done
service=$(sed -n 's/^service=//p' "$job_dir/service.info")
url_path=$(sed -n 's/^url_path=//p' "$job_dir/service.info")

server=""
on_exit() {
  [ -z "$server" ] || ff_stop "$server"
  if [ -z "$(ff_job_state "$job_id")" ]; then
    ff_remove_job_dir "$job_dir"
  fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
fileforward --server --port "$port" --job "$job_id" &
server=$!
ff_wait_port "$port" "$server" 60

cat <<INFO

$service of job $job_id is forwarded to 127.0.0.1:$port on $(hostname -s).
On your laptop run (with the name you use to ssh to this login node):

    ssh -N -L $port:127.0.0.1:$port ${USER:-$(id -un)}@$(hostname -f)

and open

    http://localhost:$port$url_path

Ctrl-C here stops the forwarding (the job keeps running); it stops by itself when the job ends.
INFO

ff_wait_job_end "$job_id" "$server" "fileforward --server"
echo "job $job_id has ended."
