"""pytest fixtures for the two-node NFS emulation.

Register them by importing them into tests/conftest.py (see the block at its end).
"""
import contextlib
import itertools
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from tests.extras import require_nfs_harness

from .cluster import TwoNodes, start_two_nodes
from .mounts import HarnessUnavailable
from .options import NodeOptions


@pytest.fixture
def make_two_nodes(tmp_path: Path) -> Iterator[Callable[..., TwoNodes]]:
    """Factory: `make_two_nodes(profile=None, **knobs)` mounts a fresh pair of nodes;
    `profile` names one of options.PROFILES ("nfs", "nfs-local-locks", "beegfs"), the
    knobs are NodeOptions fields (latency_ms, write_behind, lock_forwarding, ...) and
    override it. Every pair is unmounted, its processes killed and its namespace
    deleted after the test. Skips (fails under CI) with the missing pieces if the
    harness cannot run here."""
    require_nfs_harness()
    serial = itertools.count()
    with contextlib.ExitStack() as stack:
        def make(profile: Optional[str] = None, **knobs) -> TwoNodes:
            workdir = tmp_path / f"nodes{next(serial)}"
            options = NodeOptions.preset(profile, **knobs)
            try:
                return stack.enter_context(start_two_nodes(workdir, options))
            except HarnessUnavailable as exc:  # e.g. no privilege for namespaces here
                require_nfs_harness(str(exc))
                raise

        yield make


@pytest.fixture
def two_nodes(make_two_nodes: Callable[..., TwoNodes]) -> TwoNodes:
    """Two nodes with the default NFS-like behaviour (0.5 ms latency, 2 s caches)."""
    return make_two_nodes()
