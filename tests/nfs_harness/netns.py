"""Node B's own network: a fresh named network namespace with only its loopback up.

Processes run under `ip netns exec NAME` still see every mount (and the same Python)
but not node A's loopback, so a test cannot pass by talking TCP behind our back.
"""
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import List

from .mounts import HarnessUnavailable

log = logging.getLogger(__name__)

PREFIX = "ffnfs"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-\d+$")
_RUN_NETNS = Path("/run/netns")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_stale() -> None:
    """Delete namespaces this harness left behind in processes that have died."""
    if not _RUN_NETNS.is_dir():
        return
    for entry in _RUN_NETNS.iterdir():
        match = _NAME.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            log.info("removing stale namespace %s", entry.name)
            subprocess.run(["ip", "netns", "del", entry.name], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def live_names() -> List[str]:
    """Names of this harness's namespaces whose creating process still runs."""
    if not _RUN_NETNS.is_dir():
        return []
    return sorted(e.name for e in _RUN_NETNS.iterdir()
                  if (m := _NAME.match(e.name)) and _pid_alive(int(m.group(1))))


def exec_prefix(name: str) -> List[str]:
    """argv prefix that runs a command inside namespace ``name``."""
    return ["ip", "netns", "exec", name]


class NetNamespace:
    """A named network namespace, created now and deleted by `delete()`."""

    _serial = 0

    def __init__(self) -> None:
        remove_stale()
        NetNamespace._serial += 1
        self.name = f"{PREFIX}-{os.getpid()}-{NetNamespace._serial}"
        try:
            _ip("netns", "add", self.name)
        except subprocess.CalledProcessError as exc:
            raise HarnessUnavailable(
                f"cannot create a network namespace: {exc.stderr.decode().strip()}") from exc
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
        except subprocess.CalledProcessError:
            self.delete()
            raise

    def delete(self) -> None:
        """Remove the namespace (processes still inside keep it alive until they exit)."""
        subprocess.run(["ip", "netns", "del", self.name], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
