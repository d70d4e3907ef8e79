"""slurm_examples/pool_map.py on the login node, pool_worker.sbatch workers under the
private SLURM: one array task killed mid-map, another ended by its time limit."""
import sys
from pathlib import Path

import pytest

from rpc.poolstatus import pool_status
from test_slurm_examples import LoginProcess, cluster, ws  # noqa: F401 (fixtures)
from tests.polling import wait_until

#: The shortest time limit SLURM has is a minute; slurmctld enforces it at its next
#: periodic check, up to 30 s later (a second or two once restarted at the job's start).
TIME_LIMIT_END = 60 + 30 + 30  # and a margin for a loaded machine


def start_map(ws, key, *flags):
    """pool_map.py as on the login node; returns it once its pool has made the key."""
    pool_dir = ws.root / "pool"
    login = LoginProcess([sys.executable, str(ws.examples / "pool_map.py"), "--pool",
                          str(pool_dir), "--key-file", key, *flags], ws.env, ws.root,
                         ws.root / "pool_map.log")
    ws.logins.append(login)
    wait_until(lambda: Path(key).exists() and (pool_dir / "server").exists(), 60,
               what="the pool to start")
    return login, pool_dir


def start_workers(cluster, ws, pool_dir, key, *options, threads=1):
    return cluster.sbatch(ws.examples / "pool_worker.sbatch", "--pool", str(pool_dir),
                          "--key-file", key, "--threads", str(threads), options=list(options),
                          env=ws.env, cwd=ws.root)


def when_both_work(pool_dir, key, completed):
    """The pool's info once two array tasks are attached and ``completed`` tasks done."""
    def check():
        info = pool_status(pool_dir, key_file=key)
        return info if len(info["workers"]) == 2 and info["completed"] >= completed else None
    return wait_until(check, 120, what="two workers mid-map", interval=0.5)


def kill_array_task(cluster, job_id, task):
    """As a node failure would: SIGKILL, no grace."""
    cluster.run(["scancel", "--batch", "--signal=KILL", f"{job_id}_{task}"])


@pytest.mark.timeout(360)
def test_pool_map_completes_right_with_retries_1_despite_a_killed_and_a_timed_out_task(
        cluster, ws, tmp_path):
    """Task 0 is killed mid-map (its task runs again), task 1 runs until its time limit
    (SIGTERM: it finishes its task and leaves), then a late worker job finishes the
    map: 1000 right results, and the job states say what happened."""
    key = str(tmp_path / "rpc.key")
    login, pool_dir = start_map(ws, key, "--retries", "1", "--seconds", "0.15")
    array = start_workers(cluster, ws, pool_dir, key, "--array=0-1", "--time=1",
                          "--signal=B:TERM@0")  # no lead: the time limit's own SIGTERM
    cluster.time_limit_checks_after_start(array)
    when_both_work(pool_dir, key, completed=20)
    kill_array_task(cluster, array, 0)
    cluster.wait_finished(array, timeout=TIME_LIMIT_END)
    assert cluster.array_states(array) == {"0": "FAILED", "1": "TIMEOUT"}
    assert pool_status(pool_dir, key_file=key)["completed"] < 1000  # the map goes on
    late = start_workers(cluster, ws, pool_dir, key, "--array=0", threads=32)
    assert login.wait_exit(120) == 0, login.output()
    out = login.output()
    assert "1000 results, all right" in out, out
    assert f"{array}_0 " in out and f"{array}_1 " in out and f"{late}_0 " in out, out
    assert "was lost while running task" in out and "running it again (attempt 2 of 2)" in out
    timed_out = (ws.root / f"pool-worker-{array}_1.out").read_text()
    assert "stopping: no new task" in timed_out and "left the pool" in timed_out, timed_out
    cluster.wait_finished(late, timeout=60)
    assert cluster.state(late) == "COMPLETED"
    cluster.wait_no_job_processes()


@pytest.mark.timeout(180)
def test_pool_map_with_retries_0_reports_the_task_lost_with_its_killed_worker(
        cluster, ws, tmp_path):
    key = str(tmp_path / "rpc.key")
    login, pool_dir = start_map(ws, key, "--retries", "0", "--seconds", "0.15")
    array = start_workers(cluster, ws, pool_dir, key, "--array=0-1")
    info = when_both_work(pool_dir, key, completed=20)
    [victim] = [w for w in info["workers"] if w["array_task"] == "0"]
    kill_array_task(cluster, array, 0)
    assert login.wait_exit(60) == 1, login.output()
    out = login.output()
    assert "lost: task " in out, out
    assert f"pid {victim['pid']}, SLURM job {victim['job']} (array {array}_0) " in out, out
    assert "(retries=0); with --retries 1 it would run again" in out, out
    cluster.wait_finished(array, timeout=60)
    assert cluster.array_states(array) == {"0": "FAILED", "1": "COMPLETED"}  # killed by a signal
    cluster.wait_no_job_processes()
