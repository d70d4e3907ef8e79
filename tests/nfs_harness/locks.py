"""POSIX record locks of one mount, forwarded to the backing filesystem or kept local.

Each (file, FUSE lock owner) pair gets its own open file description and takes
open-file-description locks on it. Forwarded, that description is of the backing
file: both mounts' daemons lock the same backing inode, so locks exclude each other
across mounts and, because the kernel gives every process its own lock owner, across
processes on one mount. Node-local, it is of an anonymous stand-in file that this
mount keeps per backing file: locks exclude processes of this mount only, as on NFS
mounted `nolock`, Lustre `localflock` or BeeGFS by default. POSIX semantics follow:
an owner's locks merge, and closing any of its descriptors (the kernel's FLUSH,
which libfuse turns into a whole-file unlock) drops them all.
"""
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from typing import Callable, Dict, Tuple

log = logging.getLogger(__name__)

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("@hhqqixxxx")  # struct flock on Linux (64-bit off_t)

FileKey = Tuple[int, int]  # (st_dev, st_ino) of the backing file


class LockTable:
    """The open-file-description locks this mount holds, by file and owner."""

    def __init__(self, node_local: bool = False, first_poll: float = 0.001,
                 max_poll: float = 0.01) -> None:
        self._node_local = node_local
        self._first_poll = first_poll
        self._max_poll = max_poll
        self._ofds: Dict[Tuple[FileKey, int], int] = {}
        self._stand_ins: Dict[FileKey, int] = {}  # node-local: what this mount locks instead
        self._mutex = threading.Lock()

    def holds(self, key: FileKey, owner: int) -> bool:
        """Whether `owner` has a lock description on this file (so unlocks do work)."""
        with self._mutex:
            return (key, owner) in self._ofds

    def set(self, fd: int, key: FileKey, owner: int, ltype: int, start: int, length: int,
            wait: bool, cancelled: Callable[[], bool]) -> None:
        """Lock or unlock [start, start+length) (length 0: to EOF) for `owner`.

        A blocking request retries the non-blocking one, backing off from
        `first_poll` to `max_poll` seconds (as NFSv4 clients poll blocked locks),
        until it succeeds or `cancelled()` says the caller gave up; raises
        OSError(EAGAIN/EINTR).
        """
        if ltype == fcntl.F_UNLCK:
            self._unlock(key, owner, start, length)
            return
        delay = self._first_poll
        while True:
            try:
                self._try_lock(fd, key, owner, ltype, start, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or not wait:
                    raise
            if cancelled():
                raise OSError(errno.EINTR, "lock wait interrupted")
            time.sleep(delay)
            delay = min(2 * delay, self._max_poll)

    def get(self, fd: int, key: FileKey, owner: int, ltype: int, start: int,
            length: int) -> Tuple[int, int, int, int]:
        """F_GETLK: (type, start, length, pid) of a conflicting lock, or F_UNLCK."""
        with self._mutex:
            ofd = self._ofd(fd, key, owner)
            arg = _FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)
            ltype, _, start, length, pid = _FLOCK.unpack(fcntl.fcntl(ofd, F_OFD_GETLK, arg))
        return ltype, start, length, pid

    def forget_file(self, key: FileKey) -> None:
        """Drop every owner's locks on a file this mount no longer has open."""
        with self._mutex:
            for ofd_key in [k for k in self._ofds if k[0] == key]:
                os.close(self._ofds.pop(ofd_key))
            stand_in = self._stand_ins.pop(key, None)
            if stand_in is not None:
                os.close(stand_in)

    def _try_lock(self, fd: int, key: FileKey, owner: int, ltype: int, start: int,
                  length: int) -> None:
        with self._mutex:
            ofd = self._ofd(fd, key, owner)
            fcntl.fcntl(ofd, F_OFD_SETLK, _FLOCK.pack(ltype, os.SEEK_SET, start, length, 0))

    def _unlock(self, key: FileKey, owner: int, start: int, length: int) -> None:
        with self._mutex:
            ofd = self._ofds.get((key, owner))
            if ofd is None:
                return
            if start == 0 and length == 0:
                os.close(self._ofds.pop((key, owner)))  # whole file: drops everything
                return
            fcntl.fcntl(ofd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))

    def _ofd(self, fd: int, key: FileKey, owner: int) -> int:
        """The owner's description of the file (or of its node-local stand-in),
        opened afresh if needed."""
        ofd = self._ofds.get((key, owner))
        if ofd is None:
            if self._node_local:
                if key not in self._stand_ins:
                    self._stand_ins[key] = os.memfd_create("lock", os.MFD_CLOEXEC)
                fd = self._stand_ins[key]
            proc_path = f"/proc/self/fd/{fd}"
            try:
                ofd = os.open(proc_path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                ofd = os.open(proc_path, os.O_RDONLY | os.O_CLOEXEC)
            self._ofds[(key, owner)] = ofd
            log.debug("new lock description for owner %x on %s", owner, key)
        return ofd
