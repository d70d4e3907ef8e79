"""`fileforward doctor`: will the tunnel work in this directory? Measured, with the fix if not.

Run it on the two nodes at once, on the same shared directory (each waits for the
other), or with --peer on one node (it starts the other side itself, on this
machine: that checks only this machine's view of the filesystem). It prints the
mount, the directory's owner and mode, free space, per-operation latency, whether
a lockf lock held on one side excludes the other, and how fast a write becomes
visible to the other side the way the tunnel writes and reads (see
fileforward/probe.py); then the coherence mode `--coherence auto` picks there
(locks, or lock-free), or one line per problem naming the directory, what was
measured and the fix.
"""
from __future__ import annotations

import argparse
import logging
import pwd
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional

from .cliargs import add_job_option, add_logging_options
from .coherence import LOCKS, Mount
from .meeting import Interrupted, ProbeError, Settings
from .probe import DIRECT_REFUSED, LOCKS_LOCAL, LOCKS_REFUSED, NOT_VISIBLE, Between, Choice, Findings, Local, \
    SideFacts, choose_mode, local_facts, measure_between
from .tunneldir import ENV_TUNNEL_DIR

log = logging.getLogger(__name__)

EPILOG = """\
Exit status: 0 if the tunnel can work in the directory (mode locks or lock-free),
1 if not (or if the two sides could not finish measuring), 130 if interrupted.
The two sides meet through DIR/doctor.meet and work in a private DIR/doctor-<id>/
(0700), removed at the end.
"""
COHERENT = "a filesystem that is coherent between nodes (NFS, GPFS, Lustre, BeeGFS)"
GLOBAL_LOCKS = ("a filesystem whose locks are global across nodes, e.g. NFS with lock forwarding (the "
                "default: no nolock, local_lock=none), GPFS, Lustre mounted with flock, or BeeGFS with "
                "tuneUseGlobalFileLocks=true")
PEER_EXIT_TIMEOUT = 5.0
# Mount options (NFS, Lustre, CIFS...) that make locks node-local or absent, or change caching.
COHERENCE_OPTIONS = {"local_lock", "nolock", "lock", "localflock", "flock", "noflock", "actimeo", "acregmin",
                     "acregmax", "acdirmin", "acdirmax", "ac", "noac", "lookupcache", "cto", "nocto", "vers",
                     "nfsvers", "sync", "cache"}


def add_command(commands: argparse._SubParsersAction, run: Callable) -> None:
    """Register `fileforward doctor` on the main parser's subcommands; `run` runs it."""
    # Options left out keep the main parser's values, so `fileforward --tunnel-dir D doctor` works too.
    parser = commands.add_parser(
        "doctor", help="check whether the tunnel can work in a directory, measured with the other node "
                       "(or --peer)", description=__doc__, epilog=EPILOG, argument_default=argparse.SUPPRESS)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tunnel-dir", metavar="DIR", type=Path,
                       help=f"the shared directory to check (default: ${ENV_TUNNEL_DIR}, "
                            f"else ~/.cache/fileforward/tunnel)")
    add_job_option(where, "tunnel directory")
    parser.add_argument("--peer", action="store_true", default=False,
                        help="start the other side here, as a subprocess: checks this machine's view of the "
                             "directory only (default: wait for a doctor on the other node)")
    parser.add_argument("--wait", type=float, default=Settings.wait, metavar="S",
                        help="how long to wait for the other side to start, in seconds")
    add_logging_options(parser, suppress_defaults=True)
    parser.set_defaults(run=run)


def run(directory: Path, peer: bool, wait: float, stop: Callable[[], bool]) -> int:
    """Check `directory` (existing), print the report, return the exit status."""
    settings = Settings(wait=wait)
    local = local_facts(directory)
    _print(local_report(local))
    helper = _start_peer(directory, settings) if peer else None
    if helper is not None:
        log.info("started the other side on this machine (--peer): pid %d", helper.pid)
    between = None
    try:
        between = measure_between(directory, local, settings, stop)
    except Interrupted:
        _print([f"FAIL: interrupted; nothing measured between the two sides in {directory}"])
        return 130
    except ProbeError as exc:
        _print([f"FAIL: could not measure {directory} between the two sides: {exc}"])
        return 1
    finally:
        if helper is not None:
            _end_peer(helper, finished=between is not None)
    findings = Findings(local, between)
    choice = choose_mode(findings)
    problems = verdict(findings, choice)
    _print(between_report(between, peer) + (problems or ok_lines(findings, choice, peer)))
    return 1 if problems else 0


def local_report(local: Local) -> List[str]:
    """What this side read on its own."""
    mount = local.mount
    lines = [f"fileforward doctor: {local.directory}"]
    if mount is None:
        lines.append("  filesystem: unknown (no /proc/self/mountinfo here)")
    else:
        lines += [f"  filesystem: {mount.fstype} ({mount.source}), mounted at {mount.mount_point}",
                  f"  mount options: {','.join(mount.options)}"]
        notable = [option for option in mount.options if option.partition("=")[0] in COHERENCE_OPTIONS]
        if notable:
            lines.append(f"  options that decide locks and caching: {', '.join(notable)}")
    lines.append("  data path: O_DIRECT reads, fsynced writes (a shared filesystem)" if local.data_path.direct
                 else "  data path: plain reads and writes (a local filesystem: one page cache)")
    if local.unsafe is not None:
        state = "REFUSED by the tunnel (see below)"
    elif local.mode & 0o077:
        state = (f"accepted by the tunnel, but group or others can read what passes through it "
                 f"(fix: chmod 700 {local.directory})")
    else:
        state = "private, as the tunnel requires"
    lines += [f"  directory: owner {_user(local.owner_uid)}, mode {local.mode:04o}: {state}",
              f"  free space: {_size(local.free_bytes)} of {_size(local.total_bytes)}, {local.free_inodes} "
              f"inodes free; quotas: not checked (no cheap portable way: try `quota -s`, or "
              f"`lfs quota -u $USER DIR` on Lustre)"]
    return lines


def between_report(between: Between, peer: bool) -> List[str]:
    """What the two sides measured together."""
    locks, holder, tester = between.locks, between.first_side, between.second_side
    where = ("started here by --peer: this checks only this machine's view of the directory"
             if peer else f"on {between.peer.mount}")
    lines = [f"  this side: {between.this}; the other side: {between.peer}, {where}"]
    if not peer and between.this.host == between.peer.host:
        lines.append(f"  note: both sides report host {between.this.host}: if they ran on one machine, this "
                     f"checked only that machine's view of the directory")
    lines += [_latency_line("this side", between.this), _latency_line("the other side", between.peer)]
    if locks.refused:
        lines.append(f"  lockf: REFUSED ({locks.holder_refused or 'granted'} on {holder}, "
                     f"{locks.tester_refused or 'granted'} on {tester})")
    elif not locks.excluded:
        lines.append(f"  lockf: a lock held on {holder} did NOT exclude {tester}: its try-lock was granted")
    elif locks.retaken_after is None:
        lines.append(f"  lockf: a lock held on {holder} excluded {tester}, but after its release {tester} "
                     f"could NOT take it within {locks.retake_waited:g} s")
    else:
        lines.append(f"  lockf: a lock held on {holder} excluded {tester}: yes; after its release {tester} "
                     f"took it in {_ms(locks.retaken_after)}")
    lines.append(f"  write to visible ({holder.writes} on {holder}, {tester.reads} on {tester}, and back): "
                 + _visibility(between))
    return lines


def verdict(findings: Findings, choice: Choice) -> List[str]:
    """One FAIL line per reason the tunnel cannot work in the directory; empty if it can."""
    problems = []
    if findings.local.unsafe:
        problems.append(f"FAIL: {findings.local.unsafe}")
    if choice.mode is None:
        problems.append(f"FAIL: the tunnel cannot work in {findings.local.directory}: {choice.measured}. "
                        f"Fix: {fix(choice, findings.local.mount)}")
    return problems


def ok_lines(findings: Findings, choice: Choice, peer: bool) -> List[str]:
    """The verdict when the tunnel can work: the mode and why, a way to mode locks."""
    if choice.mode == LOCKS:
        lines = [f"mode: locks ({choice.measured}: a peer whose process dies is noticed within about a "
                 f"second, by its freed lock)"]
    else:
        lines = [f"mode: lock-free ({choice.measured}: a peer that dies is noticed by its missing heartbeats, "
                 f"within the liveness timeout)",
                 f"  for mode locks (a dead peer noticed within a second): {fix(choice, findings.local.mount)}"]
    lines.append(f"OK: the tunnel can work in {findings.local.directory}")
    if peer:
        lines.append(f"  (checked on this machine only: run `fileforward doctor --tunnel-dir "
                     f"{findings.local.directory}` on both nodes at once to check between them)")
    return lines


def fix(choice: Choice, mount: Optional[Mount]) -> str:
    """What to change: for no mode, so that one works; for lock-free, so that locks
    exclude across nodes. The mount's own remedy if we know one, and the general one."""
    general = {NOT_VISIBLE: f"use a directory on {COHERENT}",
               DIRECT_REFUSED: f"use a directory on a filesystem that accepts O_DIRECT reads, e.g. {COHERENT}"
               }.get(choice.cause, f"use a directory on {GLOBAL_LOCKS}")
    specific = _mount_fix(choice.cause, mount) if mount is not None else None
    return f"{specific}; or {general}" if specific else general


def _mount_fix(cause: Optional[str], mount: Mount) -> Optional[str]:
    if mount.fstype.startswith("nfs") and cause == LOCKS_LOCAL:
        local = [o for o in ("nolock", "local_lock") if mount.option(o) in ("", "posix", "all")]
        if local:
            return (f"mount with lock forwarding: without {' and '.join(local)} (here: "
                    f"{', '.join(f'{o}={mount.option(o)}'.rstrip('=') for o in local)}), i.e. local_lock=none")
        return "mount with lock forwarding (no nolock, local_lock=none)"
    if mount.fstype.startswith("nfs") and cause == LOCKS_REFUSED:
        return ("NFSv3 needs its lock service (rpc.statd and lockd, on the client and the server), or "
                "mount with NFSv4; nolock would only make the locks node-local")
    if mount.fstype == "lustre" and cause in (LOCKS_LOCAL, LOCKS_REFUSED):
        return "mount the Lustre client with flock (not localflock or noflock)"
    if mount.fstype.startswith("beegfs") and cause in (LOCKS_LOCAL, LOCKS_REFUSED):
        return "BeeGFS: tuneUseGlobalFileLocks=true in the client configuration (beegfs-client.conf)"
    return None


def _latency_line(label: str, side: SideFacts) -> str:
    parts = [f"{side.reads if op == 'read' else op} {'refused' if seconds is None else _ms(seconds)}"
             for op, seconds in side.latency.items()]
    return f"  latency on {label} (median): {', '.join(parts)}"


def _visibility(between: Between) -> str:
    found = between.data
    if found.refused_by is not None:
        return f"O_DIRECT REFUSED on {between.side(found.refused_by)} (EINVAL at open)"
    times = found.round_trips
    if found.unseen_from is not None:
        return (f"a write on {between.side(found.unseen_from)} was NOT visible to {between.other(found.unseen_from)} "
                f"within {found.not_seen_after:g} s (after {len(times)} round trips that were)")
    median = statistics.median(times)
    return f"round trip median {_ms(median)} of {len(times)}, about {_ms(median / 2)} one way"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds >= 0.0001 else f"{seconds * 1000:.3f} ms"


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _size(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _print(lines: List[str]) -> None:
    print("\n".join(lines), flush=True)


def _start_peer(directory: Path, settings: Settings) -> subprocess.Popen:
    """The other side, on this machine: the same command without --peer."""
    argv = [sys.executable, "-m", "fileforward", "doctor", "--tunnel-dir", str(directory),
            "--wait", str(settings.wait), "--log-level", "WARNING"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _end_peer(helper: subprocess.Popen, finished: bool) -> None:
    """Let the --peer side finish (told to stop if we did not finish, or if it does
    not end in time; killed if it still will not); its stderr is logged if it failed."""
    if not finished:
        helper.terminate()
    try:
        _, errors = helper.communicate(timeout=PEER_EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        helper.terminate()
        try:
            _, errors = helper.communicate(timeout=PEER_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            helper.kill()
            _, errors = helper.communicate()
    if helper.returncode not in (0, 1):
        log.warning("the --peer side (pid %d) exited with status %d: %s", helper.pid, helper.returncode,
                    errors.strip() or "no message")
