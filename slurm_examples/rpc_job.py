#!/usr/bin/env python3
#SBATCH --job-name=rpc-demo
#SBATCH --time=00:10:00
#SBATCH --cpus-per-task=1
#SBATCH --output=rpc-demo-%j.out
"""A job that uses the internet through functions running on the login node.

Submit it from the login node with run_with_rpc.sh, which serves rpc_server.py's
functions to this job while it runs:

    ./run_with_rpc.sh rpc_job.py [URL]

The job fetches URL (default https://www.example.org/), asks the login node's LLM
endpoint to summarise it (only if one is configured there: LLM_API_KEY or
LLM_BASE_URL, see rpc_server.py; otherwise it says so and goes on), and shows that
an exception raised on the login node arrives here with its type.
"""
import os
import sys

import rpc

# The tunnel directory run_with_rpc.sh serves on (one per job): ~/.cache/fileforward/jobs/JOBID/rpc
JOBS_DIR = os.environ.get("FILEFORWARD_JOBS_DIR") or os.path.expanduser("~/.cache/fileforward/jobs")
TUNNEL_DIR = os.path.join(JOBS_DIR, os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"], "rpc")


def summarise(page: str) -> None:
    """Print the LLM's one-sentence summary of ``page``, or one line saying why not."""
    endpoint = rpc.proxy("llm_endpoint", tunnel_dir=TUNNEL_DIR)()
    if endpoint is None:
        print("no summary: no LLM is configured on the login node (set LLM_API_KEY, or "
              "LLM_BASE_URL for a local server, before run_with_rpc.sh)", flush=True)
        return
    completion = rpc.proxy("completion", tunnel_dir=TUNNEL_DIR)
    try:
        answer = completion([{"role": "user",
                              "content": "Summarise this page in one sentence:\n" + page[:4000]}])
    except OSError as exc:  # raised on the login node, e.g. urllib's URLError
        print("no summary: the LLM at %s failed: %s: %s" % (endpoint, type(exc).__name__, exc),
              flush=True)
        return
    print("summary:", answer["choices"][0]["message"]["content"], flush=True)


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "https://www.example.org/"
    fetch = rpc.proxy("fetch", tunnel_dir=TUNNEL_DIR)

    page = fetch(url).decode("utf-8", errors="replace")
    print("fetched %s: %d characters" % (url, len(page)), flush=True)

    summarise(page)

    try:
        fetch("file:///etc/passwd")
    except ValueError as exc:  # raised on the login node, re-raised here
        print("the login node refused as expected: ValueError:", exc, flush=True)


if __name__ == "__main__":
    main()
