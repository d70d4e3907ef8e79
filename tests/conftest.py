"""Shared pytest fixtures.

The repository root is put on PYTHONPATH so that tests, and the subprocesses they
start (`python -m fileforward`, `python -m rpc`), run this checkout's code whether
or not the project is installed.
"""
import os
import signal
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# A test run started in the background of a non-interactive shell (`cmd &`) inherits
# SIGINT ignored, and so would every process a test starts: Python then never raises
# KeyboardInterrupt and bash cannot trap INT, so Ctrl-C tests would fail for the
# launcher's sake. Catching it here gives every child the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture
def tunnel_dir(tmp_path: Path) -> Path:
    """A fresh, not yet existing tunnel directory under pytest's tmp_path."""
    return tmp_path / "tunnel"


class Node:
    """One side of a tunnel in an end-to-end test: where it sees the tunnel
    directory, and the argv prefix that runs a process on it."""

    def __init__(self, name: str, tunnel_dir: Path, prefix: "list[str]") -> None:
        self.name = name
        self.tunnel_dir = tunnel_dir
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.tunnel_dir})"


# --- Heavy suites' extras (tests/extras.py): one summary line per missing extra.
from tests.extras import pytest_runtest_makereport  # noqa: E402,F401

# --- RPC suites (tests/rpc_fixtures.py).
from rpc_fixtures import (client, remote, rpc_env, serve, served, server,  # noqa: E402,F401
                          sock, sock_dir, transport)

# --- Two-node NFS emulation harness (issue 4): fixtures `two_nodes`, `make_two_nodes`.
from tests.nfs_harness.fixtures import make_two_nodes, two_nodes  # noqa: E402,F401


EVERY_MODE = ["local", "nfs", "lock-free"]  # for `nodes` (indirect): the modes we claim to support


@pytest.fixture(params=["local", "nfs"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> "tuple[Node, Node]":
    """(login node, job node) sharing a tunnel directory.

    "local": both are this machine, on a local directory.
    "nfs": the two emulated NFS nodes of tests/nfs_harness, profile "nfs" (0.5 ms
    per request, 2 s caches, write-behind, locks that exclude across nodes: mode
    locks); the login node is mount A in our network namespace, the job node is
    mount B in a namespace of its own (it cannot reach our loopback).
    "lock-free" (only where a test asks for EVERY_MODE): the same nodes with the
    harness's "beegfs" profile: node-local locks, writes flushed only at fsync and
    close, a granted lock refreshes nothing.
    """
    if request.param == "local":
        shared = tmp_path / "tunnel"
        return Node("login", shared, []), Node("job", shared, [])
    make = request.getfixturevalue("make_two_nodes")
    pair = make(profile={"nfs": "nfs", "lock-free": "beegfs"}[request.param])
    return Node("login", pair.a / "tunnel", []), Node("job", pair.b / "tunnel", list(pair.b_prefix))
