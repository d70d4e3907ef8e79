"""One mount's dirty data: NFS client write-behind.

With write-behind on, a write() is held here, in this mount's memory, instead of
reaching the backing store ("the server"): the other mount cannot see it until this
mount writes it back, at fsync, close, a lock request (NFS flushes before locking
and unlocking) or when too much has piled up, as a client's page cache does.
Reads on this mount see its own held writes laid over the server's data, and its
sizes include them. With write-behind off, every write goes through at once.
Stricter than Linux NFS, whose stat() on the writing node also writes back: a
protocol that passes here does not rely on that.
"""
import os
import threading
from typing import Dict, List, Tuple

from .locks import FileKey

# A client writes back on its own when dirty data piles up (dirty_background_bytes).
DIRTY_LIMIT = 8 << 20


class _Dirty:
    """The held writes of one file, in order; contiguous ones merged."""

    __slots__ = ("fd", "extents", "nbytes", "end")

    def __init__(self, fd: int) -> None:
        self.fd = os.dup(fd)  # ours: the writer may close its own before the write-back
        self.extents: List[Tuple[int, bytearray]] = []
        self.nbytes = 0
        self.end = 0

    def add(self, data: bytes, offset: int) -> None:
        last = self.extents[-1] if self.extents else None
        if last is not None and last[0] + len(last[1]) == offset:
            last[1].extend(data)
        else:
            self.extents.append((offset, bytearray(data)))
        self.nbytes += len(data)
        self.end = max(self.end, offset + len(data))


class WriteCache:
    """Held writes by file; `hold=False` writes through. Each method that sends
    writes to the server returns how many WRITE requests that took, so that the
    caller can charge their round trips."""

    def __init__(self, hold: bool, dirty_limit: int = DIRTY_LIMIT) -> None:
        self._hold = hold
        self._dirty_limit = dirty_limit
        self._files: Dict[FileKey, _Dirty] = {}
        self._mutex = threading.Lock()

    def write(self, key: FileKey, fd: int, data: bytes, offset: int) -> int:
        """Hold (or write through) `data` at `offset` of the file open as `fd`."""
        if not self._hold:
            os.pwrite(fd, data, offset)
            return 1
        with self._mutex:
            dirty = self._files.get(key)
            if dirty is None:
                dirty = self._files[key] = _Dirty(fd)
            dirty.add(data, offset)
            return self._write_back(key) if dirty.nbytes > self._dirty_limit else 0

    def read(self, fd: int, key: FileKey, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset`: the server's, with this mount's held writes over them."""
        with self._mutex:  # no write-back between reading the server and the overlay
            data = os.pread(fd, size, offset)
            dirty = self._files.get(key)
            if dirty is None:
                return data
            end = min(offset + size, max(dirty.end, offset + len(data)))
            view = bytearray(data) + bytes(max(0, end - offset - len(data)))
            for start, chunk in dirty.extents:
                lo, hi = max(start, offset), min(start + len(chunk), end)
                if lo < hi:
                    view[lo - offset:hi - offset] = chunk[lo - start:hi - start]
            return bytes(view)

    def size(self, key: FileKey, server_size: int) -> int:
        """The file's size as this mount sees it: its held writes may extend it."""
        with self._mutex:
            dirty = self._files.get(key)
            return server_size if dirty is None else max(server_size, dirty.end)

    def write_back(self, key: FileKey) -> int:
        """Send the file's held writes to the server, in the order they were made."""
        with self._mutex:
            return self._write_back(key)

    def write_back_all(self) -> int:
        """Send every held write (a clean unmount)."""
        with self._mutex:
            return sum(self._write_back(key) for key in list(self._files))

    def _write_back(self, key: FileKey) -> int:
        dirty = self._files.pop(key, None)
        if dirty is None:
            return 0
        try:
            for start, chunk in dirty.extents:
                os.pwrite(dirty.fd, chunk, start)
        finally:
            os.close(dirty.fd)
        return len(dirty.extents)
