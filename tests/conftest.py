"""Shared pytest fixtures.

The repository root is put on PYTHONPATH so that tests, and the subprocesses they
start (`python -m fileforward`, `python -m rpc`), run this checkout's code whether
or not the project is installed.
"""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture
def tunnel_dir(tmp_path: Path) -> Path:
    """A fresh, not yet existing tunnel directory under pytest's tmp_path."""
    return tmp_path / "tunnel"


# --- Two-node NFS emulation harness (issue 4): fixtures `two_nodes`, `make_two_nodes`.
from tests.nfs_harness.fixtures import make_two_nodes, two_nodes  # noqa: E402,F401
