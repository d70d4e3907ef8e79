"""Tunnel files: opening them safely, writing and reading them, and the locks kept on some.

Connection files have one writer and one reader and are never locked: each side
opens its own descriptor (`open_file`), and `write_at` / coherence.ReadBuffer move
the bytes (coherence.py says when to fsync and when to read with O_DIRECT).

Bells and the server pointer carry an owner lock: an endpoint holds an exclusive
lock on the single byte at ALIVE_OFFSET of its bell (and of the pointer, while it
serves) for its lifetime, so that a peer whose locks exclude ours can tell a
process that died (the kernel frees its locks) from a live one. POSIX record locks
(`fcntl.lockf`) belong to the *process*: closing *any* descriptor of a file drops
every lock the process holds on it, and a server and a client endpoint in one
process (tests, notebooks) would drop each other's. As SQLite does, we keep one
descriptor per such file per process, shared and reference counted (`FileTable`).
This table is the only process-global state of the transport, forced on us by
lockf's semantics.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading
from pathlib import Path
from typing import Dict, Optional, Sequence

from .errors import UnsafeTunnelDirError

log = logging.getLogger(__name__)

ALIVE_OFFSET = 1 << 40
READ_CHUNK = 1 << 20
REFUSED_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid
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
        self.direct_fd = -1

    def read(self) -> bytes:
        """The whole file (a small one: the server pointer)."""
        return pread_all(self.fd)

    def replace(self, data: bytes, sync: bool) -> None:
        """Replace the whole content (only its one writer does)."""
        os.ftruncate(self.fd, 0)
        write_at(self.fd, [data], 0, sync)

    def reading_fd(self, direct: bool) -> int:
        """A descriptor to read the file with, O_DIRECT if `direct`: a second one, kept
        as long as the shared one (closing it would drop this process's locks)."""
        if not direct:
            return self.fd
        with self.mutex:
            if self.direct_fd < 0:
                self.direct_fd = open_private(self.path, os.O_RDONLY | os.O_DIRECT)
            return self.direct_fd

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

    def alive_elsewhere(self) -> Optional[bool]:
        """Whether another process holds the owner lock (F_GETLK: one request, nothing
        taken); None if the filesystem refuses locks. Only evidence where the two
        processes' locks are known to exclude each other (coherence.py)."""
        if TABLE.local_alive_holder(Path(self.path)):
            return True
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, ALIVE_OFFSET, 1, 0)
        try:
            answer = fcntl.fcntl(self.fd, fcntl.F_GETLK, query)
        except OSError as exc:
            if exc.errno in REFUSED_LOCKS:
                return None
            raise
        return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK

    def drop_alive(self) -> None:
        """Release the owner lock taken by try_hold_alive."""
        with self.mutex:
            if self.alive_held:
                self.alive_held = False
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, ALIVE_OFFSET, os.SEEK_SET)
                except OSError as exc:
                    if exc.errno not in REFUSED_LOCKS:  # refused: it was never really held
                        raise


def _try_lock(shared: SharedFile, length: int, start: int) -> bool:
    """Take a lock if free. A filesystem that refuses locks grants it: the lock then
    proves nothing, and the transport does not rely on it (coherence.py)."""
    try:
        fcntl.lockf(shared.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start, os.SEEK_SET)
        return True
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            return False
        if exc.errno in REFUSED_LOCKS:
            return True
        raise


def write_at(fd: int, parts: Sequence[bytes], offset: int, sync: bool) -> int:
    """Write `parts` at `offset`; with `sync`, fsync them so that another node's
    O_DIRECT read sees them (coherence.py). Returns the bytes written."""
    written = _pwritev_all(fd, parts, offset)
    if sync:
        os.fsync(fd)
    return written


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
    """The file from `offset` to its end (a short read of a regular file is its end)."""
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


def open_file(path: Path, how: str, direct: bool = False) -> int:
    """Open a connection file (not shared, never locked): "create" it (exclusively),
    open it to "write", or to "read" (with O_DIRECT if `direct`)."""
    flags = {"create": os.O_RDWR | os.O_CREAT | os.O_EXCL, "write": os.O_WRONLY,
             "read": os.O_RDONLY | (os.O_DIRECT if direct else 0)}[how]
    return open_private(str(path), flags)


def close_file(fd: int, path: str) -> None:
    """Close a descriptor; NFS reports write-back errors here, and the descriptor is freed anyway."""
    try:
        os.close(fd)
    except OSError as exc:
        log.warning("closing %s: %s", path, exc)


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
        """Open (or share) a file this process may lock (a bell, the pointer).
        Raises FileNotFoundError unless `create`."""
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
        fds, shared.fd, shared.direct_fd = (shared.fd, shared.direct_fd), -1, -1  # a late use fails with EBADF
        for fd in fds:
            if fd >= 0:
                close_file(fd, shared.path)

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
