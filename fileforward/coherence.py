"""How each side of a tunnel sees the other's writes, whatever the filesystem's locks do.

Correctness never depends on a lock excluding another node (many HPC filesystems
keep locks node-local, silently: BeeGFS by default, Lustre `localflock`, NFS
`local_lock=`/`nolock`). Every tunnel file has one writer, and:

- on a **local** filesystem (ext4, xfs, tmpfs...) both sides share one kernel's
  page cache: plain reads and writes are coherent;
- on a **shared** filesystem (NFS, Lustre, GPFS, BeeGFS, anything not known to be
  local), the writer fsyncs each batch (NFS write-behind keeps writes on the
  writer's node until fsync, close or unlock; BeeGFS until fsync or close) and the
  reader reads with O_DIRECT, which bypasses its node's cache and asks the file
  server (nfs(5): "applications can also open their files with the O_DIRECT
  flag to disable data caching entirely"). One READ per look, one WRITE and one
  COMMIT per batch, no lock.

Locks are used only where the two sides have seen that they exclude each other
(`LOCKS`): to notice within a second that a peer's process died (the kernel frees
a dead process's locks at once). `LOCK_FREE` trusts heartbeats only. The choice is
made per peer when the two first meet (endpoint.py), or forced with `--coherence`.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import re
from pathlib import Path
from typing import Optional, Tuple

AUTO, LOCKS, LOCK_FREE = "auto", "locks", "lock-free"
COHERENCE_CHOICES = (AUTO, LOCKS, LOCK_FREE)
MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(r"\\([0-7]{3})")  # mountinfo escapes blanks as \040
# Filesystems of one machine: every process that opens a file shares one page cache.
LOCAL_FSTYPES = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "ramfs", "f2fs", "zfs", "bcachefs",
    "overlay", "jfs", "reiserfs", "hfsplus", "apfs", "vfat", "exfat", "ntfs", "ntfs3",
})
BLOCK = 4096  # O_DIRECT wants aligned offsets, lengths and buffers on most filesystems


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: the mount a directory lives on."""

    mount_point: str
    fstype: str
    source: str
    options: Tuple[str, ...]  # the mount's options, then the superblock's (NFS: vers, local_lock, actimeo...)

    def option(self, name: str) -> Optional[str]:
        """The value of option `name` ("" for a flag), None if absent."""
        for option in self.options:
            key, eq, value = option.partition("=")
            if key == name:
                return value if eq else ""
        return None

    def __str__(self) -> str:
        return f"{self.fstype} {self.source} at {self.mount_point} ({','.join(self.options)})"


def mount_of(path: Path, mountinfo: str = MOUNTINFO) -> Optional[Mount]:
    """The mount `path` is on (the last of the longest matching mount points), or
    None where there is no mountinfo to read (not Linux)."""
    target = os.path.realpath(path)
    best: Optional[Mount] = None
    try:
        with open(mountinfo, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            options = fields[5].split(",")
            options += [o for o in (rest[2].split(",") if len(rest) > 2 else []) if o not in options]
            best = Mount(point, rest[0], rest[1], tuple(options))
    return best


@dataclasses.dataclass(frozen=True)
class DataPath:
    """How this process reads and writes tunnel files in one directory."""

    direct: bool  # read with O_DIRECT: see another node's fsynced writes, not this node's cache
    sync: bool    # fsync after each batch of writes: make them visible to another node
    mount: Optional[Mount]

    @staticmethod
    def for_directory(path: Path) -> "DataPath":
        """Plain I/O on a local filesystem, O_DIRECT reads and fsynced writes elsewhere."""
        mount = mount_of(path)
        shared = mount is None or mount.fstype not in LOCAL_FSTYPES
        return DataPath(direct=shared, sync=shared, mount=mount)

    def describe(self) -> str:
        """One phrase for the log: the filesystem and what that means for I/O."""
        where = f"{self.mount.fstype} ({','.join(self.mount.options)})" if self.mount else "an unknown filesystem"
        how = "O_DIRECT reads, fsynced writes" if self.direct else "a local filesystem: plain reads and writes"
        return f"{where}: {how}"


class ReadBuffer:
    """One page-aligned buffer, reused for every read of an I/O thread: O_DIRECT
    needs alignment, and a reused buffer leaves no large transient allocations
    behind (they made the process's heap grow in long runs)."""

    def __init__(self, size: int) -> None:
        self.size = -(-size // BLOCK) * BLOCK + BLOCK
        self._map = mmap.mmap(-1, self.size)

    def read(self, fd: int, offset: int, limit: int) -> memoryview:
        """Up to `limit` bytes of the file from `offset` (fewer at its end), read from
        the aligned block below `offset`. Valid until the next read."""
        start = offset - offset % BLOCK
        length = min(self.size, -(-(offset - start + limit) // BLOCK) * BLOCK)
        got = os.preadv(fd, [memoryview(self._map)[:length]], start)
        return memoryview(self._map)[offset - start:max(got, offset - start)][:limit]

    def close(self) -> None:
        """Release the buffer now, unless views of it are still alive (then the
        garbage collector does, with the last view)."""
        try:
            self._map.close()
        except BufferError:
            pass
