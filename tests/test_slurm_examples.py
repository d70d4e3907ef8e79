"""Run the batch scripts of slurm_examples/ under a real (private, single-node) SLURM.

One cluster serves the whole module (tests/slurm_cluster.py). Each test submits an
example *as written*: the job finds ``fileforward`` and ``python3`` on PATH (a
wrapper directory running this checkout's code) and the checkout on PYTHONPATH
(sbatch exports the submitter's environment). HOME is a per-test directory, so
the examples' ``~/.cache/fileforward/...`` files are private to the test.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest

from slurm_cluster import SlurmCluster, missing_requirements

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "slurm_examples"

_why_not = missing_requirements()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=_why_not or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A private single-node SLURM cluster, stopped (jobs cancelled) at module end."""
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
