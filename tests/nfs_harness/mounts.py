"""Start one node's FUSE daemon, wait for its mount, and take it down again robustly."""
import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.polling import WaitTimeout, wait_until

from .counters import create_counters
from .options import NodeOptions

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MOUNT_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo escapes blanks as \040


class HarnessUnavailable(RuntimeError):
    """This machine lacks something the harness needs (cluster.missing_requirements)."""


def is_mounted(mountpoint: Path) -> bool:
    """Whether a FUSE filesystem is mounted exactly at `mountpoint` (mountinfo)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            parts = line.split(" - ", 1)
            fields = parts[0].split()
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == target and len(parts) == 2 and parts[1].startswith("fuse"):
                return True
    return False


class MountedNode:
    """A running daemon serving `backing` at `mountpoint`; counters at `counters`."""

    def __init__(self, backing: Path, mountpoint: Path, counters: Path,
                 options: NodeOptions, debug: bool = False) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoint = mountpoint
        create_counters(counters)
        argv = [sys.executable, "-m", "tests.nfs_harness.daemon",
                "--backing", str(backing), "--mount", str(mountpoint),
                "--counters", str(counters), "--parent-pid", str(os.getpid()),
                *options.to_argv(), *(["--debug"] if debug else [])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
        # Own session: a terminal's Ctrl-C goes to the CLI, which unmounts in order.
        self.process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        with contextlib.suppress(WaitTimeout):  # reported below, with the exit code
            wait_until(lambda: is_mounted(mountpoint) or self.process.poll() is not None,
                       MOUNT_TIMEOUT, what=f"the FUSE daemon to mount {mountpoint}")
        if not is_mounted(mountpoint):
            code = self.process.poll()
            self.stop()
            raise RuntimeError(f"FUSE daemon for {mountpoint} did not mount (exit code {code}; "
                               "its error is on stderr above)")
        log.info("mounted %s -> %s (pid %d)", backing, mountpoint, self.process.pid)

    def stop(self) -> None:
        """Unmount and end the daemon; lazy-unmount and kill if it will not go."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("daemon for %s ignored SIGTERM; killing it", self.mountpoint)
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if is_mounted(self.mountpoint):  # auto_unmount should have done it
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: not is_mounted(self.mountpoint), STOP_TIMEOUT,
                   what=f"{self.mountpoint} to be unmounted")
