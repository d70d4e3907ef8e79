"""`fileforward doctor`, run as a real command: on a local directory with --peer, and
on the two emulated NFS nodes of tests/nfs_harness with one doctor on each node,
with locks that exclude, node-local locks, and locks refused (ENOLCK)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

from fileforward.doctor import fix, local_report
from fileforward.coherence import mount_of
from fileforward.probe import Choice, Local
from tests.tunnel_support import REPO_ROOT, Proc

DOCTOR = [sys.executable, "-m", "fileforward", "doctor"]
RUN_TIMEOUT = 60.0


def run_fileforward(*args: str) -> Tuple[int, str]:
    """`fileforward ARGS` on this machine: (exit status, stdout and stderr)."""
    done = subprocess.run([sys.executable, "-m", "fileforward", *args], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return done.returncode, done.stdout + done.stderr


def run_doctor(*args: str) -> Tuple[int, str]:
    return run_fileforward("doctor", *args)


def run_on_both_nodes(pair) -> List[Tuple[int, str]]:
    """A doctor on node A (on pair.a/dir) and one on node B (pair.b/dir), started together."""
    for_both = dict(cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True)
    started = [pair.run_on_a([*DOCTOR, "--tunnel-dir", str(pair.a / "dir")], **for_both),
               pair.run_on_b([*DOCTOR, "--tunnel-dir", str(pair.b / "dir")], **for_both)]
    outputs = [p.communicate(timeout=RUN_TIMEOUT)[0] for p in started]
    return [(p.returncode, output) for p, output in zip(started, outputs)]


def lines_with(output: str, *parts: str) -> List[str]:
    return [line for line in output.splitlines() if all(part in line for part in parts)]


def assert_cleaned(directory: Path) -> None:
    """Neither the meeting file nor a session directory is left."""
    assert sorted(os.listdir(directory)) == [], os.listdir(directory)


def test_peer_on_a_local_directory_chooses_locks(tmp_path: Path) -> None:
    """--peer on local disk: every measurement is reported, locks exclude, exit 0, and
    the doctor's files are gone afterwards."""
    directory = tmp_path / "dir"
    status, output = run_doctor("--tunnel-dir", str(directory), "--peer")
    assert status == 0, output
    for expected in ("fileforward doctor: %s" % directory, "  filesystem: ", "  mount options: ",
                     "mode 0700: private", "  free space: ", "quotas: not checked",
                     "started here by --peer", "latency on this side (median): open ",
                     "latency on the other side (median): open ", "excluded host", ": yes; after its release",
                     "fsync+close, read after a fresh open: visible; round trip",
                     "read under the lock on host", ": visible; write, announce, read, confirm median",
                     "mode: locks", "OK: the tunnel can work in %s" % directory):
        assert lines_with(output, expected), "no line with %r in:\n%s" % (expected, output)
    for operation in ("open", "write+fsync", "read", "lockf", "rename", "stat"):
        assert lines_with(output, "latency on this side", f"{operation} ", " ms"), output
    assert "FAIL" not in output
    assert_cleaned(directory)


def test_bad_permissions_are_reported(tmp_path: Path) -> None:
    """A directory writable by the group is measured, refused in one FAIL line with
    the fix, exit 1; its mode is left as it was. (`--tunnel-dir` given before the
    command counts too.)"""
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    directory.chmod(0o770)
    status, output = run_fileforward("--tunnel-dir", str(directory), "doctor", "--peer")
    assert status == 1, output
    assert lines_with(output, "mode 0770: REFUSED by the tunnel"), output
    fails = lines_with(output, "FAIL: ")
    assert fails == [f"FAIL: tunnel directory {directory} is writable by group or others (mode 770): anyone who "
                     f"can write there can inject data into your connections; fix it with: chmod 700 {directory}"]
    assert lines_with(output, "mode: locks") == [] and "OK:" not in output
    assert (directory.stat().st_mode & 0o777) == 0o770
    assert_cleaned(directory)


def test_a_directory_readable_by_others_gets_a_warning(tmp_path: Path) -> None:
    """Mode 0755: the tunnel accepts it (exit 0), the report says who can read it and the fix."""
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    directory.chmod(0o755)
    status, output = run_doctor("--tunnel-dir", str(directory), "--peer")
    assert status == 0, output
    assert lines_with(output, "mode 0755: accepted by the tunnel, but group or others can read what passes "
                              f"through it (fix: chmod 700 {directory})"), output


def test_alone_it_says_it_waits_then_gives_up(tmp_path: Path) -> None:
    """Without another side: it says it is waiting, then fails in one line naming the
    directory and what to do, and removes its meeting file and session."""
    directory = tmp_path / "dir"
    status, output = run_doctor("--tunnel-dir", str(directory), "--wait", "1")
    assert status == 1, output
    assert lines_with(output, "waiting up to 1 s for the other side", f"fileforward doctor --tunnel-dir {directory}")
    assert lines_with(output, f"FAIL: could not measure {directory} between the two sides: no other "
                              f"`fileforward doctor` came"), output
    assert_cleaned(directory)


def test_ctrl_c_while_waiting_removes_the_doctors_files(tmp_path: Path) -> None:
    """SIGINT while waiting for the other side: exit 130, meeting file and session removed."""
    directory = tmp_path / "dir"
    doctor = Proc([*DOCTOR, "--tunnel-dir", str(directory)])
    try:
        doctor.wait_for(lambda line: "waiting up to" in line)
        assert (directory / "doctor.meet").exists() and len(os.listdir(directory)) == 2
        doctor.signal(signal.SIGINT)
        assert doctor.popen.wait(RUN_TIMEOUT) == 130, doctor.output
    finally:
        doctor.kill()
    assert lines_with(doctor.output, "FAIL: interrupted"), doctor.output
    assert_cleaned(directory)


def test_a_meeting_file_left_by_a_killed_doctor_is_removed(tmp_path: Path) -> None:
    """A meeting file naming a session that no longer exists does not block the next run."""
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    stale = {"protocol": 1, "host": "gone", "pid": 1, "session": "doctor-0123456789abcdef"}
    (directory / "doctor.meet").write_text(json.dumps(stale) + "\n")
    status, output = run_doctor("--tunnel-dir", str(directory), "--peer")
    assert status == 0, output
    assert lines_with(output, "WARNING removing", "doctor.meet", "left by a doctor that is gone (host gone, pid 1)")
    assert_cleaned(directory)


def test_a_doctor_killed_while_waiting_does_not_block_the_next(tmp_path: Path) -> None:
    """SIGKILL leaves a meeting file and a session: the next pair (here --peer, whose
    two sides both find it) finds it silent, removes it within the answer timeout
    (10 s), meets afresh and measures; nothing is left."""
    directory = tmp_path / "dir"
    killed = Proc([*DOCTOR, "--tunnel-dir", str(directory)])
    killed.wait_for(lambda line: "waiting up to" in line)
    killed.kill()
    assert len(os.listdir(directory)) == 2  # doctor.meet and doctor-<id>/
    status, output = run_doctor("--tunnel-dir", str(directory), "--peer")
    assert status == 0, output
    assert lines_with(output, "mode: locks"), output
    assert_cleaned(directory)


def test_nfs_mount_options_give_the_fix(tmp_path: Path) -> None:
    """mountinfo parsing (blanks escaped, superblock options), and the NFS remedy
    naming the option that keeps locks node-local."""
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "40 22 0:50 / /home/my\\040home rw,nosuid,relatime shared:7 - nfs4 srv:/export/home "
        "rw,vers=4.2,hard,proto=tcp,timeo=600,acregmin=3,local_lock=posix,addr=10.0.0.1\n")
    mount = mount_of(Path("/home/my home/you/t"), str(mountinfo))
    assert "  options that decide locks and caching: vers=4.2, acregmin=3, local_lock=posix" in \
        local_report(Local(Path("/home/my home/you/t"), mount, os.getuid(), 0o700, None, 0, 0, 0))
    assert (mount.fstype, mount.source, mount.mount_point) == ("nfs4", "srv:/export/home", "/home/my home")
    assert mount.option("local_lock") == "posix" and mount.option("hard") == "" and mount.option("nolock") is None
    assert mount.options[:3] == ("rw", "nosuid", "relatime") and mount.options.count("rw") == 1
    assert mount_of(Path("/home/other"), str(mountinfo)).fstype == "ext4"
    remedy = fix(Choice(None, "a lockf lock ... did not exclude ...", "locks local"), mount)
    assert remedy.startswith("mount with lock forwarding: without local_lock (here: local_lock=posix)"), remedy
    assert "or use a directory on a filesystem whose locks are global" in remedy


def test_two_nodes_whose_locks_exclude_choose_locks(make_two_nodes) -> None:
    """One doctor per emulated NFS node, default knobs: both see the lock exclude the
    other node, writes visible both ways, mode locks, exit 0; nothing left behind."""
    pair = make_two_nodes()
    for status, output in run_on_both_nodes(pair):
        assert status == 0, output
        assert lines_with(output, "  filesystem: fuse (nfs_harness)"), output
        assert lines_with(output, "lockf: a lock held on", ": yes; after its release"), output
        assert lines_with(output, "writes made under a lockf lock on host", ": visible; write, announce, read, "
                                  "confirm median"), output
        assert lines_with(output, "mode: locks"), output
    assert_cleaned(pair.backing / "dir")


def test_two_nodes_with_node_local_locks_fail(make_two_nodes) -> None:
    """lock_forwarding=False (locks kept per node, as NFS `local_lock=posix`, Lustre
    `localflock`, BeeGFS by default): both doctors say the lock did not exclude the
    other node, in one FAIL line with the fix, and exit 1."""
    pair = make_two_nodes(lock_forwarding=False)
    for (status, output), directory in zip(run_on_both_nodes(pair), (pair.a / "dir", pair.b / "dir")):
        assert status == 1, output
        assert lines_with(output, "did NOT exclude", "its try-lock was granted"), output
        fails = lines_with(output, "FAIL: ")
        assert len(fails) == 1, output
        assert fails[0].startswith(f"FAIL: the tunnel cannot work in {directory}: a lockf lock held on host "), fails
        assert "did not exclude host" in fails[0] and "Fix: use a directory on a filesystem whose locks are " \
               "global across nodes" in fails[0], fails
        assert "mode: locks" not in output
    assert_cleaned(pair.backing / "dir")


def test_two_nodes_refusing_locks_fail(make_two_nodes) -> None:
    """locks_available=False (every lock ENOLCK, as NFSv3 without its lock service):
    both doctors report the refusal and exit 1."""
    pair = make_two_nodes(locks_available=False)
    for status, output in run_on_both_nodes(pair):
        assert status == 1, output
        assert lines_with(output, "lockf: REFUSED (ENOLCK on host"), output
        assert lines_with(output, "latency on this side", "lockf refused"), output
        fails = lines_with(output, "FAIL: ")
        assert len(fails) == 1 and "lockf locks are refused (ENOLCK on host" in fails[0], output
    assert_cleaned(pair.backing / "dir")


def test_two_nodes_whose_locks_do_not_refresh_caches_fail(make_two_nodes) -> None:
    """lock_invalidation=False (locks exclude, but a granted lock leaves the cache
    stale): the first read under the lock misses the other node's write; both
    doctors say so and exit 1."""
    pair = make_two_nodes(lock_invalidation=False)
    for status, output in run_on_both_nodes(pair):
        assert status == 1, output
        assert lines_with(output, "lockf: a lock held on", ": yes; after its release"), output
        assert lines_with(output, "read under the lock on host", ": LATE: a first read under the lock missed a "
                                  "write, which was seen"), output
        fails = lines_with(output, "FAIL: ")
        assert len(fails) == 1 and "was missed by the first read under the lock on host" in fails[0], output
    assert_cleaned(pair.backing / "dir")
