# Sourced by .ci/install-*.sh: apt_install SCRIPT PACKAGE... installs the packages
# quietly, printing apt's output (and which script failed) only if it fails.
apt_install() {
  local script=$1 log
  shift
  export DEBIAN_FRONTEND=noninteractive
  log="$(mktemp)"
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "$script: installing $* failed" >&2
    rm -f "$log"
    return 1
  fi
  rm -f "$log"
}
