"""`python -m rpc status --pool D`: the pool's info from either node, as a client
that is no worker; a clear error where no pool runs."""
import json
import subprocess
import sys

import cloudpickle
import pytest

import rpc
from rpc_helpers import CliServer
from test_rpc_pool import DEADLINE, Workers, pool_dir, wait_for_workers  # noqa: F401
from test_rpc_pool_progress import report_then_wait
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run_status(*args, prefix=()):
    return subprocess.run([*prefix, sys.executable, "-m", "rpc", "status", *args],
                          capture_output=True, text=True, timeout=DEADLINE + 30)


def test_status_pool_from_the_job_node_shows_workers_tasks_and_progress_and_takes_nothing(
        nodes, tmp_path):
    login, job = nodes
    workers = Workers(job.tunnel_dir, tmp_path, prefix=job.prefix)
    release = str(tmp_path / "release")
    try:
        with rpc.Pool(tunnel_dir=login.tunnel_dir) as pool:
            worker = workers.start(env={"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4239",
                                        "SLURM_ARRAY_TASK_ID": "3"})
            running = pool.submit(report_then_wait, ["loading"], release)
            queued = pool.submit(sum, [1, 2])  # the one worker is busy: it stays queued
            wait_until(lambda: running.progress == "loading", DEADLINE,
                       what="the task's progress", seen=lambda: running.progress)

            shown = run_status("--pool", str(job.tunnel_dir), prefix=job.prefix)
            as_json = run_status("--pool", str(job.tunnel_dir), "--json", prefix=job.prefix)

            assert pool.info()["queued"] == 1 and len(pool.info()["workers"]) == 1
            open(release, "w").close()
            assert running.result(DEADLINE) == "released" and queued.result(DEADLINE) == 3
    finally:
        workers.stop_all()
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == (f"rpc.Pool at {login.tunnel_dir}: 1 worker(s), 1 queued, 1 running, "
                        f"0 completed, 0 failed")
    assert lines[1].endswith(f"pid {worker.pid}, SLURM job 4242 (array 4239_3), 1 thread: busy, "
                             f"task(s) 1 ('loading')"), lines
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    [described] = info["workers"]
    assert (info["queued"], info["running"], described["job"], described["progress"]) == (
        1, 1, "4242", {"1": "loading"})


def test_status_pool_where_none_runs_or_at_a_plain_server_exits_1_saying_what_to_do(pool_dir):
    missing = run_status("--pool", str(pool_dir), "--connect-timeout", "0.5")
    assert missing.returncode == 1 and missing.stdout == ""
    assert f"no rpc.Pool runs at {pool_dir}: nothing answered within 0.5 s" in missing.stderr
    assert f"start one there with rpc.Pool(tunnel_dir='{pool_dir}')" in missing.stderr

    server = CliServer("--tunnel-dir", str(pool_dir))
    try:
        plain = run_status("--pool", str(pool_dir))
    finally:
        server.stop()
    assert plain.returncode == 1
    assert f"the RPC server at {pool_dir} is not an rpc.Pool" in plain.stderr


def test_status_pool_with_another_transport_is_a_usage_error(pool_dir):
    both = run_status("--pool", str(pool_dir), "--tcp", "127.0.0.1:1")
    assert both.returncode == 2 and "--pool names the pool's directory" in both.stderr
