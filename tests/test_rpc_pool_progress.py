"""``rpc.report_progress``: a task on a real worker reports, the caller sees it
(``future.progress``, ``pool.info()``, the map's line); updates are throttled."""
import asyncio
import os
import sys
import threading
import time

import cloudpickle
import pytest

import rpc
from rpc.progress import MapProgress
from rpc.taskprogress import DEFAULT_INTERVAL, ProgressReporter
from test_rpc_pool import (DEADLINE, Terminal, Workers, pool_dir, wait_for_workers,  # noqa: F401
                           workers)
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wait_for_file(path):
    while not os.path.exists(path):
        time.sleep(0.01)


def report_then_wait(steps, release):
    """Reports each step, then holds until ``release`` exists."""
    for step in steps:
        rpc.report_progress(step)
    wait_for_file(release)
    return "released"


def report_in_a_tight_loop(seconds, release):
    """Reports as fast as it can for ``seconds``, then "last", then holds."""
    calls, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        rpc.report_progress(calls % 1000 / 1000)
        calls += 1
    rpc.report_progress("last")
    wait_for_file(release)
    return calls


def test_progress_reaches_the_future_and_info_while_the_task_runs(nodes, tmp_path):
    """Pool on the login node, its worker on the job node (local, and across NFS)."""
    login, job = nodes
    workers = Workers(job.tunnel_dir, tmp_path, prefix=job.prefix)
    release = str(tmp_path / "release")
    try:
        with rpc.Pool(tunnel_dir=login.tunnel_dir) as pool:
            workers.start()
            future = pool.submit(report_then_wait, [0.25, "loading the data"], release)
            assert isinstance(future, rpc.PoolFuture)
            wait_until(lambda: future.progress == "loading the data", DEADLINE,
                       what="the task's latest progress", seen=lambda: future.progress)
            [worker] = pool.info()["workers"]
            assert worker["progress"] == {worker["running"][0]: "loading the data"}
            open(release, "w").close()
            assert future.result(DEADLINE) == "released"
            assert pool.info()["workers"][0]["progress"] == {}  # finished tasks show none
    finally:
        workers.stop_all()


def test_a_task_reporting_in_a_tight_loop_sends_a_few_updates_per_second(
        pool_dir, workers, tmp_path):
    release, seconds = str(tmp_path / "release"), 1.5
    with rpc.Pool(tunnel_dir=pool_dir) as pool:
        workers.start()
        wait_for_workers(pool, 1)
        calls_before = rpc.status(tunnel_dir=pool_dir)["calls_served"]
        future = pool.submit(report_in_a_tight_loop, seconds, release)
        wait_until(lambda: future.progress == "last", DEADLINE,
                   what="the task's last progress (held back, then sent)",
                   seen=lambda: future.progress)
        updates = rpc.status(tunnel_dir=pool_dir)["calls_served"] - calls_before - 1  # the take
        open(release, "w").close()
        reported = future.result(DEADLINE)
    assert reported > 1000  # a tight loop indeed
    # one update at once, then one per interval at most (the last one held back)
    assert 2 <= updates <= seconds / DEFAULT_INTERVAL + 3, updates


def test_report_progress_outside_a_pool_task_does_nothing_and_checks_its_value():
    assert rpc.report_progress(0.5) is None and rpc.report_progress("a message") is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        rpc.report_progress(1.5)
    with pytest.raises(TypeError, match="fraction .* or a message"):
        rpc.report_progress([0.5])


def test_reporter_sends_at_once_then_holds_back_the_latest_until_the_interval_ends():
    sent, second = [], threading.Event()

    def send(value):
        sent.append((value, time.monotonic()))
        if len(sent) == 2:
            second.set()

    reporter = ProgressReporter(send, interval=0.3)
    started = time.monotonic()
    for n in range(10000):
        reporter.report(n / 10000)
    assert second.wait(DEADLINE)
    assert [v for v, _ in sent] == [0.0, 0.9999]  # the first at once, then only the latest
    assert sent[1][1] - started >= 0.3
    reporter.report("after")  # within the next interval: held back...
    reporter.close()  # ... and dropped once the task ended
    time.sleep(0.5)  # nothing signals a send that must not happen
    assert len(sent) == 2


def running_future(progress, updated):
    future = rpc.PoolFuture()
    future.set_running_or_notify_cancel()
    future.progress, future.progress_updated = progress, updated
    return future


def test_map_line_shows_the_mean_fraction_and_the_latest_message_of_its_running_tasks():
    loop = asyncio.new_event_loop()
    mine = [running_future(0.2, 1.0), running_future(0.6, 2.0), running_future("old", 3.0),
            running_future("newest", 4.0), running_future(None, 5.0), rpc.PoolFuture()]
    other_map = running_future("not this map's", 9.0)
    progress = MapProgress(mine, lambda: (2, 2), lambda: mine[:5] + [other_map], loop, Terminal())
    try:
        assert progress.line().endswith(
            "workers 2 online / 2 busy, running 40% (2 reporting), 'newest'")
    finally:
        loop.close()


def test_map_line_counts_cancelled_tasks_apart_and_ends_once_all_are_settled():
    loop = asyncio.new_event_loop()
    futures = [rpc.PoolFuture() for _ in range(3)]
    terminal = Terminal()
    MapProgress(futures, lambda: (1, 0), lambda: (), loop, terminal).start()
    futures[0].set_result(1)
    futures[1].set_exception(rpc.WorkerLost("lost"))
    futures[2].cancel()  # the caller stopped at the lost task
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    shown = terminal.getvalue()
    last = shown.rsplit("\r", 1)[-1]
    assert last.startswith("pool: 2/3 done, 1 failed, 1 cancelled, "), shown
    assert last.endswith("ETA -, workers 1 online / 0 busy\n") and shown.count("\n") == 1
