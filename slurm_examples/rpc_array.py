#!/usr/bin/env python3
#SBATCH --job-name=rpc-array
#SBATCH --array=0-3
#SBATCH --time=00:10:00
#SBATCH --cpus-per-task=1
#SBATCH --output=rpc-array-%A_%a.out
"""A job array whose tasks all call the same login-node RPC server at once.

    ./run_with_rpc.sh rpc_array.py [QUESTION...]

Task i asks the LLM endpoint behind rpc_server.completion question i (of the
arguments, or of a built-in list) and prints the answer. Change --array above (or
pass --array=0-N to run_with_rpc.sh) for more tasks; one server serves them all.
Without an LLM configured on the login node (LLM_API_KEY or LLM_BASE_URL, see
rpc_server.py), each task fails saying so in one line.
"""
import os
import sys

import rpc

# The tunnel directory run_with_rpc.sh serves on (one per job array): ~/.cache/fileforward/jobs/JOBID/rpc
JOBS_DIR = os.environ.get("FILEFORWARD_JOBS_DIR") or os.path.expanduser("~/.cache/fileforward/jobs")
TUNNEL_DIR = os.path.join(JOBS_DIR, os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"], "rpc")

QUESTIONS = [
    "What is a compute node?",
    "What does a login node do?",
    "Why can't my job reach the internet?",
    "What is a shared filesystem?",
]


def main() -> None:
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    questions = sys.argv[1:] or QUESTIONS
    question = questions[task % len(questions)]
    if rpc.proxy("llm_endpoint", tunnel_dir=TUNNEL_DIR)() is None:
        sys.exit("task %d: nothing to ask, the login node has no LLM configured "
                 "(see rpc_server.py)" % task)
    completion = rpc.proxy("completion", tunnel_dir=TUNNEL_DIR)
    answer = completion([{"role": "user", "content": question}], max_tokens=200)
    print("task %d asked %r; answer: %s"
          % (task, question, answer["choices"][0]["message"]["content"]), flush=True)


if __name__ == "__main__":
    main()
