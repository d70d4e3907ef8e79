"""A program that never shuts its rpc.Pool down still exits at once, leaving no files;
its workers leave (cleanly when idle)."""
import subprocess
import sys

import pytest

from test_rpc_pool import DEADLINE, pool_dir, workers  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("rpc_env")

#: Makes a pool, waits for one worker, runs a task, leaves ``busy`` tasks running and
#: ``queued`` ones queued, and exits without shutdown() (the tasks travel by value).
FORGETFUL = """
import logging, sys, time, rpc
logging.basicConfig(format="%(levelname)s %(message)s")
pool = rpc.Pool(tunnel_dir=sys.argv[1])
busy, queued = int(sys.argv[2]), int(sys.argv[3])
while not pool.info()["workers"]:
    time.sleep(0.01)
assert pool.submit(sum, [1, 2]).result(60) == 3
for _ in range(busy + queued):
    pool.submit(time.sleep, 600)
while pool.info()["running"] < busy:
    time.sleep(0.01)
print("exiting", pool.info()["running"], pool.info()["queued"], flush=True)
"""


def run_forgetful(pool_dir, workers, busy, queued):
    program = subprocess.Popen([sys.executable, "-c", FORGETFUL, str(pool_dir), str(busy),
                                str(queued)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    worker = workers.start()
    try:
        out, err = program.communicate(timeout=DEADLINE)  # a hang fails here
    finally:
        program.kill()
    assert program.returncode == 0, err
    assert out == f"exiting {busy} {queued}\n"
    return err, worker


def test_a_pool_never_shut_down_with_tasks_left_exits_warning_and_leaves_no_files(
        pool_dir, workers):
    err, worker = run_forgetful(pool_dir, workers, busy=1, queued=2)
    assert (f"WARNING rpc.Pool at {pool_dir} was not shut down; shutting it down at exit: "
            f"2 queued task(s) cancelled, 1 running abandoned") in err, err
    assert "was lost while running" not in err  # abandoned by the pool, not lost
    assert workers.exit_code(worker) == 0
    assert "abandoning 1 running task(s)" in workers.log_of(worker)
    assert {p.name: p.stat().st_size for p in pool_dir.iterdir()} == {"server": 0}


def test_a_pool_never_shut_down_with_nothing_left_lets_its_idle_worker_leave_cleanly(
        pool_dir, workers):
    err, worker = run_forgetful(pool_dir, workers, busy=0, queued=0)
    assert "WARNING" not in err, err
    assert workers.exit_code(worker) == 0
    log = workers.log_of(worker)
    assert "closed; exiting" in log and "WARNING" not in log, log
    assert {p.name: p.stat().st_size for p in pool_dir.iterdir()} == {"server": 0}
