"""Two emulated nodes sharing one export: mounts A and B of a backing directory,
node B's processes in their own network namespace."""
import contextlib
import ctypes.util
import importlib.util
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from .counters import read_counters
from .mounts import HarnessUnavailable, MountedNode
from .netns import NetNamespace, exec_prefix
from .options import NodeOptions

log = logging.getLogger(__name__)

KILL_TIMEOUT = 10.0


@dataclass
class TwoNodes:
    """What a test sees: node A's and node B's view of one shared directory."""

    a: Path                      # node A's mount: processes in the root namespace use it
    b: Path                      # node B's mount: processes started by run_on_b use it
    backing: Path                # the "server's" directory (no caches, no latency)
    netns: str                   # node B's network namespace
    options: NodeOptions
    counters: Dict[str, Path]    # {"a": file, "b": file}, see counters.read_counters
    daemons: Dict[str, subprocess.Popen] = field(default_factory=dict)  # each mount's FUSE daemon
    _processes: List[subprocess.Popen] = field(default_factory=list)

    @property
    def b_prefix(self) -> List[str]:
        """argv prefix that runs a command on node B."""
        return exec_prefix(self.netns)

    def run_on_b(self, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a process on node B; it is killed at teardown if still running."""
        return self._track(subprocess.Popen([*self.b_prefix, *argv], **popen_kwargs))

    def run_on_a(self, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start a process on node A; it is killed at teardown if still running."""
        return self._track(subprocess.Popen(list(argv), **popen_kwargs))

    def requests(self, node: str) -> Dict[str, int]:
        """FUSE requests served so far by one node's mount ("a" or "b"), by operation."""
        return read_counters(self.counters[node])

    def total_requests(self, node: str) -> int:
        """All FUSE requests served so far by one node's mount."""
        return sum(self.requests(node).values())

    def _track(self, process: subprocess.Popen) -> subprocess.Popen:
        self._processes.append(process)
        return process

    def kill_processes(self) -> None:
        """Kill what run_on_a/run_on_b started and is still running."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
        for process in self._processes:
            try:
                process.wait(KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("process %d did not die", process.pid)


def missing_requirements() -> Optional[str]:
    """Why the two nodes cannot run here (each missing piece), or None if they can."""
    missing = []
    if os.geteuid() != 0:
        missing.append("it needs root (network namespaces, FUSE mounts)")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse is missing (this kernel or container has no FUSE)")
    for command, package in (("fusermount3", "fuse3"), ("ip", "iproute2")):
        if shutil.which(command) is None:
            missing.append(f"{command} is not installed (Debian package {package})")
    if ctypes.util.find_library("fuse3") is None:
        missing.append("libfuse3 is not installed (Debian package libfuse3-3)")
    if importlib.util.find_spec("mfusepy") is None:
        missing.append("mfusepy is not installed")
    return "; ".join(missing) or None


@contextlib.contextmanager
def start_two_nodes(workdir: Path, options: NodeOptions = NodeOptions(),
              a: Optional[Path] = None, b: Optional[Path] = None,
              backing: Optional[Path] = None,
              debug: bool = False) -> Iterator[TwoNodes]:
    """Mount `backing` (default workdir/backing) twice and yield the two nodes.

    Everything is torn down on exit, even after errors: processes, mounts, namespace.
    Raises HarnessUnavailable, naming every missing piece, before starting anything.
    """
    why_not = missing_requirements()
    if why_not:
        raise HarnessUnavailable(why_not)
    backing = backing or workdir / "backing"
    a = a or workdir / "node_a"
    b = b or workdir / "node_b"
    workdir.mkdir(parents=True, exist_ok=True)
    backing.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        namespace = NetNamespace()
        stack.callback(namespace.delete)
        counters, daemons = {}, {}
        for node, mountpoint in (("a", a), ("b", b)):
            counters[node] = workdir / f"requests_{node}.bin"
            mounted = MountedNode(backing, mountpoint, counters[node], options, debug)
            stack.callback(mounted.stop)
            daemons[node] = mounted.process
        nodes = TwoNodes(a=a, b=b, backing=backing, netns=namespace.name,
                         options=options, counters=counters, daemons=daemons)
        stack.callback(nodes.kill_processes)
        yield nodes
