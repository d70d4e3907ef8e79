"""One node's NFS client, emulated: a FUSE passthrough of the shared backing directory.

Run as `python -m tests.nfs_harness.daemon --backing DIR --mount MNT --counters F`;
it serves in the foreground until SIGTERM/SIGINT or its parent's death. What makes
it NFS-like, per mount: the kernel caches attributes, names and missing names for
the configured timeouts; every request sent to the server costs `latency_ms`;
open() and a granted lock drop this mount's cached attributes and pages of the file
(close-to-open and lock coherence); with write-behind, writes stay in this mount
until fsync, close or a lock request writes them back (see writeback.py); POSIX
record locks are forwarded so that they exclude each other across mounts, or kept
node-local (see locks.py). Each knob can be switched off (options.py).
"""
import argparse
import ctypes
import errno
import fcntl
import functools
import itertools
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Optional

os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # mfusepy would pick libfuse2 first if installed
import mfusepy  # noqa: E402

from .counters import CounterWriter  # noqa: E402
from .locks import FileKey, LockTable  # noqa: E402
from .options import NodeOptions  # noqa: E402
from .writeback import WriteCache  # noqa: E402

log = logging.getLogger(__name__)

_lib = mfusepy._libfuse
_lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.fuse_invalidate_path.restype = ctypes.c_int
_lib.fuse_interrupted.argtypes = []
_lib.fuse_interrupted.restype = ctypes.c_int
_lib.fuse_get_session.argtypes = [ctypes.c_void_p]
_lib.fuse_get_session.restype = ctypes.c_void_p
_lib.fuse_session_exited.argtypes = [ctypes.c_void_p]
_lib.fuse_session_exited.restype = ctypes.c_int

# The kernel passes its own file offsets (from its possibly stale view of the size,
# as an NFS client does); O_APPEND on the backing file would silently override them.
_DROPPED_FLAGS = os.O_APPEND | getattr(os, "O_DIRECT", 0)
_PR_SET_PDEATHSIG = 1
_FUSE_CAP_AUTO_INVAL_DATA = 1 << 12
# Each blocked F_SETLKW holds a worker thread, so allow many. libfuse 3.14 ignores the
# option (it logs "Ignoring invalid max threads value") and then has no cap at all.
_MAX_THREADS = 10000
_EXIT_BY_SIGNAL = 8  # what fuse_main_real returns after SIGTERM/SIGINT: a clean stop


class _OpenFile:
    """A file this mount has open: the backing descriptor, the name it has here and
    whether it was opened for writing."""

    __slots__ = ("fd", "path", "key", "writable")

    def __init__(self, fd: int, path: str, flags: int) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.path = path
        self.key = (st.st_dev, st.st_ino)
        self.writable = flags & os.O_ACCMODE != os.O_RDONLY


def _request(method):
    """Count the request and spend one network round trip on it."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args):
        self._round_trip(name)
        return method(self, *args)

    return wrapper


class NfsClientOps:
    """mfusepy operations (raw file info, no paths for open files) of one mount."""

    use_ns = True

    def __init__(self, backing: Path, options: NodeOptions, counters: CounterWriter) -> None:
        self._root = str(backing)
        self._options = options
        self._counters = counters
        self._latency = options.latency_ms / 1000.0
        self._files: Dict[int, _OpenFile] = {}
        self._dirs: Dict[int, str] = {}
        self._open_count: Counter = Counter()
        self._next_fh = itertools.count(1)
        self._files_mutex = threading.Lock()
        self._locks = LockTable(node_local=not options.lock_forwarding)
        self._cache = WriteCache(hold=options.write_behind)
        self._fuse: Optional[int] = None
        self._session: Optional[int] = None

    # -- plumbing ------------------------------------------------------------------

    def init_with_config(self, conn, config) -> None:
        """Ask libfuse for file handles without paths (a path-locked rename would
        otherwise deadlock behind a waiting lock) and for the backing inode numbers.

        Also stop the kernel from dropping cached pages whenever it sees a new mtime:
        after its own write it always does, which would hide other nodes' changes
        being missed (an NFSv4 client credits them to its own write). Pages are then
        revalidated only by open(), a granted lock or a change of size.

        And remove unlinked files at once (hard_remove) instead of hiding them as
        .fuse_hiddenXXXX while open: libfuse's hide-then-release bookkeeping races
        with an asynchronous RELEASE and can leave hidden files behind for good.
        Open handles keep working (nullpath_ok: operations use the handle).
        """
        conn.want &= ~_FUSE_CAP_AUTO_INVAL_DATA
        config.nullpath_ok = 1
        config.hard_remove = 1
        config.use_ino = 1
        self._fuse = _lib.fuse_get_context().contents.fuse
        self._session = _lib.fuse_get_session(self._fuse)

    def _round_trip(self, op: str, requests: int = 1) -> None:
        """Count `requests` requests to the server and wait for their answers."""
        if not requests:
            return
        self._counters.add(op, requests)
        if self._latency:
            time.sleep(self._latency * requests)

    def _write_back(self, key: FileKey) -> None:
        self._round_trip("write", self._cache.write_back(key))

    def _real(self, path: str) -> str:
        return self._root + path

    def _register(self, fd: int, path: str, fi) -> None:
        """Remember an open file; an O_DIRECT open bypasses this mount's page cache
        entirely, as on NFS (else the kernel would serve part of a short direct read
        from cached pages)."""
        if fi.flags & getattr(os, "O_DIRECT", 0):
            fi.direct_io = 1
        entry = _OpenFile(fd, path, fi.flags)
        with self._files_mutex:
            fi.fh = next(self._next_fh)
            self._files[fi.fh] = entry
            self._open_count[entry.key] += 1

    def _file(self, fi) -> _OpenFile:
        return self._files[fi.fh]

    def _invalidate(self, path: str) -> None:
        """Drop this mount's cached attributes and pages of one file."""
        rc = _lib.fuse_invalidate_path(self._fuse, os.fsencode(path))
        if rc:
            log.debug("invalidate %s: %s", path, os.strerror(-rc))

    def _cancelled(self) -> bool:
        return bool(_lib.fuse_interrupted() or _lib.fuse_session_exited(self._session))

    # -- metadata --------------------------------------------------------------------

    @_request
    def getattr(self, path: Optional[str], fi=None) -> dict:
        st = os.fstat(self._file(fi).fd) if fi is not None else os.lstat(self._real(path))
        size = self._cache.size((st.st_dev, st.st_ino), st.st_size)
        return {
            "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": size,
            "st_blocks": st.st_blocks, "st_blksize": st.st_blksize,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
        }

    @_request
    def opendir(self, path: str) -> int:
        with self._files_mutex:
            fh = next(self._next_fh)
            self._dirs[fh] = path
        return fh

    @_request
    def readdir(self, path: Optional[str], fh: int) -> list:
        """Entries with their backing inode numbers (use_ino: glibc skips inode 0)."""
        real = self._real(self._dirs[fh])
        entries = [(name, {"st_ino": os.stat(os.path.join(real, name)).st_ino,
                           "st_mode": stat.S_IFDIR}, 0) for name in (".", "..")]
        with os.scandir(real) as it:
            for entry in it:
                kind = (stat.S_IFLNK if entry.is_symlink() else
                        stat.S_IFDIR if entry.is_dir(follow_symlinks=False) else stat.S_IFREG)
                entries.append((entry.name, {"st_ino": entry.inode(), "st_mode": kind}, 0))
        return entries

    @_request
    def releasedir(self, path: Optional[str], fh: int) -> None:
        with self._files_mutex:
            del self._dirs[fh]

    @_request
    def statfs(self, path: str) -> dict:
        sv = os.statvfs(self._real(path))
        return {key: getattr(sv, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
            "f_ffree", "f_favail", "f_flag", "f_namemax")}

    @_request
    def chmod(self, path: Optional[str], mode: int, fi=None) -> None:
        if fi is not None:
            os.fchmod(self._file(fi).fd, mode)
        else:
            os.chmod(self._real(path), mode)

    @_request
    def chown(self, path: str, uid: int, gid: int) -> None:
        os.lchown(self._real(path), uid, gid)

    @_request
    def utimens(self, path: Optional[str], times=None, fi=None) -> None:
        target = self._file(fi).fd if fi is not None else self._real(path)
        if times is None:
            os.utime(target)
        else:
            os.utime(target, ns=tuple(int(t) for t in times))

    @_request
    def readlink(self, path: str) -> str:
        return os.readlink(self._real(path))

    # -- names -----------------------------------------------------------------------

    @_request
    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._real(path), mode)

    @_request
    def rmdir(self, path: str) -> None:
        os.rmdir(self._real(path))

    @_request
    def unlink(self, path: str) -> None:
        os.unlink(self._real(path))

    @_request
    def rename(self, old: str, new: str) -> None:
        os.rename(self._real(old), self._real(new))
        with self._files_mutex:
            for entry in self._files.values():
                if entry.path == old or entry.path.startswith(old + "/"):
                    entry.path = new + entry.path[len(old):]

    @_request
    def link(self, target: str, source: str) -> None:
        os.link(self._real(source), self._real(target))

    @_request
    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._real(target))

    # -- open files ------------------------------------------------------------------

    @_request
    def create(self, path: str, mode: int, fi) -> int:
        fd = os.open(self._real(path), (fi.flags & ~_DROPPED_FLAGS) | os.O_CREAT | os.O_CLOEXEC, mode)
        self._register(fd, path, fi)
        return 0

    @_request
    def open(self, path: str, fi) -> int:
        fd = os.open(self._real(path), (fi.flags & ~_DROPPED_FLAGS) | os.O_CLOEXEC)
        self._register(fd, path, fi)
        self._invalidate(path)  # close-to-open
        return 0

    @_request
    def read(self, path: Optional[str], size: int, offset: int, fi) -> bytes:
        entry = self._file(fi)
        return self._cache.read(entry.fd, entry.key, size, offset)

    def write(self, path: Optional[str], data: bytes, offset: int, fi) -> int:
        """Write through, or hold in this mount (write-behind): no request to the
        server then, until it is written back."""
        entry = self._file(fi)
        self._round_trip("write", self._cache.write(entry.key, entry.fd, data, offset))
        return len(data)

    @_request
    def truncate(self, path: Optional[str], length: int, fi=None) -> None:
        """Held writes go first, as an NFS client flushes before changing a size."""
        if fi is not None:
            self._write_back(self._file(fi).key)
            os.ftruncate(self._file(fi).fd, length)
        else:
            st = os.stat(self._real(path))
            self._write_back((st.st_dev, st.st_ino))
            os.truncate(self._real(path), length)

    @_request
    def fsync(self, path: Optional[str], datasync: int, fi) -> None:
        entry = self._file(fi)
        self._write_back(entry.key)
        (os.fdatasync if datasync else os.fsync)(entry.fd)

    @_request
    def flush(self, path: Optional[str], fi) -> None:
        """close() of a descriptor open for writing writes the file back, as on NFS
        (close-to-open); libfuse then unlocks the owner."""
        entry = self._file(fi)
        if entry.writable:
            self._write_back(entry.key)

    @_request
    def release(self, path: Optional[str], fi) -> None:
        with self._files_mutex:  # held so that no new open can lock in between
            entry = self._files.pop(fi.fh)
            self._open_count[entry.key] -= 1
            if self._open_count[entry.key] == 0:
                del self._open_count[entry.key]
                self._locks.forget_file(entry.key)
        os.close(entry.fd)

    def destroy(self, path: Optional[str]) -> None:
        """A clean unmount writes back what is still held."""
        self._cache.write_back_all()

    def lock(self, path: Optional[str], fi, cmd: int, lock_p) -> int:
        """F_GETLK/F_SETLK/F_SETLKW: forwarded to the server or kept node-local (no
        round trip then). As on NFS, a lock or unlock first writes back this mount's
        held writes of the file (lock_flush), and a granted lock revalidates the
        file (lock_invalidation)."""
        if not self._options.locks_available:
            raise mfusepy.FuseOSError(errno.ENOLCK)
        entry = self._file(fi)
        fl = lock_p.contents
        owner = fi.lock_owner
        server_requests = 1 if self._options.lock_forwarding else 0
        if cmd == fcntl.F_GETLK:
            self._round_trip("lock", server_requests)
            fl.l_type, fl.l_start, fl.l_len, pid = self._locks.get(
                entry.fd, entry.key, owner, fl.l_type, fl.l_start, fl.l_len)
            fl.l_whence = os.SEEK_SET
            fl.l_pid = max(pid, 0)
            return 0
        if fl.l_type == fcntl.F_UNLCK and not self._locks.holds(entry.key, owner):
            return 0  # like an NFS client: no round trip to unlock what it never locked
        if self._options.lock_flush:
            self._write_back(entry.key)
        self._round_trip("lock", server_requests)
        self._locks.set(entry.fd, entry.key, owner, fl.l_type, fl.l_start, fl.l_len,
                        wait=cmd == fcntl.F_SETLKW, cancelled=self._cancelled)
        if fl.l_type != fcntl.F_UNLCK and self._options.lock_invalidation:
            self._invalidate(entry.path)
        return 0


class _FileInfoFUSE(mfusepy.FUSE):
    """mfusepy.FUSE that passes the file info on to ftruncate/fchmod/futimens,
    which get no path with nullpath_ok."""

    def truncate_fuse_3(self, path, length, fip):
        return self.operations.truncate(None if path is None else path.decode(), length,
                                        fip.contents if fip else None)

    def chmod_fuse_3(self, path, mode, fip):
        return self.operations.chmod(None if path is None else path.decode(), mode,
                                     fip.contents if fip else None)

    def utimens_fuse_3(self, path, buf, fip):
        times = None
        if buf:
            times = (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                     mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
        return self.operations.utimens(None if path is None else path.decode(), times,
                                       fip.contents if fip else None)


def _die_with_parent(parent_pid: int) -> None:
    """Get SIGTERM (a clean unmount) when the process that started us dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        sys.exit("nfs_harness daemon: parent already gone")


def main(argv=None) -> None:
    """Mount one node's view of --backing at --mount and serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backing", required=True, type=Path)
    parser.add_argument("--mount", required=True, type=Path)
    parser.add_argument("--counters", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--debug", action="store_true")
    NodeOptions.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="nfs_harness[%(process)d] %(name)s: %(message)s")
    logging.getLogger("fuse").setLevel(logging.INFO)  # mfusepy's per-callback chatter
    if mfusepy.fuse_version_major != 3:
        sys.exit(f"nfs_harness daemon needs libfuse3, found {mfusepy.fuse_version_major}")
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    options = NodeOptions.from_args(args)
    ops = NfsClientOps(args.backing.resolve(), options, CounterWriter(args.counters))
    try:
        _FileInfoFUSE(
            ops, str(args.mount), raw_fi=True, foreground=True, nothreads=False,
            fsname="nfs_harness", auto_unmount=True, allow_other=True,
            attr_timeout=options.attr_timeout, entry_timeout=options.entry_timeout,
            negative_timeout=options.negative_timeout, max_threads=_MAX_THREADS,
        )
    except RuntimeError as exc:
        if exc.args != (_EXIT_BY_SIGNAL,):
            raise


if __name__ == "__main__":
    main()
