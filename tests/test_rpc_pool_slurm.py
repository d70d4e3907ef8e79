"""slurm_examples/pool_map.py on the login node, pool_worker.sbatch workers under the
private SLURM, with --retries 0: a killed array task's task is reported lost.

(With --retries 1, a killed task and one ended by its time limit: in
test_slurm_examples.py, whose other tests run while the time limit's minute passes.)"""
import pytest

from test_slurm_examples import (cluster, kill_array_task, start_map, start_workers,  # noqa: F401
                                 when_both_work, ws)


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
