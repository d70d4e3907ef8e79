"""`fileforward doctor`, run as a real command: on a local directory with --peer, and
on the two emulated NFS nodes of tests/nfs_harness with one doctor on each node, in
each harness profile (locks that exclude: mode locks; node-local locks or locks
refused with ENOLCK: mode lock-free). The cases where no mode works (a write never
seen, O_DIRECT refused), which the harness cannot produce, are decided by
`choose_mode` from constructed findings."""
from __future__ import annotations

import errno
import json
import os
from concurrent.futures import ThreadPoolExecutor
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from fileforward.coherence import LOCK_FREE, LOCKS, DataPath, mount_of
from fileforward.doctor import fix, local_report, verdict
from fileforward import meeting
from fileforward.meeting import PROTOCOL, KeptOpen, Settings
from fileforward.probe import DIRECT_REFUSED, FIRST, LOCKS_LOCAL, LOCKS_REFUSED, NOT_VISIBLE, SECOND, Between, \
    Choice, Findings, Local, LockResult, SideFacts, Visibility, choose_mode, local_facts, measure_between
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
                     "  data path: plain reads and writes (a local filesystem: one page cache)",
                     "mode 0700: private", "  free space: ", "quotas: not checked",
                     "started here by --peer", "latency on this side (median): open ",
                     "latency on the other side (median): open ", "excluded host", ": yes; after its release",
                     "  write to visible (pwrite on host", ", read on host", "and back): round trip median ",
                     "mode: locks (a lockf lock held on host", "OK: the tunnel can work in %s" % directory):
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
    stale = {"protocol": PROTOCOL, "host": "gone", "pid": 1, "session": "doctor-0123456789abcdef"}
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
        local_report(Local(Path("/home/my home/you/t"), DataPath(True, True, mount), os.getuid(), 0o700, None,
                           0, 0, 0))
    assert (mount.fstype, mount.source, mount.mount_point) == ("nfs4", "srv:/export/home", "/home/my home")
    assert mount.option("local_lock") == "posix" and mount.option("hard") == "" and mount.option("nolock") is None
    assert mount.options[:3] == ("rw", "nosuid", "relatime") and mount.options.count("rw") == 1
    assert mount_of(Path("/home/other"), str(mountinfo)).fstype == "ext4"
    remedy = fix(Choice(LOCK_FREE, "a lockf lock ... did not exclude ...", LOCKS_LOCAL), mount)
    assert remedy.startswith("mount with lock forwarding: without local_lock (here: local_lock=posix)"), remedy
    assert "or use a directory on a filesystem whose locks are global" in remedy


@pytest.mark.parametrize("profile, knobs, mode", [
    (None, {}, LOCKS),                              # write-through NFS, locks forwarded
    ("nfs", {}, LOCKS),                             # write-behind
    ("nfs-local-locks", {}, LOCK_FREE),             # nolock / local_lock=posix
    ("beegfs", {}, LOCK_FREE),                      # node-local locks, flushed at fsync and close only
    ("nfs", {"locks_available": False}, LOCK_FREE),  # every lock ENOLCK, as NFSv3 without lockd
], ids=["default", "nfs", "nfs-local-locks", "beegfs", "nfs-enolck"])
def test_two_nodes_choose_the_mode_their_locks_allow(make_two_nodes, profile, knobs, mode) -> None:
    """One doctor per emulated node: both read with O_DIRECT and see the other's fsynced
    writes (timed), report the lock test, and print the same mode: locks where locks
    exclude across the nodes, lock-free where they are node-local or refused (not an
    error: exit 0, with the way to mode locks). Nothing is left behind."""
    pair = make_two_nodes(profile, **knobs)
    lock_line = {None: ": yes; after its release", "nfs": ": yes; after its release",
                 "nfs-local-locks": "did NOT exclude", "beegfs": "did NOT exclude"}[profile]
    if knobs:
        lock_line = "lockf: REFUSED (ENOLCK on host"
    for status, output in run_on_both_nodes(pair):
        assert status == 0, output
        assert lines_with(output, "  filesystem: fuse (nfs_harness)"), output
        assert lines_with(output, "  data path: O_DIRECT reads, fsynced writes (a shared filesystem)"), output
        assert lines_with(output, "latency on this side", " O_DIRECT read ", " ms"), output
        assert lines_with(output, "  lockf: ", lock_line), output
        assert lines_with(output, "  write to visible (pwrite+fsync on host", ", O_DIRECT read on host",
                          "and back): round trip median ", " of 5, about "), output
        modes = lines_with(output, "mode: ")
        assert len(modes) == 1 and modes[0].startswith(f"mode: {mode} ("), output
        assert bool(lines_with(output, "  for mode locks (a dead peer noticed within a second): use a directory "
                                       "on a filesystem whose locks are global")) == (mode == LOCK_FREE), output
        assert lines_with(output, "OK: the tunnel can work in "), output
        assert "FAIL" not in output
    assert_cleaned(pair.backing / "dir")


def side(pid: int) -> SideFacts:
    return SideFacts(host=f"node{pid}", pid=pid, mount="nfs4 srv:/home at /home ()", direct=True, latency={})


def findings_of(locks: LockResult, data: Visibility, directory: Path = Path("/home/you/t")) -> Findings:
    """What node1 (the first side, the lock holder) found with node2."""
    local = Local(directory, DataPath(True, True, None), os.getuid(), 0o700, None, 0, 0, 0)
    return Findings(local, Between(first=True, this=side(1), peer=side(2), locks=locks, data=data))


EXCLUDED = LockResult(excluded=True, retaken_after=0.001)
SEEN = Visibility(round_trips=[0.004] * 5)


@pytest.mark.parametrize("locks, mode, cause", [
    (EXCLUDED, LOCKS, None),
    (LockResult(excluded=False), LOCK_FREE, LOCKS_LOCAL),
    (LockResult(excluded=True, retake_waited=10.0), LOCK_FREE, LOCKS_LOCAL),
    (LockResult(tester_refused="ENOLCK"), LOCK_FREE, LOCKS_REFUSED),
], ids=["exclude", "node-local", "not-retaken", "refused"])
def test_locks_choose_between_the_modes(locks, mode, cause) -> None:
    """With a working data path, the lock test alone decides: locks or lock-free, never none."""
    choice = choose_mode(findings_of(locks, SEEN))
    assert (choice.mode, choice.cause) == (mode, cause), choice
    assert verdict(findings_of(locks, SEEN), choice) == []


def test_a_write_never_seen_rules_out_every_mode() -> None:
    """Writes from node2 never reach node1's O_DIRECT reads: no mode, even with locks
    that exclude; one FAIL line names the directory, what was measured and the fix."""
    found = findings_of(EXCLUDED, Visibility(round_trips=[0.004] * 2, unseen_from=SECOND, not_seen_after=10.0))
    choice = choose_mode(found)
    assert (choice.mode, choice.cause) == (None, NOT_VISIBLE)
    assert verdict(found, choice) == [
        "FAIL: the tunnel cannot work in /home/you/t: a write (pwrite+fsync, descriptor kept open) on host node2 "
        "(pid 2) never became visible to the O_DIRECT read on host node1 (pid 1) (waited 10 s; 2 earlier round "
        "trips were seen). Fix: use a directory on a filesystem that is coherent between nodes (NFS, GPFS, "
        "Lustre, BeeGFS)"]


def test_o_direct_refused_rules_out_every_mode() -> None:
    """O_DIRECT refused (EINVAL at open) on a shared filesystem: no mode; the FAIL line says where."""
    found = findings_of(LockResult(excluded=False), Visibility(refused_by=SECOND))
    choice = choose_mode(found)
    assert (choice.mode, choice.cause) == (None, DIRECT_REFUSED)
    fails = verdict(found, choice)
    assert len(fails) == 1 and fails[0].startswith(
        "FAIL: the tunnel cannot work in /home/you/t: O_DIRECT reads are refused on host node2 (pid 2) (EINVAL "
        "at open)"), fails
    assert fails[0].endswith("Fix: use a directory on a filesystem that accepts O_DIRECT reads, e.g. a "
                             "filesystem that is coherent between nodes (NFS, GPFS, Lustre, BeeGFS)"), fails


def test_a_doctor_of_another_protocol_is_named(tmp_path: Path) -> None:
    """A meeting file written by a doctor of protocol 1 (before the data path
    measure): one FAIL line naming both protocols and the fix, exit 1, no hang."""
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    old = {"protocol": 1, "host": "login1", "pid": 7, "session": "doctor-0123456789abcdef"}
    (directory / "doctor.meet").write_text(json.dumps(old) + "\n")
    status, output = run_doctor("--tunnel-dir", str(directory), "--wait", "5")
    assert status == 1, output
    assert lines_with(output, f"FAIL: could not measure {directory} between the two sides: the doctor waiting "
                              f"in {directory} (host login1, pid 7) speaks protocol 1, this one {PROTOCOL}: run "
                              f"the same fileforward version on both sides"), output


@pytest.mark.parametrize("lost, unseen_from", [(b'"ping"', FIRST), (b'"pong"', SECOND)], ids=["ping", "pong"])
def test_both_sides_agree_on_a_write_never_seen(tmp_path: Path, monkeypatch, lost: bytes, unseen_from: str) -> None:
    """The two sides (threads of this process, on a real directory) measure the data
    path while one direction's writes are lost, as on a filesystem where they never
    become visible (the harness cannot make one): after the answer timeout both
    sides name the same writer whose write was not seen, and no mode is chosen."""
    real_write = KeptOpen.write

    def losing_write(carrier: KeptOpen, offset: int, data: bytes) -> None:
        if lost not in data:
            real_write(carrier, offset, data)

    monkeypatch.setattr(KeptOpen, "write", losing_write)
    for between in measure_on_two_threads(tmp_path / "dir", Settings(wait=RUN_TIMEOUT, answer_timeout=1.0,
                                                                     samples=3)):
        assert (between.data.unseen_from, between.data.not_seen_after, between.data.round_trips) == \
            (unseen_from, 1.0, []), between.data
        choice = choose_mode(Findings(local_facts(tmp_path / "dir"), between))
        assert (choice.mode, choice.cause) == (None, NOT_VISIBLE), choice
    assert_cleaned(tmp_path / "dir")


def test_both_sides_agree_on_o_direct_refused(tmp_path: Path, monkeypatch) -> None:
    """The second side's O_DIRECT open of the first side's data file fails with EINVAL
    (as on a filesystem that refuses O_DIRECT; here, on local disk, it cannot):
    both sides report it on the second side, and no mode is chosen."""
    real_open_file = meeting.open_file

    def refusing(path: Path, how: str, direct: bool = False) -> int:
        if path.name == "first.data" and how == "read":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open_file(path, how, direct)

    monkeypatch.setattr(meeting, "open_file", refusing)
    for between in measure_on_two_threads(tmp_path / "dir", Settings(wait=RUN_TIMEOUT, answer_timeout=5.0)):
        assert between.data == Visibility(refused_by=SECOND), between.data
        choice = choose_mode(Findings(local_facts(tmp_path / "dir"), between))
        assert (choice.mode, choice.cause) == (None, DIRECT_REFUSED), choice
    assert_cleaned(tmp_path / "dir")


def measure_on_two_threads(directory: Path, settings: Settings) -> List[Between]:
    """measure_between by two threads of this process on a new `directory`: both
    sides' results, the first side's first."""
    directory.mkdir(mode=0o700)
    local = local_facts(directory)
    with ThreadPoolExecutor(2) as pool:
        sides = list(pool.map(lambda _: measure_between(directory, local, settings), range(2)))
    assert sorted(between.first for between in sides) == [False, True]
    return sorted(sides, key=lambda between: not between.first)
