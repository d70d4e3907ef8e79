"""Self-test of the two-node NFS emulation: it must show what NFS shows (stale caches,
cross-node lock exclusion, coherence through locks) and catch what it exists to catch."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from tests.extras import require_nfs_harness
from tests.nfs_harness.mounts import is_mounted, poll_until
from tests.nfs_harness.probes import WIDTH

PROBES = [sys.executable, "-m", "tests.nfs_harness.probes"]
DATA = (0, 2**40)          # the transport's data range ...
ALIVE = (2**40, 1)         # ... and its long-held "I am alive" byte
DEADLINE = 20.0


def _expect_line(process: subprocess.Popen, expected: str) -> None:
    line = process.stdout.readline().strip()
    assert line == expected, f"probe said {line!r}, expected {expected!r}"


def _expect_blocked(probe: subprocess.Popen) -> None:
    """The `lock` probe has started its F_SETLKW and is still waiting."""
    _expect_line(probe, "trying")
    with pytest.raises(subprocess.TimeoutExpired):
        probe.wait(0.3)


def _try_lock(fd: int, start: int, length: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
    except OSError as exc:
        assert exc.errno in (errno.EAGAIN, errno.EACCES)
        return False
    fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
    return True


def _probe(nodes, node: str, *args: str, **kwargs) -> subprocess.Popen:
    run = nodes.run_on_b if node == "b" else nodes.run_on_a
    return run([*PROBES, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs)


def test_both_mounts_show_one_directory(two_nodes):
    (two_nodes.a / "f").write_bytes(b"hello")
    assert (two_nodes.b / "f").read_bytes() == b"hello"
    assert (two_nodes.backing / "f").read_bytes() == b"hello"
    assert os.stat(two_nodes.a / "f").st_ino == os.stat(two_nodes.b / "f").st_ino
    assert sorted(os.listdir(two_nodes.b)) == ["f"]


def test_open_file_sees_stale_size_until_it_locks(make_two_nodes):
    two_nodes = make_two_nodes(attr_timeout=30.0)  # stale for sure, however slow the machine
    (two_nodes.a / "f").write_bytes(b"x" * 10)
    fd_b = os.open(two_nodes.b / "f", os.O_RDWR)
    assert os.fstat(fd_b).st_size == 10
    fd_a = os.open(two_nodes.a / "f", os.O_RDWR)
    os.pwrite(fd_a, b"y" * 20, 10)
    assert os.fstat(fd_b).st_size == 10, "node B should trust its attribute cache"
    assert os.pread(fd_b, 100, 0) == b"x" * 10
    fcntl.lockf(fd_b, fcntl.LOCK_SH)
    assert os.fstat(fd_b).st_size == 30
    assert os.pread(fd_b, 100, 0) == b"x" * 10 + b"y" * 20


def test_open_revalidates_cached_pages(two_nodes):
    (two_nodes.a / "f").write_bytes(b"old!")
    assert (two_nodes.b / "f").read_bytes() == b"old!"
    (two_nodes.a / "f").write_bytes(b"new!")
    assert (two_nodes.b / "f").read_bytes() == b"new!"  # close-to-open


def test_missing_name_stays_missing_for_the_negative_timeout(two_nodes):
    started = time.monotonic()
    assert not (two_nodes.b / "late").exists()
    (two_nodes.a / "late").write_bytes(b"1")
    assert not (two_nodes.b / "late").exists(), "node B should cache the negative lookup"
    assert poll_until(lambda: (two_nodes.b / "late").exists(), timeout=DEADLINE)
    assert time.monotonic() - started >= 0.9 * two_nodes.options.negative_timeout


def test_locks_exclude_across_mounts_by_range(two_nodes):
    (two_nodes.a / "f").write_bytes(b"")
    fd_a = os.open(two_nodes.a / "f", os.O_RDWR)
    fd_b = os.open(two_nodes.b / "f", os.O_RDWR)
    fcntl.lockf(fd_a, fcntl.LOCK_EX | fcntl.LOCK_NB, DATA[1], DATA[0])
    holder = _probe(two_nodes, "b", "hold", str(two_nodes.b / "f"), *map(str, ALIVE))
    _expect_line(holder, "locked")  # a different range is free
    assert not _try_lock(fd_a, *ALIVE)
    checker = _probe(two_nodes, "b", "lock", str(two_nodes.b / "f"), *map(str, DATA))
    _expect_blocked(checker)  # behind node A's data lock
    fcntl.lockf(fd_a, fcntl.LOCK_UN, DATA[1], DATA[0])
    _expect_line(checker, "locked")
    assert checker.wait(DEADLINE) == 0
    holder.stdin.close()
    assert holder.wait(DEADLINE) == 0
    assert _try_lock(fd_a, *ALIVE) and _try_lock(fd_b, *DATA)


def test_locks_exclude_processes_on_one_mount(two_nodes):
    path = two_nodes.a / "f"
    holder = _probe(two_nodes, "a", "hold", str(path), "0", "0")
    _expect_line(holder, "locked")
    fd = os.open(path, os.O_RDWR)
    assert not _try_lock(fd, 0, 1)
    holder.stdin.close()
    assert holder.wait(DEADLINE) == 0
    assert poll_until(lambda: _try_lock(fd, 0, 1), DEADLINE)


def test_killed_holder_and_killed_waiter_release_their_locks(two_nodes):
    path = two_nodes.b / "f"
    holder = _probe(two_nodes, "b", "hold", str(path), *map(str, ALIVE))
    _expect_line(holder, "locked")
    fd_a = os.open(two_nodes.a / "f", os.O_RDWR)
    assert not _try_lock(fd_a, *ALIVE)
    fcntl.lockf(fd_a, fcntl.LOCK_EX, DATA[1], DATA[0])
    waiter = _probe(two_nodes, "b", "lock", str(path), *map(str, DATA))
    _expect_blocked(waiter)
    holder.send_signal(signal.SIGKILL)
    waiter.send_signal(signal.SIGKILL)
    assert holder.wait(DEADLINE) == -signal.SIGKILL
    assert waiter.wait(DEADLINE) == -signal.SIGKILL  # an interrupted F_SETLKW returns
    assert poll_until(lambda: _try_lock(fd_a, *ALIVE), DEADLINE), "a dead process's lock must go away"
    fcntl.lockf(fd_a, fcntl.LOCK_UN, DATA[1], DATA[0])
    fd_b = os.open(path, os.O_RDWR)
    assert _try_lock(fd_b, *DATA), "the killed waiter must not have been granted the lock"


def test_rename_proceeds_while_a_lock_waiter_blocks(two_nodes):
    fd_a = os.open(two_nodes.a / "f", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd_a, fcntl.LOCK_EX)
    waiter = _probe(two_nodes, "b", "lock", str(two_nodes.b / "f"), "0", "0")
    _expect_blocked(waiter)
    started = time.monotonic()
    os.rename(two_nodes.b / "f", two_nodes.b / "g")
    assert time.monotonic() - started < 5.0
    os.close(fd_a)
    _expect_line(waiter, "locked")
    assert waiter.wait(DEADLINE) == 0


def test_renamed_file_keeps_its_lock(two_nodes):
    fd = os.open(two_nodes.a / "X.new", os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX, ALIVE[1], ALIVE[0])
    os.rename(two_nodes.a / "X.new", two_nodes.a / "X")
    fd_b = os.open(two_nodes.b / "X", os.O_RDWR)
    assert not _try_lock(fd_b, *ALIVE)
    os.close(fd)
    assert _try_lock(fd_b, *ALIVE)


def test_unlinked_open_file_stays_readable(two_nodes):
    (two_nodes.a / "f").write_bytes(b"data")
    fd_b = os.open(two_nodes.b / "f", os.O_RDWR)
    fcntl.lockf(fd_b, fcntl.LOCK_EX)
    os.unlink(two_nodes.a / "f")
    assert os.pread(fd_b, 10, 0) == b"data"
    fcntl.lockf(fd_b, fcntl.LOCK_UN)
    os.close(fd_b)


def test_many_blocked_waiters_do_not_hang_the_mount(two_nodes):
    path = two_nodes.a / "f"
    fd_a = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd_a, fcntl.LOCK_EX)
    locks_before = two_nodes.requests("b").get("lock", 0)
    waiters = _probe(two_nodes, "b", "waiters", str(two_nodes.b / "f"), "200")
    _expect_line(waiters, "waiting")
    # every waiter has asked for the lock (the mount counts a request before it blocks)
    assert poll_until(lambda: two_nodes.requests("b").get("lock", 0) - locks_before >= 200, DEADLINE)
    started = time.monotonic()
    (two_nodes.b / "other").write_bytes(b"still answering")
    assert time.monotonic() - started < 5.0
    os.close(fd_a)
    _expect_line(waiters, "done 200")
    assert waiters.wait(DEADLINE) == 0


def test_node_b_has_its_own_loopback(two_nodes):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = ("import socket,sys\ns=socket.socket(); s.settimeout(5)\n"
                "try:\n s.connect(('127.0.0.1', int(sys.argv[1])))\n"
                "except ConnectionRefusedError: print('refused')\nelse: print('connected')")
        probe = two_nodes.run_on_b([sys.executable, "-c", code, str(port)],
                                   stdout=subprocess.PIPE, text=True)
        assert probe.communicate(timeout=DEADLINE)[0].strip() == "refused"


def test_request_counters_count_per_mount(two_nodes):
    before_a, before_b = two_nodes.total_requests("a"), two_nodes.total_requests("b")
    fd = os.open(two_nodes.b / "f", os.O_RDWR | os.O_CREAT)
    for _ in range(5):
        fcntl.lockf(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_UN)
    os.close(fd)
    assert two_nodes.requests("b")["lock"] >= 10
    assert two_nodes.total_requests("b") - before_b >= 12
    assert two_nodes.total_requests("a") == before_a


def _count_across_nodes(nodes, per_node: int, times: int) -> int:
    """Run the lost-update counter on both nodes; return the final count."""
    workers: List[subprocess.Popen] = []
    for node, mount in (("a", nodes.a), ("b", nodes.b)):
        workers += [_probe(nodes, node, "count", str(mount / "counter"), str(times))
                    for _ in range(per_node)]
    for worker in workers:
        _expect_line(worker, "ready")
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    for worker in workers:
        assert worker.wait(90) == 0
    return int((nodes.backing / "counter").read_bytes()[:WIDTH] or b"0")


@pytest.mark.parametrize("knobs, exact", [
    ({}, True),
    ({"lock_forwarding": False}, False),
    ({"lock_invalidation": False}, False),
], ids=["nfs-semantics", "no-lock-forwarding", "no-lock-invalidation"])
def test_lost_update_counter(make_two_nodes, knobs, exact):
    nodes = make_two_nodes(**knobs)
    per_node, times = 3, 60
    expected = 2 * per_node * times
    counted = _count_across_nodes(nodes, per_node, times)
    print(f"{knobs or 'NFS semantics'}: expected {expected}, counted {counted}")
    if exact:
        assert counted == expected
    else:
        assert counted < expected, "the harness failed to expose a missing NFS rule"


def test_cli_mounts_runs_on_b_and_unmounts(tmp_path):
    require_nfs_harness()
    a, b, backing = tmp_path / "a", tmp_path / "b", tmp_path / "backing"
    cli = subprocess.Popen(
        [sys.executable, "-m", "tests.nfs_harness", "mount", "--backing", str(backing),
         "--a", str(a), "--b", str(b), "--counters-dir", str(tmp_path), "--latency-ms", "0"],
        stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = cli.stdout.readline()
            assert line, f"CLI exited early: {lines}"
            lines.append(line.strip())
        netns = next(x.split(": ", 1)[1] for x in lines if x.startswith("netns: "))
        (a / "hello").write_bytes(b"from A")
        out = subprocess.run(
            [sys.executable, "-m", "tests.nfs_harness", "exec-b", "--netns", netns, "--",
             "cat", str(b / "hello")], capture_output=True, timeout=DEADLINE)
        assert out.stdout == b"from A"
        stats = subprocess.run(
            [sys.executable, "-m", "tests.nfs_harness", "stats", str(tmp_path / "requests_b.bin")],
            capture_output=True, timeout=DEADLINE, check=True)
        assert json.loads(stats.stdout)[str(tmp_path / "requests_b.bin")]["read"] >= 1
    finally:
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(DEADLINE) == 0
    assert not is_mounted(a) and not is_mounted(b)
    assert Path(f"/run/netns/{netns}").exists() is False
