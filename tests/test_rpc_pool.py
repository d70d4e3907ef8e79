"""rpc.Pool with real `python -m rpc worker` processes on a local tunnel directory.

The tasks below travel by value (this module is registered with cloudpickle), as
a notebook's functions would: the workers cannot import this module.
"""
import asyncio
import concurrent.futures as cf
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

import rpc
import rpc.frames as rpc_frames
from rpc.progress import MapProgress
from rpc_helpers import CliServer
from test_readme import BLOCK_TIMEOUT, BLOCKS, assert_ran, block_env, run_block
from test_slurm_examples import EXAMPLES, cluster, no_slurm_env, ws  # noqa: F401 (fixtures)
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Generous: the test machines are loaded.
DEADLINE = 30.0


# ------------------------------------------------------------------ tasks (run on workers)

def square_and_pid(x):
    time.sleep(0.05)  # long enough that one worker cannot take every task alone
    return x * x, os.getpid()


class TaskError(ValueError):
    pass


def fail_once_counted(log_path):
    with open(log_path, "a") as log:
        log.write("ran\n")
    raise TaskError("the task's own error")


def stall_first_time(marker):
    """The first run announces itself and hangs; any later run returns its pid."""
    if os.path.exists(marker):
        return os.getpid()
    with open(marker, "w"):
        pass
    time.sleep(600)


def announce_then_finish(marker, seconds):
    with open(marker, "w"):
        pass
    time.sleep(seconds)
    return "finished"


# ------------------------------------------------------------------ helpers

class Workers:
    """`python -m rpc worker` subprocesses; killed at teardown if still running."""

    def __init__(self, pool_dir, log_dir, prefix=()):
        self.pool_dir = pool_dir
        self.log_dir = log_dir
        self.prefix = list(prefix)  # runs them on another node (tests/conftest.py Node)
        self.procs = []

    def start(self, *flags, env=None):
        log = open(self.log_dir / f"worker{len(self.procs)}.log", "w")
        proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "rpc", "worker", "--pool", str(self.pool_dir),
             *flags],
            stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, **(env or {})})
        log.close()
        proc.log_path = log.name
        self.procs.append(proc)
        return proc

    def exit_code(self, proc):
        """The worker's exit status; its log in the failure if it does not exit."""
        try:
            return proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {proc.pid} did not exit within {DEADLINE:g} s; "
                                 f"its log:\n{self.log_of(proc)}") from None

    def log_of(self, proc):
        with open(proc.log_path) as log:
            return log.read()

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def pool_dir(tmp_path):
    return tmp_path / "pool"


@pytest.fixture
def workers(pool_dir, tmp_path):
    started = Workers(pool_dir, tmp_path)
    yield started
    started.stop_all()


def wait_for_workers(pool, count):
    wait_until(lambda: len(pool.info()["workers"]) == count, DEADLINE,
               what=f"{count} worker(s) attached")


def marker_path(tmp_path, name="started"):
    return str(tmp_path / name)


# ------------------------------------------------------------------ tests

def test_map_is_ordered_and_spread_over_two_workers(pool_dir, workers):
    with rpc.Pool(tunnel_dir=pool_dir) as pool:
        pids = {workers.start().pid, workers.start().pid}
        wait_for_workers(pool, 2)
        results = list(pool.map(square_and_pid, range(20), timeout=DEADLINE))
    assert [value for value, _ in results] == [x * x for x in range(20)]
    assert {pid for _, pid in results} == pids  # each worker ran some


def test_a_task_error_keeps_type_and_remote_traceback_and_is_never_retried(
        pool_dir, workers, tmp_path):
    runs = tmp_path / "runs"
    with rpc.Pool(tunnel_dir=pool_dir, retries=2) as pool:
        workers.start("--threads", "2", env={"SLURM_JOB_ID": "4242"})
        future = pool.submit(fail_once_counted, str(runs))
        with pytest.raises(TaskError, match="the task's own error") as caught:
            future.result(DEADLINE)
        # the next task runs only after the failed one was answered: a retry would be seen
        assert pool.submit(sum, [1, 2]).result(DEADLINE) == 3
    remote = str(caught.value.__cause__)
    assert "fail_once_counted" in remote and 'raise TaskError("the task\'s own error")' in remote
    assert "SLURM job 4242" in remote
    assert runs.read_text() == "ran\n"


def test_sigkilled_worker_loses_its_task_with_retries_0(pool_dir, workers, tmp_path):
    marker = marker_path(tmp_path)
    with rpc.Pool(tunnel_dir=pool_dir, retries=0) as pool:
        victim = workers.start(env={"SLURM_JOB_ID": "777"})
        future = pool.submit(stall_first_time, marker)
        wait_until(lambda: os.path.exists(marker), DEADLINE, what="the task to start")
        victim.kill()
        with pytest.raises(rpc.WorkerLost) as caught:
            future.result(DEADLINE)
        assert pool.info()["workers"] == []
    message = str(caught.value)
    assert "SLURM job 777" in message and f"pid {victim.pid}" in message
    assert "retries=0" in message


def test_sigkilled_worker_task_completes_on_a_later_worker_with_retries_1(
        pool_dir, workers, tmp_path, caplog):
    marker = marker_path(tmp_path)
    with rpc.Pool(tunnel_dir=pool_dir, retries=1) as pool:
        with caplog.at_level(logging.INFO, logger="rpc.pool"):
            future = pool.submit(stall_first_time, marker)  # no worker yet
            victim = workers.start()
            wait_until(lambda: os.path.exists(marker), DEADLINE, what="the task to start")
        victim.kill()
        rescuer = workers.start()  # joins late, mid-map
        assert future.result(DEADLINE) == rescuer.pid
    waiting = [r for r in caplog.records if "waiting for a worker" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].levelno == logging.INFO
    assert any("was lost while running task" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_sigterm_lets_the_running_task_finish_takes_no_new_one_and_exits_0(
        pool_dir, workers, tmp_path):
    marker = marker_path(tmp_path)
    with rpc.Pool(tunnel_dir=pool_dir) as pool:
        worker = workers.start("--grace", "30", "--threads", "2")  # one thread stays idle
        first = pool.submit(announce_then_finish, marker, 1.0)
        wait_until(lambda: os.path.exists(marker), DEADLINE, what="the task to start")
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: pool.info()["workers"][0]["leaving"], DEADLINE,
                   what="the worker to announce that it leaves")
        second = pool.submit(sum, [1, 2])  # its idle thread must not take it
        assert workers.exit_code(worker) == 0
        assert first.result(0) == "finished"  # answered before the worker exited
        assert not second.done() and pool.info()["queued"] == 1
        workers.start()
        assert second.result(DEADLINE) == 3
    assert "left the pool" in workers.log_of(worker)


def test_sigterm_hands_back_a_task_that_outlives_the_grace(pool_dir, workers, tmp_path, caplog):
    marker = marker_path(tmp_path)
    with rpc.Pool(tunnel_dir=pool_dir, retries=0) as pool:
        worker = workers.start("--grace", "0.5")
        future = pool.submit(stall_first_time, marker)
        wait_until(lambda: os.path.exists(marker), DEADLINE, what="the task to start")
        worker.send_signal(signal.SIGTERM)
        assert workers.exit_code(worker) == 0
        assert "handing them back" in workers.log_of(worker)
        assert pool.info()["queued"] == 1  # handed back, not lost: retries=0 does not apply
        rescuer = workers.start()
        assert future.result(DEADLINE) == rescuer.pid


def test_pool_exit_makes_workers_exit_and_leaves_no_files(pool_dir, workers):
    with rpc.Pool(tunnel_dir=pool_dir) as pool:
        started = [workers.start(), workers.start("--threads", "3")]
        wait_for_workers(pool, 2)
        assert pool.submit(sum, [4, 5]).result(DEADLINE) == 9
    for proc in started:
        assert workers.exit_code(proc) == 0
        log = workers.log_of(proc)
        assert "closed; exiting" in log and "WARNING" not in log  # a clean leave
    # the transport's empty server pointer stays (it anchors the lock); nothing else
    leftovers = {p.name: p.stat().st_size for p in pool_dir.iterdir()}
    assert leftovers == {"server": 0}


POOL_SCRIPT = """
import sys, time, rpc
with rpc.Pool(tunnel_dir=sys.argv[1]) as pool:
    while len(pool.info()["workers"]) < 2:
        time.sleep(0.05)
    print(pool.submit(sum, [1, 2]).result(60), flush=True)
    time.sleep(600)
"""


def test_workers_exit_when_the_pool_process_is_killed(pool_dir, workers):
    pool = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, str(pool_dir)],
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (pool_dir / "server").exists(), DEADLINE, what="the pool to serve")
        started = [workers.start(), workers.start()]
        assert pool.stdout.readline() == "3\n"  # both attached, and one ran a task
        pool.kill()
        for proc in started:  # locks exclude here: the death is seen within seconds
            assert workers.exit_code(proc) == 0
            assert "WARNING" in workers.log_of(proc) and "is gone" in workers.log_of(proc)
    finally:
        pool.kill()
        pool.wait(10)


def test_worker_without_a_pool_or_at_a_plain_rpc_server_exits_2_saying_so(pool_dir, workers):
    alone = workers.start("--join-timeout", "0.5")
    assert workers.exit_code(alone) == 2
    assert "cannot join the pool: ServerNotRunningError" in workers.log_of(alone)
    server = CliServer("--tunnel-dir", str(pool_dir))  # serves tests/rpc_funcs.py
    try:
        stray = workers.start()
        assert workers.exit_code(stray) == 2
        log = workers.log_of(stray)  # whichever of its first calls failed first
        assert re.search(r"is not an rpc\.Pool: no function '(attach|take)'", log), log
    finally:
        server.stop()


def test_a_take_that_times_out_answers_none_and_the_next_take_gets_a_task(pool_dir):
    """The worker's side of the calls, made by hand: an idle worker's take comes back
    empty when its long poll ends (it was left unanswered, and the worker deaf), and
    the worker's next take still gets the next task."""
    with rpc.Pool(tunnel_dir=pool_dir) as pool:
        with rpc.connect(tunnel_dir=pool_dir) as worker:
            attached = worker.submit("attach", "by-hand", {"host": "here", "pid": 0})
            wait_for_workers(pool, 1)
            assert worker.submit("take", "by-hand", 0.2).result(DEADLINE) is None
            future = pool.submit(sum, [1, 2])
            task_id, payload = worker.submit("take", "by-hand", DEADLINE).result(DEADLINE)
            fn, args, kwargs = rpc_frames.loads(payload)
            worker.call("done", "by-hand", task_id, True, rpc_frames.dumps(fn(*args)), None)
            assert future.result(DEADLINE) == 3
            attached.cancel()


def test_submit_after_shutdown_and_unpicklable_task_raise_at_once(pool_dir):
    pool = rpc.Pool(tunnel_dir=pool_dir)
    with pytest.raises(rpc.SerializationError, match="cannot pickle the task"):
        pool.submit(square_and_pid, threading.Lock())
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(sum, [1])


def test_map_progress_reports_done_failed_and_workers_on_stderr(pool_dir, workers, capsys):
    with rpc.Pool(tunnel_dir=pool_dir) as pool:
        workers.start()
        wait_for_workers(pool, 1)
        results = pool.map(square_and_pid, [1, 2, "x"], progress=True, timeout=DEADLINE)
        assert next(results)[0] == 1 and next(results)[0] == 4
        with pytest.raises(TypeError):
            next(results)
    lines = capsys.readouterr().err.splitlines()  # not a terminal: whole lines
    assert lines[-1].startswith("pool: 3/3 done, 1 failed, ")
    assert lines[-1].endswith("ETA -, workers 1 online / 0 busy")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_is_rewritten_in_place_in_a_terminal():
    loop = asyncio.new_event_loop()
    futures = [cf.Future() for _ in range(2)]
    terminal = Terminal()
    progress = MapProgress(futures, lambda: (3, 1), lambda: (), loop, terminal)
    progress.start()
    loop.run_until_complete(asyncio.sleep(0))
    futures[0].set_result(1)
    futures[1].set_exception(ValueError())
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    shown = terminal.getvalue()
    assert shown.count("\n") == 1 and shown.endswith("\n")  # one line, ended once done
    assert shown.startswith("\rpool: 0/2 done, 0 failed")
    assert "\rpool: 2/2 done, 1 failed" in shown and "workers 3 online / 1 busy" in shown


def test_readme_pool_block_runs_against_a_worker(tmp_path):
    """The README's pool block, as written, maps through a worker started as the
    README says (once the pool has created the key in the fresh HOME)."""
    name = "tests/test_rpc_pool.py::test_readme_pool_block_runs_against_a_worker"
    [block] = [b for b in BLOCKS if b.covered_by() == name]
    env = block_env(tmp_path)
    home = Path(env["HOME"])
    with cf.ThreadPoolExecutor(1) as runner:
        ran = runner.submit(run_block, block, tmp_path, env)
        wait_until(lambda: (home / ".cache/fileforward/rpc.key").exists() or ran.done(),
                   DEADLINE, what="the pool block to create the key")
        worker = subprocess.Popen([sys.executable, "-m", "rpc", "worker"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            result = ran.result(BLOCK_TIMEOUT + 10)
            assert worker.wait(DEADLINE) == 0
        finally:
            worker.kill()
            worker.communicate(timeout=10)
    out = assert_ran(block, result)
    assert out.startswith("49 [0, 1, 4, 9, 16]\n{'tunnel_dir': "), out
    assert "'completed': 101" in out and "'job': None" in out
    assert "pool: 100/100 done, 0 failed" in result.stderr


def test_across_nodes_map_and_a_killed_worker_rerun(nodes, tmp_path):
    """Pool on the login node, workers on the job node (on NFS: another mount, no
    shared network): an ordered map over two workers, then a SIGKILLed worker's task
    completes on the other with retries=1."""
    login, job = nodes
    workers = Workers(job.tunnel_dir, tmp_path, prefix=job.prefix)
    marker = marker_path(tmp_path)
    try:
        with rpc.Pool(tunnel_dir=login.tunnel_dir, retries=1) as pool:
            first, second = workers.start(), workers.start()
            wait_for_workers(pool, 2)
            results = list(pool.map(square_and_pid, range(10), timeout=DEADLINE))
            assert [value for value, _ in results] == [x * x for x in range(10)]
            future = pool.submit(stall_first_time, marker)
            wait_until(lambda: os.path.exists(marker), DEADLINE, what="the task to start")
            [busy] = [w for w in pool.info()["workers"] if w["running"]]
            victim, rescuer = (first, second) if busy["pid"] == first.pid else (second, first)
            victim.kill()
            assert future.result(DEADLINE) == rescuer.pid
        assert workers.exit_code(rescuer) == 0
    finally:
        workers.stop_all()


def tenfold_counted(x, log_path):
    with open(log_path, "a") as log:
        log.write(f"{x}\n")
    return x * 10


def test_cache_returns_stored_results_without_running_and_refresh_recomputes(
        pool_dir, workers, tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    with rpc.Pool(tunnel_dir=pool_dir, cache_dir=cache) as pool:
        workers.start()
        assert list(pool.map(tenfold_counted, range(3), [str(runs)] * 3, timeout=DEADLINE)) == [
            0, 10, 20]
    assert sorted(runs.read_text().split()) == ["0", "1", "2"]
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert len(entries) == 3 and not [p for p in entries if p.name.startswith(".tmp-")]
    assert oct(cache.stat().st_mode & 0o777) == "0o700"

    with rpc.Pool(tunnel_dir=pool_dir, cache_dir=cache) as pool:  # no worker at all
        assert pool.submit(tenfold_counted, 2, str(runs)).result(0) == 20
        assert pool.info()["workers"] == [] and runs.read_text().count("\n") == 3

    with rpc.Pool(tunnel_dir=pool_dir, cache_dir=cache, cache="refresh") as pool:
        workers.start()
        assert pool.submit(tenfold_counted, 2, str(runs)).result(DEADLINE) == 20
    assert runs.read_text().count("\n") == 4


def test_cache_dir_writable_by_others_is_refused(pool_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    with pytest.raises(PermissionError, match="chmod 700"):
        rpc.Pool(tunnel_dir=pool_dir, cache_dir=cache)


def test_ship_sends_a_local_module_by_value_and_asubmit_awaits(pool_dir, workers, tmp_path,
                                                               monkeypatch):
    (tmp_path / "local_science.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, not on the worker
    import local_science
    with rpc.Pool(tunnel_dir=pool_dir, ship=[local_science]) as pool:
        workers.start()
        assert asyncio.run(pool.asubmit(local_science.triple, 5)) == 15
    monkeypatch.delitem(sys.modules, "local_science")
    cloudpickle.unregister_pickle_by_value(local_science)


# ------------------------------------------------------------------ under SLURM

def test_pool_worker_sbatch_outside_slurm_says_how_to_run_it():
    result = subprocess.run(["bash", str(EXAMPLES / "pool_worker.sbatch")], env=no_slurm_env(),
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("pool_worker.sbatch: not in a SLURM job; run it with sbatch: "
                             "sbatch pool_worker.sbatch [WORKER OPTIONS]\n")


@pytest.mark.timeout(180)
def test_pool_worker_sbatch_array_maps_and_leaves_on_scancel_and_pool_exit(cluster, ws, tmp_path):
    """A job array of pool_worker.sbatch, as written: both tasks join (with their job
    ids), a map runs on them; scancel of one task makes it leave (exit 0) while the
    pool goes on with the other; the pool closing completes the job, leaving nothing."""
    pool_dir = Path(ws.env["HOME"]) / ".cache" / "fileforward" / "pool"
    key = str(tmp_path / "rpc.key")
    with rpc.Pool(tunnel_dir=pool_dir, key_file=key) as pool:
        job_id = cluster.sbatch(ws.examples / "pool_worker.sbatch", "--key-file", key,
                                options=["--array=0-1"], env=ws.env, cwd=ws.root)
        wait_until(lambda: len(pool.info()["workers"]) == 2, 120, what="both array tasks to join",
                   interval=0.2)
        joined = pool.info()["workers"]
        assert sorted(w["array_task"] for w in joined) == ["0", "1"]
        assert all(w["job"] and w["job"].isdigit() for w in joined)
        assert [v for v, _ in pool.map(square_and_pid, range(10), timeout=60)] == [
            x * x for x in range(10)]

        cluster.run(["scancel", f"{job_id}_0"])
        wait_until(lambda: [w["array_task"] for w in pool.info()["workers"]] == ["1"], 60,
                   what="array task 0 to leave")
        assert [v for v, _ in pool.map(square_and_pid, range(5), timeout=60)] == [
            x * x for x in range(5)]
    cluster.wait_finished(job_id, timeout=60)
    assert cluster.array_states(job_id) == {"0": "CANCELLED", "1": "COMPLETED"}
    first, second = (ws.root / f"pool-worker-{job_id}_{n}.out" for n in (0, 1))
    assert "left the pool" in first.read_text(), first.read_text()
    assert "closed; exiting" in second.read_text(), second.read_text()
    cluster.wait_no_job_processes(job_id)


@pytest.mark.timeout(180)
def test_pool_worker_sbatch_task_killed_mid_task_is_rerun_with_retries_1(cluster, ws, tmp_path):
    """SIGKILL of the array task running a task (no grace, as a node failure): the
    pool sees the loss, and the task completes on the other task's worker."""
    pool_dir = Path(ws.env["HOME"]) / ".cache" / "fileforward" / "pool"
    key, marker = str(tmp_path / "rpc.key"), marker_path(tmp_path)
    with rpc.Pool(tunnel_dir=pool_dir, key_file=key, retries=1) as pool:
        job_id = cluster.sbatch(ws.examples / "pool_worker.sbatch", "--key-file", key,
                                options=["--array=0-1"], env=ws.env, cwd=ws.root)
        wait_until(lambda: len(pool.info()["workers"]) == 2, 120, what="both array tasks to join",
                   interval=0.2)
        future = pool.submit(stall_first_time, marker)
        wait_until(lambda: os.path.exists(marker), DEADLINE, what="the task to start")
        [busy] = [w for w in pool.info()["workers"] if w["running"]]
        [idle] = [w for w in pool.info()["workers"] if not w["running"]]
        cluster.run(["scancel", "--batch", "--signal=KILL", f"{job_id}_{busy['array_task']}"])
        assert future.result(DEADLINE) == idle["pid"]
    cluster.wait_finished(job_id, timeout=60)
    states = cluster.array_states(job_id)
    assert states[idle["array_task"]] == "COMPLETED" and states[busy["array_task"]] != "COMPLETED"
    cluster.wait_no_job_processes(job_id)
