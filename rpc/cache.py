"""The results cache of ``rpc.Pool(cache_dir=...)``: a call made again does not run again.

A result is stored under the hash of the function (its qualified name and its
compiled code) and of its pickled arguments. Entries are pickles, so the cache
directory is a trust boundary like the tunnel directory: it is created 0700 and
refused if another user owns it or others may write to it. Each entry is written
to a temporary file in its final directory and renamed into place, so a reader
sees a whole entry or none, and several pools may share one cache.
"""
from __future__ import annotations

import hashlib
import logging
import marshal
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from .frames import describe_error, dumps, loads

log = logging.getLogger(__name__)


class UnsafeCacheDirError(PermissionError):
    """The cache directory could be written by someone else (who could then run
    code as you through a planted entry)."""


class ResultCache:
    """Results on disk, keyed by :meth:`key`."""

    def __init__(self, directory: Any) -> None:
        self.directory = Path(directory).expanduser()
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        info = os.stat(self.directory)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o022:
            raise UnsafeCacheDirError(
                f"cache directory {self.directory} is owned by uid {info.st_uid} with mode "
                f"{stat.S_IMODE(info.st_mode):o}: it must be yours and writable by you only "
                f"(chmod 700 {self.directory}), as its entries are unpickled")

    @staticmethod
    def key(fn: Callable[..., Any], args: tuple, kwargs: dict) -> str:
        """The hash of the function's name and code and of its pickled arguments."""
        name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"
        code = getattr(fn, "__code__", None)
        digest = hashlib.sha256(name.encode())
        digest.update(marshal.dumps(code) if code is not None else b"")
        digest.update(dumps((args, kwargs)))
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives (256 subdirectories)."""
        return self.directory / key[:2] / key

    def load(self, key: str) -> Tuple[bool, Optional[Any]]:
        """``(True, value)`` if ``key`` is stored, else ``(False, None)``."""
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            return False, None
        try:
            return True, loads(data)
        except Exception as exc:  # e.g. a class the result needs is not importable here
            log.warning("ignoring cache entry %s: %s", self.path(key), describe_error(exc))
            return False, None

    def store(self, key: str, payload: bytes) -> None:
        """Store a pickled result, atomically (temporary file, fsync, rename)."""
        path = self.path(key)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
