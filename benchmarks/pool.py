"""Benchmark of rpc.Pool on local disk, in one run.

    python benchmarks/pool.py [--dir DIR] [--runs 3] [--tasks 2000]

With the pool in this process and `python -m rpc worker` processes on a tunnel
directory under DIR (default: a temporary directory on local disk), it measures:

- no-op tasks per second through 4 workers (`map` over --tasks inputs), timed
  once all four have joined;
- the median latency of one no-op task through an idle pool of one worker;
- the time from a worker's SIGKILL to its task completing on another worker
  (retries=1): the time the pool takes to notice the loss, plus one task.

Each figure is the median over --runs runs; the table ends with the budgets of
issue 14, each marked met or not. Not measured yet: the same on the two emulated
NFS nodes, and the idle filesystem cost of 64 connected workers.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import rpc  # noqa: E402
from benchmarks.report import Budget, Row, print_table  # noqa: E402
from fileforward.cliargs import Parser  # noqa: E402

ISSUE14 = "issue 14"
LATENCY_SAMPLES = 200


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
    """A pool and its worker processes, in one directory."""

    def __init__(self, root: Path, workers: int, retries: int = 0) -> None:
        self.root = root
        self.pool = rpc.Pool(tunnel_dir=root / "pool", retries=retries)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.workers = [subprocess.Popen([sys.executable, "-m", "rpc", "worker", "--pool",
                                          str(root / "pool")], env=env,
                                         stderr=subprocess.DEVNULL) for _ in range(workers)]
        deadline = time.monotonic() + 60
        while len(self.pool.info()["workers"]) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not join within 60 s")
            time.sleep(0.05)

    def close(self) -> None:
        self.pool.shutdown()
        for worker in self.workers:
            worker.wait(60)


def throughput(root: Path, tasks: int) -> float:
    session = Session(root, 4)
    try:
        start = time.perf_counter()
        list(session.pool.map(noop, range(tasks)))
        return tasks / (time.perf_counter() - start)
    finally:
        session.close()


def latency_ms(root: Path) -> float:
    session = Session(root, 1)
    try:
        session.pool.submit(noop).result()  # warm
        samples = []
        for _ in range(LATENCY_SAMPLES):
            start = time.perf_counter()
            session.pool.submit(noop).result()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1000
    finally:
        session.close()


def kill_to_rerun_s(root: Path) -> float:
    session = Session(root, 2, retries=1)
    marker = str(root / "started")
    try:
        future = session.pool.submit(stall_first_time, marker)
        while not os.path.exists(marker):
            time.sleep(0.001)
        [busy] = [w["pid"] for w in session.pool.info()["workers"] if w["running"]]
        start = time.perf_counter()
        os.kill(busy, 9)
        future.result(120)
        return time.perf_counter() - start
    finally:
        session.close()


def median_of(runs: int, measure: Callable[[Path], float], base: Path) -> float:
    values: List[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=base) as root:
            values.append(measure(Path(root)))
    return statistics.median(values)


def main() -> None:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where the tunnel directories go")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure")
    parser.add_argument("--tasks", type=int, default=2000, help="tasks of the throughput map")
    args = parser.parse_args()
    os.environ.setdefault(rpc.KEY_ENV, str(Path(tempfile.mkdtemp()) / "rpc.key"))
    base = Path(args.dir) if args.dir else None
    rows = [
        Row("no-op tasks/s, 4 workers, local", median_of(
            args.runs, lambda root: throughput(root, args.tasks), base), ".0f",
            Budget(">=", 1500, ISSUE14)),
        Row("no-op task latency ms, idle pool, local", median_of(args.runs, latency_ms, base),
            ".2f", Budget("<=", 2, ISSUE14)),
        Row("SIGKILL to task done elsewhere s (retries=1)",
            median_of(args.runs, kill_to_rerun_s, base), ".2f"),
    ]
    print_table(f"rpc.Pool on local disk, medians of {args.runs} runs", rows)


if __name__ == "__main__":
    main()
