"""Per-mount FUSE request counters, shared through a small memory-mapped file.

The daemon increments, tests and benchmarks read live values while it runs (for
"filesystem requests per second per endpoint"). One native uint64 per operation.
"""
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import Dict

OPERATIONS = (
    "getattr", "readdir", "open", "create", "read", "write", "truncate", "flush",
    "release", "fsync", "unlink", "rename", "mkdir", "rmdir", "chmod", "chown",
    "utimens", "link", "symlink", "readlink", "statfs", "lock",
    "opendir", "releasedir",
)
_SLOT = struct.Struct("=Q")
SIZE = _SLOT.size * len(OPERATIONS)


def create_counters(path: Path) -> Path:
    """Create (or reset) a zeroed counter file at `path`."""
    path.write_bytes(bytes(SIZE))
    return path


def read_counters(path: Path) -> Dict[str, int]:
    """Current request counts by operation name, read from a counter file."""
    data = Path(path).read_bytes()
    return {op: _SLOT.unpack_from(data, i * _SLOT.size)[0] for i, op in enumerate(OPERATIONS)}


class CounterWriter:
    """The daemon's side: thread-safe increments into the mapped counter file."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._index = {op: i * _SLOT.size for i, op in enumerate(OPERATIONS)}
        self._lock = threading.Lock()

    def add(self, op: str, requests: int = 1) -> None:
        """Count `requests` requests of operation `op`."""
        offset = self._index[op]
        with self._lock:
            (value,) = _SLOT.unpack_from(self._map, offset)
            _SLOT.pack_into(self._map, offset, value + requests)
