"""Run the batch scripts of slurm_examples/ under a real (private, single-node) SLURM.

One cluster serves the whole module (tests/slurm_cluster.py). Each test submits an
example *as written*: the job finds ``fileforward`` and ``python3`` on PATH (a
wrapper directory running this checkout's code) and the checkout on PYTHONPATH
(sbatch exports the submitter's environment). HOME is a per-test directory, so
the examples' ``~/.cache/fileforward/...`` files are private to the test.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Dict, Iterator

import pytest

from jupyter_api import JupyterClient
from slurm_cluster import SlurmCluster, free_port, missing_requirements, poll

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "slurm_examples"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """A private single-node SLURM cluster, stopped (jobs cancelled) at module end."""
    why_not = missing_requirements()
    if why_not:
        pytest.skip(why_not)
    with SlurmCluster() as c:
        yield c


@pytest.fixture
def job_env(cluster: SlurmCluster, tmp_path: Path) -> Dict[str, str]:
    """Environment for the login-node side and (through sbatch) the job.

    PATH starts with a directory holding ``fileforward`` (runs ``python3 -m
    fileforward`` from this checkout) and ``python3`` / ``python`` (this
    interpreter); HOME is private to the test.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "fileforward"
    wrapper.write_text('#!/bin/sh\nexec "%s" -m fileforward "$@"\n' % sys.executable)
    wrapper.chmod(0o755)
    for name in ("python3", "python"):
        (bin_dir / name).symlink_to(sys.executable)
    home = tmp_path / "home"
    home.mkdir()
    return dict(cluster.env, HOME=str(home),
                PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))


def test_cleanup_idiom_ends_job_completed_and_kills_background(
        cluster: SlurmCluster, job_env: Dict[str, str], tmp_path: Path) -> None:
    """The trap the examples use: the job ends COMPLETED and its background work is gone."""
    script = tmp_path / "idiom.sh"
    script.write_text(
        "#!/bin/bash\n"
        "trap 'trap \"\" TERM; kill 0; wait' EXIT\n"
        "sleep 300 &\n"
        "echo started \"$SLURM_JOB_ID\"\n"
    )
    job_id = cluster.sbatch(script, "-o", str(tmp_path / "out.txt"), env=job_env, cwd=tmp_path)
    job = cluster.wait_finished(job_id, timeout=30)
    assert job.state == "COMPLETED", cluster.describe(job_id)
    assert job.exit_code == "0:0"
    assert job.output == "started %s\n" % job_id
    cluster.wait_no_job_processes(job_id)


def test_leftover_setsid_process_is_detected(
        cluster: SlurmCluster, job_env: Dict[str, str], tmp_path: Path) -> None:
    """The fixture itself can see leftovers: a setsid process survives the job end."""
    script = tmp_path / "leak.sh"
    script.write_text(
        "#!/bin/bash\n"
        "setsid sleep 300 </dev/null >/dev/null 2>&1 &\n"
        "until [ \"$(ps -o sid= -p $! | tr -d ' ')\" = \"$!\" ]; do sleep 0.05; done\n"
    )
    job_id = cluster.sbatch(script, "-o", str(tmp_path / "out.txt"), env=job_env, cwd=tmp_path)
    assert cluster.wait_finished(job_id, timeout=30).state == "COMPLETED"
    with pytest.raises(AssertionError, match="sleep 300"):
        cluster.wait_no_job_processes(job_id, timeout=1)
    for proc in cluster.job_processes(job_id):
        os.kill(proc.pid, 9)
    cluster.wait_no_job_processes(job_id)


def test_jupyter_client_drives_a_local_jupyterlab(tmp_path: Path) -> None:
    """The Jupyter test tooling itself, against a JupyterLab started here (no SLURM)."""
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, HOME=str(tmp_path), JUPYTER_TOKEN=token)
    with open(tmp_path / "jupyter.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
             "--port=%d" % port, "--ServerApp.port_retries=0", "--allow-root"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = JupyterClient("http://127.0.0.1:%d" % port, token)
        wait_jupyter(client, server, tmp_path / "jupyter.log")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            JupyterClient(client.base_url, "wrong-token").status()
        kernel = client.start_kernel()
        assert client.execute(kernel, "1+1") == "2"
        client.shutdown()
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def wait_jupyter(client: JupyterClient, server: subprocess.Popen, log: Path,
                 timeout: float = 60) -> dict:
    """Poll GET /api/status until it answers; fail early if the server died."""
    def check() -> dict:
        if server.poll() is not None:
            raise AssertionError("jupyter exited %s:\n%s" % (server.returncode, log.read_text()))
        try:
            return client.status()
        except (OSError, urllib.error.URLError):
            return None

    return poll(check, timeout, "JupyterLab at %s" % client.base_url, interval=0.2)
