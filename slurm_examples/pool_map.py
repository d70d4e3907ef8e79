#!/usr/bin/env python3
"""Map a function over 1,000 inputs on a pool of SLURM workers, from the login node.

    python3 pool_map.py [--count 1000] [--seconds 0.1] [--retries 1] [--pool DIR] &
    sbatch --array=0-3 pool_worker.sbatch [--pool DIR]

The pool runs here and waits for workers (start them before or after); the map's
progress line shows done/total, tasks/s, ETA and the workers online. At the end it
prints one summary line: how many results, whether all are right, how long it
took, and which SLURM jobs ran how many tasks. Exit status 0 if every result came
back, 1 if tasks were lost with their worker (raise --retries to run them again).
"""
import argparse
import collections
import logging
import os
import socket
import sys
import time

import rpc


def simulate(x, seconds):
    """Stands for real work: takes ``seconds``, returns x squared and where it ran."""
    time.sleep(seconds)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    return x * x, job or socket.gethostname()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="inputs to map over (default: 1000)")
    parser.add_argument("--seconds", type=float, default=0.1,
                        help="seconds each task takes (default: 0.1)")
    parser.add_argument("--retries", type=int, default=1,
                        help="runs again of a task whose worker was lost (default: 1)")
    parser.add_argument("--pool", default="~/.cache/fileforward/pool",
                        help="the pool's directory, the workers' --pool (default: %(default)s)")
    parser.add_argument("--key-file", help="the RPC key file (default: ~/.cache/fileforward/rpc.key)")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("rpc.pool").setLevel(logging.INFO)  # workers joining, leaving, lost

    started = time.monotonic()
    with rpc.Pool(tunnel_dir=args.pool, retries=args.retries, key_file=args.key_file) as pool:
        try:
            results = list(pool.map(simulate, range(args.count), [args.seconds] * args.count,
                                    progress=True))
        except rpc.WorkerLost as lost:
            print(f"lost: {lost}; with --retries {args.retries + 1} it would run again",
                  flush=True)
            return 1
    took = time.monotonic() - started
    right = [value for value, _ in results] == [x * x for x in range(args.count)]
    jobs = collections.Counter(where for _, where in results)
    print(f"{len(results)} results, {'all right' if right else 'WRONG'}, in {took:.1f} s; "
          f"tasks per job: {', '.join(f'{job} {n}' for job, n in sorted(jobs.items()))}",
          flush=True)
    return 0 if right else 1


if __name__ == "__main__":
    sys.exit(main())
