# Shell helpers shared by the examples in this directory (source it, don't run it).
# Keep it next to the example scripts you copy.
#
# Every job keeps its files in one private directory on the shared filesystem,
#     ${FILEFORWARD_JOBS_DIR:-~/.cache/fileforward/jobs}/<job id>/
#         tunnel/         fileforward's tunnel directory (web services, reverse.sbatch)
#         rpc/            the RPC tunnel directory (RPC examples)
#         net/            fileforward serve's directory (internet.sbatch)
#         service.info    what the login side needs: service name, URL path with token
# and removes it when it ends. The tunnel directories are made by the commands
# that use them: `fileforward ... --job JOBID`, `python3 -m rpc ... --job JOBID`
# (plain `--job` in the job itself).

# How often the login-side scripts ask SLURM about a job (squeue), in seconds.
FF_POLL_SECONDS=${FILEFORWARD_POLL_SECONDS:-5}

# ff_job_dir JOBID: print the job's directory (not created).
ff_job_dir() {
  printf '%s/%s\n' "${FILEFORWARD_JOBS_DIR:-$HOME/.cache/fileforward/jobs}" "$1"
}

# ff_make_private DIR...: create directories readable by you alone.
ff_make_private() {
  mkdir -p "$@"
  chmod 700 "$@"
}

# ff_remove_job_dir DIR: remove a job's directory, tunnel files included. Call it
# only once the job's processes are gone (its EXIT trap; the login side once the
# job has ended and its own fileforward has stopped).
ff_remove_job_dir() {
  case ${1##*/} in
    '' | *[!0-9]*) echo "fileforward example: not a job directory: $1" >&2; return 1 ;;
  esac
  # On NFS, files the other side still holds open linger as .nfsXXXX and keep the
  # directory; the other side removes it when it is done.
  rm -rf -- "$1" 2>/dev/null || echo "fileforward example: $1 still in use, left to the other side" >&2
}

# ff_free_port: print a TCP port that is free on this machine's 127.0.0.1, taken
# from $FILEFORWARD_PORT_RANGE (LOW-HIGH, e.g. 40000-41000) if set, else any.
# Fails, saying why, if the range is malformed or has no free port.
ff_free_port() {
  python3 - "${FILEFORWARD_PORT_RANGE:-}" <<'PY'
import random, re, socket, sys

def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]

spec = sys.argv[1]
if spec:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
    if not match or not 1 <= int(match[1]) <= int(match[2]) <= 65535:
        sys.exit("fileforward example: FILEFORWARD_PORT_RANGE=%r is not a port range LOW-HIGH "
                 "with 1 <= LOW <= HIGH <= 65535, e.g. 40000-41000" % spec)
    ports = list(range(int(match[1]), int(match[2]) + 1))
    random.shuffle(ports)  # jobs sharing a node rarely pick the same port at once
else:
    ports = [0]  # the kernel's choice
port = next(filter(None, map(free, ports)), None)
if port is None:
    sys.exit("fileforward example: no free port in FILEFORWARD_PORT_RANGE=%s" % spec)
print(port)
PY
}

# ff_wait_port PORT PID [SECONDS]: wait until 127.0.0.1:PORT accepts connections.
# Fails if process PID (the one that should listen) exits first, or after SECONDS
# (default 300).
ff_wait_port() {
  local port=$1 pid=$2 deadline=$((SECONDS + ${3:-300}))
  until ff_listening "$port"; do
    if ! ff_running "$pid"; then
      echo "fileforward example: process $pid exited before listening on port $port" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "fileforward example: nothing listens on port $port after ${3:-300} s" >&2
      return 1
    fi
    sleep 0.2
  done
}

# ff_listening PORT: true if something accepts connections on 127.0.0.1:PORT.
ff_listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ff_publish_service DIR NAME URL_PATH: tell the login side (connect.sh) what runs
# in this job; written atomically and private (the URL may hold a token).
ff_publish_service() {
  (
    umask 077
    printf 'service=%s\nurl_path=%s\n' "$2" "$3" >"$1/service.info.tmp"
    mv "$1/service.info.tmp" "$1/service.info"
  )
}

# ff_job_cleanup [DIR]: the EXIT trap of a batch script. Stops every process of the
# job (this shell's process group: fileforward, the service), waits for them, so
# fileforward removes its tunnel files, then removes the job's directory DIR (if
# given: not when the login side made it and removes it).
# Ends COMPLETED / CANCELLED as it should: `kill 0` signals this shell as well, so
# it ignores SIGTERM first.
ff_job_cleanup() {
  trap '' TERM
  kill 0 2>/dev/null
  wait
  [ -z "${1:-}" ] || ff_remove_job_dir "$1"
}

# ff_job_state JOBID: print the job's state (PENDING, RUNNING...), nothing once it
# has left the queue. When SLURM does not answer, asks again rather than guess.
ff_job_state() {
  local out
  until out=$(squeue --noheader --jobs "$1" --format %T 2>&1); do
    case $out in
      *"Invalid job id"*) return 0 ;;  # finished long ago, or never existed
    esac
    echo "fileforward example: squeue failed ($out); asking again" >&2
    sleep "$FF_POLL_SECONDS"
  done
  printf '%s\n' "$out" | head -n 1
}

# ff_wait_job_end JOBID PID WHAT: return when the job has ended. If process PID (the
# login side's WHAT, e.g. "fileforward --server") exits first, say so and fail.
ff_wait_job_end() {
  while [ -n "$(ff_job_state "$1")" ]; do
    if ! ff_running "$2"; then
      echo "$3 stopped unexpectedly (see above)" >&2
      return 1
    fi
    sleep "$FF_POLL_SECONDS"
  done
}

# A job that needs a process on the login side (an RPC server, a fileforward
# --client) from its start: run_with_rpc.sh and run_with_service.sh do
#     ff_submit_held [SBATCH OPTIONS] SCRIPT [ARGS]   sets ff_job_id, ff_job_dir
#     (start the login-side process in the background) ff_login_pid=$!
#     ff_release_held "what this script does for it"
#     ff_serve_held_job "the login-side process's name"
# Whatever ends the script (an error, Ctrl-C, the job's end), its EXIT trap cancels
# the job if it still runs (it cannot work alone), stops the login-side process and
# removes the job's directory.

# ff_submit_held [SBATCH OPTIONS] SCRIPT [ARGS]: submit the job on hold; create its
# private directory.
ff_submit_held() {
  ff_job_id=$(sbatch --parsable --hold "$@")
  ff_job_id=${ff_job_id%%;*}
  ff_job_dir=$(ff_job_dir "$ff_job_id")
  ff_login_pid=""
  trap ff_end_held_job EXIT  # before anything else can fail: a held job must never stay behind
  trap 'exit 130' INT
  trap 'exit 143' TERM
  ff_make_private "$ff_job_dir"
}

# ff_end_held_job: the EXIT trap ff_submit_held sets.
ff_end_held_job() {
  if [ -n "$(ff_job_state "$ff_job_id")" ]; then
    echo "cancelling job $ff_job_id (its login side is stopping)" >&2
    scancel "$ff_job_id"
    while [ -n "$(ff_job_state "$ff_job_id")" ]; do sleep 1; done  # until its processes are gone
  fi
  [ -z "$ff_login_pid" ] || ff_stop "$ff_login_pid"
  ff_remove_job_dir "$ff_job_dir"
}

# ff_release_held DOING: let the held job start; tell the user what this script
# DOES for it meanwhile.
ff_release_held() {
  scontrol release "$ff_job_id"
  echo "job $ff_job_id released; $1 from $(hostname -s) until it ends"
}

# ff_serve_held_job WHAT: wait until the job has ended (fail if the login-side
# process, WHAT, stops first), report its final state(s). Succeeds if every task
# COMPLETED (or SLURM no longer remembers the job).
ff_serve_held_job() {
  local final summary
  ff_wait_job_end "$ff_job_id" "$ff_login_pid" "$1" || return 1
  final=$(scontrol show job "$ff_job_id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' || true)
  summary=$(sort <<<"$final" | uniq -c | xargs)
  echo "job $ff_job_id has ended${summary:+ ($summary)}."
  [ -z "$final" ] || ! grep -qv '^COMPLETED$' <<<"$final"
}

# ff_running PID: true while process PID runs (a child that exited but was not
# waited for yet does not count).
ff_running() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${state:0:1}" != Z ]
}

# ff_stop PID [SECONDS]: stop a background process: SIGTERM, and SIGKILL if it is
# still there after SECONDS (default 10); return once it has exited.
ff_stop() {
  local deadline=$((SECONDS + ${2:-10}))
  kill "$1" 2>/dev/null || true
  while ff_running "$1"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "fileforward example: process $1 ignored SIGTERM for ${2:-10} s; killing it" >&2
      kill -KILL "$1" 2>/dev/null || true
      break  # wait below reaps it, once the kernel lets it go
    fi
    sleep 0.2
  done
  wait "$1" 2>/dev/null || true
}
