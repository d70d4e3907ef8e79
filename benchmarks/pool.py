"""Benchmark of rpc.Pool on local disk and on the two emulated NFS nodes, in one run.

    python benchmarks/pool.py [--dir DIR] [--runs 3] [--tasks 2000] [--local-only]
                              [--harness-tasks 1000] [--idle-workers 64] [--idle-seconds 10]

With the pool in this process and `python -m rpc worker` processes on a tunnel
directory under DIR (default: a temporary directory on local disk), it measures:

- no-op tasks per second through 4 workers (`map` over --tasks inputs), timed
  once all four have joined;
- the median latency of one no-op task through an idle pool of one worker;
- the time from a worker's SIGKILL to its task completing on another worker
  (retries=1): the time the pool takes to notice the loss, plus one task.

Then, unless --local-only, on the two emulated NFS nodes of tests/nfs_harness
(root, after .ci/install-nfs.sh; profile nfs: 0.5 ms per request, write-behind),
the pool on node A and the workers on node B:

- no-op tasks per second through 8 workers (`map` over --harness-tasks inputs);
- the median latency of one no-op task through an idle pool of one worker;
- the idle filesystem cost of a pool with --idle-workers connected idle workers:
  the requests per second both nodes' mounts serve (every process together,
  counted by the harness), over --idle-seconds, divided by the number of workers.

Each figure is the median over --runs runs; the table ends with the budgets of
issue 14, each marked met or not.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import rpc  # noqa: E402
from benchmarks.report import Budget, Row, print_table  # noqa: E402
from benchmarks.tunnel import IDLE_SETTLE_S, Target, poll_until, requests_between  # noqa: E402
from fileforward.cliargs import Parser  # noqa: E402
from tests.nfs_harness.options import NodeOptions  # noqa: E402

ISSUE14 = "issue 14"
LATENCY_SAMPLES = 200
#: Seconds a worker may take to join, plus this much per worker started at once.
JOIN_TIMEOUT_S, JOIN_TIMEOUT_PER_WORKER_S = 60.0, 2.0


def noop(x: object = None) -> object:
    return x


def stall_first_time(marker: str) -> int:
    """The first run announces itself and hangs; a later run returns its pid."""
    if os.path.exists(marker):
        return os.getpid()
    open(marker, "w").close()
    time.sleep(600)
    return -1


class Session:
    """A pool on a fresh tunnel directory of `target` (node A's side on the two
    nodes) and its worker processes (node B's side), all joined."""

    def __init__(self, target: Target, workers: int, retries: int = 0) -> None:
        self.tunnel_dir, worker_dir, prefix = target.dirs()
        self.pool = rpc.Pool(tunnel_dir=self.tunnel_dir, retries=retries)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.log = tempfile.TemporaryFile()  # the workers' warnings, told if one fails
        self.workers = [subprocess.Popen([*prefix, sys.executable, "-m", "rpc", "worker", "--pool",
                                          str(worker_dir), "--log-level", "WARNING"], env=env,
                                         cwd=REPO, stderr=self.log)
                        for _ in range(workers)]
        try:
            poll_until(lambda: self._joined(workers),
                       JOIN_TIMEOUT_S + JOIN_TIMEOUT_PER_WORKER_S * workers, f"{workers} workers to join")
        except BaseException:
            self.close()
            raise

    def _joined(self, workers: int) -> bool:
        exited = [w.returncode for w in self.workers if w.poll() is not None]
        if exited:
            self.log.seek(0)
            said = self.log.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"{len(exited)} worker(s) exited before joining (status {exited}); "
                               f"the workers' last lines: " + "\n".join(said))
        return len(self.pool.info()["workers"]) == workers

    def close(self) -> None:
        try:
            self.pool.shutdown()
        finally:
            for worker in self.workers:
                try:
                    worker.wait(60)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
            shutil.rmtree(self.tunnel_dir, ignore_errors=True)
            self.log.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def throughput(target: Target, workers: int, tasks: int) -> float:
    with Session(target, workers) as session:
        start = time.perf_counter()
        list(session.pool.map(noop, range(tasks)))
        return tasks / (time.perf_counter() - start)


def latency_ms(target: Target) -> float:
    with Session(target, 1) as session:
        session.pool.submit(noop).result()  # warm
        samples = []
        for _ in range(LATENCY_SAMPLES):
            start = time.perf_counter()
            session.pool.submit(noop).result()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1000


def kill_to_rerun_s(target: Target) -> float:
    with Session(target, 2, retries=1) as session, tempfile.TemporaryDirectory() as scratch:
        marker = os.path.join(scratch, "started")
        future = session.pool.submit(stall_first_time, marker)
        while not os.path.exists(marker):
            time.sleep(0.001)
        [busy] = [w["pid"] for w in session.pool.info()["workers"] if w["running"]]
        start = time.perf_counter()
        os.kill(busy, 9)
        future.result(120)
        return time.perf_counter() - start


def idle_requests_per_worker(target: Target, workers: int, seconds: float) -> float:
    """Filesystem requests per second per connected idle worker, both nodes together."""
    with Session(target, workers) as session:
        session.pool.submit(noop).result()  # the pool has worked once: it is now idle
        time.sleep(IDLE_SETTLE_S)  # the quiet spell before measuring: everyone backs off to idle polling
        before = target.requests()
        time.sleep(seconds)  # the window measured
        served = sum(requests_between(before, target.requests()).values())
        return served / seconds / workers


def median_of(runs: int, measure: Callable[[Target], float], target: Target) -> float:
    return statistics.median(measure(target) for _ in range(runs))


def harness_rows(args, runs: int) -> List[Row]:
    """The two-node figures, or rows saying why they are missing."""
    names = [("no-op tasks/s, 8 workers, NFS harness", Budget(">=", 200, ISSUE14)),
             ("no-op task latency ms, idle pool, NFS harness", Budget("<=", 30, ISSUE14)),
             (f"idle fs requests/s per worker, {args.idle_workers} idle workers, "
              "all processes, NFS harness", Budget("<=", 5, ISSUE14))]
    why_not: Optional[str] = "--local-only" if args.local_only else None
    if why_not is None:
        from tests.nfs_harness.cluster import missing_requirements, start_two_nodes
        why_not = missing_requirements()
    if why_not is not None:
        print(f"not measured on the NFS harness: {why_not}", file=sys.stderr)
        return [Row(name, None, budget=budget, text=f"n/a ({why_not})") for name, budget in names]
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="poolnodes-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # after the unmount
        target = Target(args.dir or Path(tempfile.gettempdir()),
                        stack.enter_context(start_two_nodes(workdir, NodeOptions.preset("nfs"))))
        figures = [median_of(runs, lambda t: throughput(t, 8, args.harness_tasks), target),
                   median_of(runs, latency_ms, target),
                   median_of(runs, lambda t: idle_requests_per_worker(
                       t, args.idle_workers, args.idle_seconds), target)]
    return [Row(name, value, fmt, budget)
            for (name, budget), value, fmt in zip(names, figures, (".0f", ".1f", ".2f"))]


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where the tunnel directories go")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks of the throughput map")
    parser.add_argument("--local-only", action="store_true",
                        help="skip the figures on the two emulated NFS nodes")
    parser.add_argument("--harness-tasks", type=int, default=1000,
                        help="tasks of the throughput map on the NFS harness")
    parser.add_argument("--idle-workers", type=int, default=64,
                        help="connected idle workers whose filesystem cost is measured")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="seconds the idle filesystem cost is measured over")
    args = parser.parse_args()
    os.environ.setdefault(rpc.KEY_ENV, str(Path(tempfile.mkdtemp()) / "rpc.key"))
    args.dir = Path(args.dir) if args.dir else None
    local = Target(args.dir or Path(tempfile.gettempdir()))
    rows = [
        Row("no-op tasks/s, 4 workers, local", median_of(
            args.runs, lambda t: throughput(t, 4, args.tasks), local), ".0f",
            Budget(">=", 1500, ISSUE14)),
        Row("no-op task latency ms, idle pool, local", median_of(args.runs, latency_ms, local),
            ".2f", Budget("<=", 2, ISSUE14)),
        Row("SIGKILL to task done elsewhere s (retries=1), local",
            median_of(args.runs, kill_to_rerun_s, local), ".2f"),
        *harness_rows(args, args.runs),
    ]
    print_table(f"rpc.Pool, medians of {args.runs} runs (NFS harness: pool on node A, "
                "workers on node B)", rows)


if __name__ == "__main__":
    main()
