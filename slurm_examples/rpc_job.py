#!/usr/bin/env python3
#SBATCH --job-name=rpc-demo
#SBATCH --time=00:10:00
#SBATCH --cpus-per-task=1
#SBATCH --output=rpc-demo-%j.out
"""A job that uses the internet through functions running on the login node.

Submit it from the login node with run_with_rpc.sh, which serves rpc_server.py's
functions to this job while it runs:

    ./run_with_rpc.sh rpc_job.py [URL]

The job fetches URL (default https://www.example.org/), asks an LLM endpoint to
summarise it, and shows that an exception raised on the login node arrives here
with its type.
"""
import os
import sys

import rpc

# The tunnel directory run_with_rpc.sh serves on (one per job): ~/.cache/fileforward/jobs/JOBID/rpc
JOBS_DIR = os.environ.get("FILEFORWARD_JOBS_DIR") or os.path.expanduser("~/.cache/fileforward/jobs")
TUNNEL_DIR = os.path.join(JOBS_DIR, os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"], "rpc")


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "https://www.example.org/"
    fetch = rpc.proxy("fetch", tunnel_dir=TUNNEL_DIR)
    completion = rpc.proxy("completion", tunnel_dir=TUNNEL_DIR)

    page = fetch(url).decode("utf-8", errors="replace")
    print("fetched %s: %d characters" % (url, len(page)), flush=True)

    answer = completion([{"role": "user",
                          "content": "Summarise this page in one sentence:\n" + page[:4000]}])
    print("summary:", answer["choices"][0]["message"]["content"], flush=True)

    try:
        fetch("file:///etc/passwd")
    except ValueError as exc:  # raised on the login node, re-raised here
        print("the login node refused as expected: ValueError:", exc, flush=True)


if __name__ == "__main__":
    main()
