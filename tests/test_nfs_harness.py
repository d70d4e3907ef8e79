"""Self-test of the two-node NFS emulation: it must show what NFS shows (stale caches,
cross-node lock exclusion, coherence through locks, write-behind), what node-local
locks and BeeGFS show, and catch what it exists to catch."""
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
from tests.nfs_harness.mounts import is_mounted
from tests.nfs_harness.probes import WIDTH
from tests.nfs_harness.writeback import WriteCache
from tests.polling import wait_until

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


class _Session:
    """A `session` probe on one node: one command in, one line of answer out."""

    def __init__(self, nodes, node: str, path: Path) -> None:
        self.process = _probe(nodes, node, "session", str(path))

    def __call__(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().rstrip("\n")


@pytest.mark.parametrize("profile, refreshed", [
    (None, True), ("nfs-local-locks", True), ("beegfs", False),
], ids=["nfs", "nfs-local-locks", "beegfs"])
def test_a_granted_lock_refreshes_a_stale_open_file_except_on_beegfs(make_two_nodes, profile, refreshed):
    """A granted lock refreshes the file, whether locks are forwarded or node-local,
    but not on BeeGFS."""
    two_nodes = make_two_nodes(profile, attr_timeout=30.0)  # stale for sure, however slow the machine
    (two_nodes.a / "f").write_bytes(b"x" * 10)
    fd_b = os.open(two_nodes.b / "f", os.O_RDWR)
    assert os.fstat(fd_b).st_size == 10
    fd_a = os.open(two_nodes.a / "f", os.O_RDWR)
    os.pwrite(fd_a, b"y" * 20, 10)
    os.fsync(fd_a)
    assert os.fstat(fd_b).st_size == 10, "node B should trust its attribute cache"
    assert os.pread(fd_b, 100, 0) == b"x" * 10
    fcntl.lockf(fd_b, fcntl.LOCK_SH)
    if refreshed:
        assert os.fstat(fd_b).st_size == 30
    assert (os.pread(fd_b, 100, 0) == b"x" * 10 + b"y" * 20) == refreshed, \
        "node B's cached page should be dropped by the lock exactly where locks refresh"


def test_writes_go_through_without_write_behind(two_nodes):
    writer = _Session(two_nodes, "a", two_nodes.a / "f")
    reader = _Session(two_nodes, "b", two_nodes.b / "f")
    assert writer("lock") == "ok" and writer("write data") == "ok"
    assert (two_nodes.backing / "f").read_bytes() == b"data"
    assert reader("read") == "=data"


@pytest.mark.parametrize("profile, still_held_after, flush", [
    ("nfs", [], "fsync"),
    ("nfs", [], "unlock"),
    ("nfs", [], "close"),
    ("beegfs", ["unlock"], "close"),
    ("beegfs", ["unlock"], "fsync"),
], ids=["nfs-fsync", "nfs-unlock", "nfs-close", "beegfs-unlock-then-close",
        "beegfs-unlock-then-fsync"])
def test_write_behind_hides_a_write_from_the_other_node_until_flushed(
        make_two_nodes, profile, still_held_after, flush):
    nodes = make_two_nodes(profile, latency_ms=0)
    writer = _Session(nodes, "a", nodes.a / "f")
    neighbour = _Session(nodes, "a", nodes.a / "f")  # another process on node A
    reader = _Session(nodes, "b", nodes.b / "f")
    for step in ["lock", "write data", *still_held_after]:
        assert writer(step) == "ok"
    assert neighbour("read") == "=data", "a mount must see its own held writes"
    assert reader("read") == "=", "node B saw node A's write before A flushed it"
    assert (nodes.backing / "f").read_bytes() == b""
    assert writer(flush) == "ok"
    assert (nodes.backing / "f").read_bytes() == b"data"
    assert reader("read") == "=data"


def test_write_behind_holds_writes_per_mount_and_writes_them_back_in_order(tmp_path):
    """The held-write overlay itself, on a plain file: reads see held writes over the
    server's bytes (holes read as zeros), the server sees nothing until write-back,
    and too much held data is written back on its own."""
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    key = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    cache = WriteCache(hold=True, dirty_limit=100)
    assert cache.write(key, fd, b"abc", 2) == 0
    assert cache.write(key, fd, b"def", 5) == 0   # contiguous: merged into one extent
    assert cache.write(key, fd, b"X", 3) == 0     # over a held write: later one wins
    assert cache.write(key, fd, b"end", 14) == 0  # past the end, leaving a hole
    expected = b"01aXcdef89" + bytes(4) + b"end"
    assert cache.read(fd, key, 100, 0) == expected
    assert cache.read(fd, key, 4, 12) == b"\0\0en"
    assert cache.size(key, 10) == 17
    assert path.read_bytes() == b"0123456789"
    assert cache.write_back(key) == 3  # two extents merged: three WRITE requests
    assert path.read_bytes() == expected
    assert cache.size(key, 10) == 10 and cache.write_back(key) == 0
    assert cache.write(key, fd, b"x" * 101, 0) == 1  # over the dirty limit
    assert path.read_bytes() == b"x" * 101
    os.close(fd)


def test_node_local_locks_exclude_on_one_mount_only(make_two_nodes):
    nodes = make_two_nodes(lock_forwarding=False)
    holder = _probe(nodes, "a", "hold", str(nodes.a / "f"), "0", "0")
    _expect_line(holder, "locked")
    fd_a = os.open(nodes.a / "f", os.O_RDWR)
    assert not _try_lock(fd_a, 0, 1), "processes on one node must still exclude each other"
    other_node = _probe(nodes, "b", "lock", str(nodes.b / "f"), "0", "0")
    _expect_line(other_node, "trying")
    _expect_line(other_node, "locked")
    assert other_node.wait(DEADLINE) == 0
    holder.stdin.close()
    assert holder.wait(DEADLINE) == 0
    wait_until(lambda: _try_lock(fd_a, 0, 1), DEADLINE, what="the lock to be free once its holder is gone")
    assert nodes.requests("a")["lock"] == nodes.requests("b")["lock"] == 0, \
        "a node-local lock is no request to the server"


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
    wait_until(lambda: (two_nodes.b / "late").exists(), DEADLINE,
               what="node B to see the file once its negative lookup expired")
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
    wait_until(lambda: _try_lock(fd, 0, 1), DEADLINE, what="the lock to be free once its holder is gone")


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
    wait_until(lambda: _try_lock(fd_a, *ALIVE), DEADLINE, what="a dead process's lock to go away")
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
    wait_until(lambda: two_nodes.requests("b").get("lock", 0) - locks_before >= 200, DEADLINE,
               what="200 lock requests counted on node B")
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


@pytest.mark.parametrize("profile, knobs, exact", [
    (None, {}, True),
    ("nfs", {}, True),
    (None, {"lock_forwarding": False}, False),
    ("nfs-local-locks", {}, False),
    ("beegfs", {}, False),
    (None, {"lock_invalidation": False}, False),
    ("nfs", {"lock_flush": False}, False),
], ids=["nfs-write-through", "nfs-write-behind", "no-lock-forwarding", "nfs-local-locks",
        "beegfs", "no-lock-invalidation", "write-behind-no-lock-flush"])
def test_lost_update_counter(make_two_nodes, profile, knobs, exact):
    """Lock, read, add one, write, unlock: exact where locks exclude across nodes
    and carry the data (NFS), lossy where either fails."""
    nodes = make_two_nodes(profile, **knobs)
    per_node, times = 3, 60
    expected = 2 * per_node * times
    counted = _count_across_nodes(nodes, per_node, times)
    print(f"{profile} {knobs}: expected {expected}, counted {counted}")
    if exact:
        assert counted == expected
    else:
        assert counted < expected, "the harness failed to expose a missing NFS rule"


def test_cli_mounts_runs_on_b_and_unmounts(tmp_path):
    require_nfs_harness()
    a, b, backing = tmp_path / "a", tmp_path / "b", tmp_path / "backing"
    cli = subprocess.Popen(
        [sys.executable, "-m", "tests.nfs_harness", "mount", "--backing", str(backing),
         "--a", str(a), "--b", str(b), "--counters-dir", str(tmp_path), "--profile", "beegfs",
         "--latency-ms", "0", "--lock-flush"],
        stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = cli.stdout.readline()
            assert line, f"CLI exited early: {lines}"
            lines.append(line.strip())
        netns = next(x.split(": ", 1)[1] for x in lines if x.startswith("netns: "))
        options = next(x for x in lines if x.startswith("options: "))
        for knob in ("latency_ms=0.0", "write_behind=True", "lock_forwarding=False",
                     "lock_flush=True", "lock_invalidation=False"):  # the profile, overridden
            assert knob in options
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
