# Shell helpers shared by the examples in this directory (source it, don't run it).
# Keep it next to the example scripts you copy.
#
# Every job keeps its files in one private directory on the shared filesystem,
#     ${FILEFORWARD_JOBS_DIR:-~/.cache/fileforward/jobs}/<job id>/
#         tunnel/         fileforward's tunnel directory (web services)
#         rpc/            the RPC tunnel directory (RPC examples)
#         service.info    what the login side needs: service name, URL path with token
# and removes it when it ends.

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

# ff_free_port: print a TCP port that is free on this machine's 127.0.0.1.
ff_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ff_wait_port PORT PID [SECONDS]: wait until 127.0.0.1:PORT accepts connections.
# Fails if process PID (the one that should listen) exits first, or after SECONDS
# (default 300).
ff_wait_port() {
  local port=$1 pid=$2 deadline=$((SECONDS + ${3:-300}))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
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

# ff_publish_service DIR NAME URL_PATH: tell the login side (connect.sh) what runs
# in this job; written atomically and private (the URL may hold a token).
ff_publish_service() {
  (
    umask 077
    printf 'service=%s\nurl_path=%s\n' "$2" "$3" >"$1/service.info.tmp"
    mv "$1/service.info.tmp" "$1/service.info"
  )
}

# ff_job_cleanup DIR: the EXIT trap of a batch script. Stops every process of the
# job (this shell's process group: fileforward, the service), waits for them, so
# fileforward removes its tunnel files, then removes the job's directory.
# Ends COMPLETED / CANCELLED as it should: `kill 0` signals this shell as well, so
# it ignores SIGTERM first.
ff_job_cleanup() {
  trap '' TERM
  kill 0 2>/dev/null
  wait
  ff_remove_job_dir "$1"
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

# ff_wait_job_end JOBID PID: return when the job has ended, or when process PID
# (the login-side server) has exited.
ff_wait_job_end() {
  while [ -n "$(ff_job_state "$1")" ] && ff_running "$2"; do
    sleep "$FF_POLL_SECONDS"
  done
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
