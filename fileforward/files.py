"""Process-wide table of tunnel files, and the locked operations on them.

POSIX record locks (`fcntl.lockf`) belong to the *process*: two threads of one
process do not exclude each other, and closing *any* descriptor of a file drops
every lock the process holds on it. A server and a client endpoint in one process
(tests, notebooks) would therefore silently corrupt each other's files. As SQLite
does, we keep one descriptor per file per process, shared and reference counted,
with a thread mutex taken around every lockf critical section. This table is the
only process-global state of the transport, forced on us by lockf's semantics.

Byte ranges: the data lock covers [0, ALIVE_OFFSET); an endpoint that owns a file
holds an exclusive lock on the single byte at ALIVE_OFFSET for its lifetime, so that
others can tell a crashed owner (lock free) from a live one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

from .errors import TunnelError, UnsafeTunnelDirError

log = logging.getLogger(__name__)

DATA_LENGTH = 1 << 40
ALIVE_OFFSET = 1 << 40
READ_CHUNK = 1 << 20
LOCK_RETRY_MIN = 0.0005
LOCK_RETRY_MAX = 0.01
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
FILE_MODE = 0o600


class SharedFile:
    """One open descriptor of a tunnel file, shared by every user in this process."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.refs = 1
        self.mutex = threading.Lock()
        self.alive_held = False

    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[int]:
        """Hold the data lock: required for every read and write of tunnel data.

        Without `wait`, raise Busy at once if another holds it. Waiting retries a
        non-blocking lock every 0.5-10 ms instead of F_SETLKW, because an NFS client
        retries a blocked lock with a backoff that grows to seconds.
        """
        if not self.mutex.acquire(blocking=wait):
            raise Busy(self.path)
        try:
            delay = LOCK_RETRY_MIN
            while not _try_lock(self, DATA_LENGTH, 0):
                if not wait:
                    raise Busy(self.path)
                time.sleep(delay)
                delay = min(delay * 2, LOCK_RETRY_MAX)
            try:
                yield self.fd
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, DATA_LENGTH, 0, os.SEEK_SET)
        finally:
            self.mutex.release()

    def append(self, data: bytes) -> None:
        """Append whole records at the size seen under the lock (never O_APPEND)."""
        with self.locked() as fd:
            pwrite_all(fd, data, os.fstat(fd).st_size)

    def append_batch(self, build: Callable[[int], List[bytes]], limit: int, wait: bool = True) -> int:
        """Append the buffers `build(room)` returns, where room keeps the file within `limit`.

        The writer's side of flow control: the file's size under the lock is the
        data the reader has not drained yet. Returns the number of bytes written.
        """
        with self.locked(wait) as fd:
            size = os.fstat(fd).st_size
            if size >= limit:
                return 0
            parts = build(limit - size)
            return _pwritev_all(fd, parts, size) if parts else 0

    def drain(self, wait: bool = True) -> bytes:
        """Read everything in the file and truncate it, atomically under the lock."""
        with self.locked(wait) as fd:
            data = pread_all(fd)
            if data:
                os.ftruncate(fd, 0)
            return data

    def read(self) -> bytes:
        """Read the whole file under the lock, leaving it as it is."""
        with self.locked() as fd:
            return pread_all(fd)

    def replace(self, data: bytes) -> None:
        """Replace the whole content under the lock."""
        with self.locked() as fd:
            os.ftruncate(fd, 0)
            pwrite_all(fd, data, 0)

    def try_hold_alive(self) -> bool:
        """Take the long-lived owner lock if free. False if another process holds it.

        POSIX locks never conflict within one process, so a holder in this process
        is tracked by `alive_held`.
        """
        with self.mutex:
            if self.alive_held or not _try_lock(self, 1, ALIVE_OFFSET):
                return False
            self.alive_held = True
            return True

    def drop_alive(self) -> None:
        """Release the owner lock taken by try_hold_alive."""
        with self.mutex:
            if self.alive_held:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, ALIVE_OFFSET, os.SEEK_SET)
                self.alive_held = False


class Busy(Exception):
    """The lock is held by another process and the caller chose not to wait."""


def _try_lock(shared: SharedFile, length: int, start: int) -> bool:
    try:
        fcntl.lockf(shared.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        return True
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
            raise TunnelError(
                f"the filesystem of {shared.path} refuses POSIX locks (lockf: {exc.strerror}), which keep "
                f"the tunnel coherent between nodes (NFSv3 without its lock daemon? Lustre mounted "
                f"without flock?): use a directory on a filesystem with working locks") from None
        raise


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _pwritev_all(fd: int, parts: Sequence[bytes], offset: int) -> int:
    """Write `parts` at `offset`, at most IOV_MAX buffers per call (more is EINVAL)."""
    total = 0
    for start in range(0, len(parts), IOV_MAX):
        group = parts[start:start + IOV_MAX]
        size = sum(len(p) for p in group)
        written = os.pwritev(fd, group, offset)
        if written < size:  # rare: finish with the remainder as one buffer
            pwrite_all(fd, b"".join(group)[written:], offset + written)
        offset, total = offset + size, total + size
    return total


def pread_all(fd: int, offset: int = 0) -> bytes:
    """The file from `offset` to its end; under the lock, a short read of a regular
    file is its end."""
    chunks = []
    want = READ_CHUNK
    while True:
        chunk = os.pread(fd, want, offset)
        chunks.append(chunk)
        offset += len(chunk)
        if len(chunk) < want:
            break
        want = max(READ_CHUNK, offset)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def open_private(path: str, flags: int) -> int:
    """Open a tunnel file, never through a symbolic link, and only if it is a regular
    file of ours with mode 0600; else UnsafeTunnelDirError (someone tampered with the
    directory: whatever we wrote there, or truncated, would reach their file)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _tampered(path, "is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _tampered(path, "is not a regular file")
        if info.st_uid != os.geteuid():
            raise _tampered(path, f"is owned by uid {info.st_uid}, not by you (uid {os.geteuid()})")
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            raise _tampered(path, f"has mode {stat.S_IMODE(info.st_mode):o}, not {FILE_MODE:o}")
        if info.st_nlink > 1:
            raise _tampered(path, f"has {info.st_nlink} hard links")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _tampered(path: str, what: str) -> UnsafeTunnelDirError:
    directory = os.path.dirname(path)
    return UnsafeTunnelDirError(
        f"tunnel file {path} {what}: someone else can write to the tunnel directory; nothing was written to it. "
        f"Check who can (it must be yours, mode 700: chmod 700 {directory}), remove the file, and restart")


class FileTable:
    """Reference-counted shared descriptors, keyed by path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: Dict[str, SharedFile] = {}

    def open(self, path: Path, create: bool = False, exclusive: bool = False) -> SharedFile:
        """Open (or share) `path`. Raises FileNotFoundError unless `create`."""
        key = str(path)
        with self._lock:
            shared = self._files.get(key)
            if shared is not None and not exclusive:
                shared.refs += 1
                return shared
            flags = os.O_RDWR
            if create:
                flags |= os.O_CREAT
            if exclusive:
                flags |= os.O_EXCL
            shared = SharedFile(key, open_private(key, flags))
            self._files[key] = shared
            return shared

    def release(self, shared: SharedFile) -> None:
        """Drop one reference; the last one closes the descriptor (and its locks)."""
        with self._lock:
            shared.refs -= 1
            if shared.refs > 0:
                return
            if self._files.get(shared.path) is shared:
                del self._files[shared.path]
        fd, shared.fd = shared.fd, -1  # a late use fails with EBADF, never hits a reused descriptor
        try:
            os.close(fd)
        except OSError as exc:  # NFS reports write-back errors here; the descriptor is freed anyway
            log.warning("closing %s: %s", shared.path, exc)

    def rename(self, shared: SharedFile, new_path: Path) -> None:
        """Rename a file we hold, keeping its descriptor and locks."""
        with self._lock:
            os.rename(shared.path, new_path)
            if self._files.get(shared.path) is shared:
                del self._files[shared.path]
            shared.path = str(new_path)
            self._files[shared.path] = shared

    def unlink(self, path: Path) -> None:
        """Remove a name; holders keep their descriptor. A missing name is fine; another
        failure (a broken mount) is logged, and the next start's cleaner retries."""
        key = str(path)
        with self._lock:
            shared = self._files.pop(key, None)
            if shared is not None:
                shared.path = key + " (deleted)"
            try:
                os.unlink(key)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("removing %s: %s", key, exc)

    def local_alive_holder(self, path: Path) -> bool:
        """Whether an endpoint of this process holds the owner lock of `path`."""
        with self._lock:
            shared = self._files.get(str(path))
            return shared is not None and shared.alive_held


TABLE = FileTable()
"""The process's table (see the module docstring for why it is global)."""
