"""The tunnel directory: where it is, whether it is safe, and what its files are.

Layout (all files 0600, the directory 0700):

- ``server``: the live server's pointer (JSON: eid, pid, host, format version); the
  server holds its owner lock for as long as it serves;
- ``<eid>.bell``: an endpoint's bell (bell.py): slot 0 says who owns it, each other
  slot belongs to one peer (new connections, wake-ups, pings); the endpoint holds
  its owner lock;
- ``<eid>.slot-<i>``: created exclusively by the peer that owns slot i of that bell;
- ``<client eid>-<n>.c2s`` / ``.s2c``: one chunk file per connection and direction,
  created by the client endpoint, named after it so that its files can be found
  and cleared once it is known to be dead; a long stream goes on in segments
  ``.c2s.1``, ``.c2s.2``... (the reader removes each one it has finished).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .errors import TunnelDirLostError, UnsafeTunnelDirError

DirIdentity = Tuple[int, int]

ENV_TUNNEL_DIR = "FILEFORWARD_TUNNEL_DIR"
SERVER_FILE = "server"
BELL_SUFFIX = ".bell"
NEW_SUFFIX = ".new"
TO_SERVER = ".c2s"
TO_CLIENT = ".s2c"
SLOT_CLAIM = ".slot-"
_CHUNK = re.compile(r"^[0-9a-f]{16}-[0-9]+\.(c2s|s2c)(\.[0-9]+)?$")
_CLAIM = re.compile(r"^[0-9a-f]{16}\.slot-[0-9]+$")


def default_tunnel_dir() -> Path:
    """``$FILEFORWARD_TUNNEL_DIR``, else ``~/.cache/fileforward/tunnel``.

    Under the home directory on purpose: it is the filesystem every node shares, so
    the same command on the login node and in a job meets in the same place.
    """
    env = os.environ.get(ENV_TUNNEL_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fileforward" / "tunnel"


def prepare(tunnel_dir: Union[str, Path, None], parents: bool = True) -> Tuple[Path, DirIdentity]:
    """Create the tunnel directory (0700) if needed, refuse an unsafe one.

    Whoever can write into the directory can inject bytes into every connection
    (and run code through RPC), so it must be ours and closed to group and others.
    Without `parents` only the directory itself is made again: a directory deleted
    with its parent (a finished job's directory) is not brought back.
    Returns the resolved path and the directory's identity, for `verify`.
    """
    path = absolute(tunnel_dir)
    if parents:
        make_dirs(path)
    elif not path.parent.is_dir():
        raise TunnelDirLostError(f"tunnel directory {path} was deleted with its parent {path.parent}; "
                                 f"not making them again")
    else:
        path.mkdir(mode=0o700, exist_ok=True)
    path = path.resolve()
    return path, _identity(check_safe(path))


def verify(path: Path, expected: DirIdentity) -> None:
    """Check, while in use, that `path` is still the safe directory `prepare` returned.

    UnsafeTunnelDirError if its owner or mode changed; TunnelDirLostError if it was
    deleted (or deleted and made again: our files in it are gone either way).
    """
    try:
        info = check_safe(path)
    except FileNotFoundError:
        raise TunnelDirLostError(f"tunnel directory {path} was deleted while in use") from None
    if _identity(info) != expected:
        raise TunnelDirLostError(f"tunnel directory {path} was deleted (and made again) while in use")


def absolute(tunnel_dir: Union[str, Path, None]) -> Path:
    """The absolute path of `tunnel_dir` (None: the default), "~" expanded."""
    path = Path(tunnel_dir).expanduser() if tunnel_dir is not None else default_tunnel_dir()
    return Path(os.path.abspath(path))


def make_dirs(path: Path) -> bool:
    """Create `path` and its missing parents (0700). True if we created `path`."""
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    created = False
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
            created = True
        except FileExistsError:
            created = False
    return created


def check_safe(path: Path) -> os.stat_result:
    """Raise UnsafeTunnelDirError naming the fix if `path` is not private to us.

    Returns its (lstat) status, whose st_dev/st_ino identify this directory: a
    directory deleted and made again under the same name has another identity.
    """
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeTunnelDirError(f"tunnel directory {path} is not a directory; choose another --tunnel_dir")
    if info.st_uid != os.getuid():
        raise UnsafeTunnelDirError(
            f"tunnel directory {path} is owned by uid {info.st_uid}, not by you (uid {os.getuid()}): "
            f"anyone who can write there can inject data into your connections; "
            f"use a directory of your own with --tunnel_dir"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise UnsafeTunnelDirError(
            f"tunnel directory {path} is writable by group or others (mode {mode:o}): "
            f"anyone who can write there can inject data into your connections; "
            f"fix it with: chmod 700 {path}"
        )
    return info


def _identity(info: os.stat_result) -> DirIdentity:
    return info.st_dev, info.st_ino


def bell_path(tunnel_dir: Path, eid: str) -> Path:
    """The bell file of endpoint `eid`."""
    return tunnel_dir / (eid + BELL_SUFFIX)


def chunk_paths(tunnel_dir: Path, cid: str) -> "tuple[Path, Path]":
    """(client-to-server, server-to-client) first chunk files of connection `cid`."""
    return tunnel_dir / (cid + TO_SERVER), tunnel_dir / (cid + TO_CLIENT)


def segment_path(first: Path, number: int) -> Path:
    """Segment `number` of the chunk file whose first segment is `first`."""
    return first if number == 0 else first.with_name(f"{first.name}.{number}")


def slot_claim_path(tunnel_dir: Path, owner: str, index: int) -> Path:
    """The file whose exclusive creation gives its creator slot `index` of `owner`'s bell."""
    return tunnel_dir / f"{owner}{SLOT_CLAIM}{index}"


def slot_claims(tunnel_dir: Path, owner: str) -> List[Path]:
    """Every claim of a slot in `owner`'s bell, seen or not by its owner yet (a
    listing: only for the owner's clean exit)."""
    return [tunnel_dir / name for name in os.listdir(tunnel_dir)
            if _CLAIM.match(name) and name.startswith(owner + SLOT_CLAIM)]


def files_by_owner(tunnel_dir: Path, but: str) -> Dict[str, List[str]]:
    """The tunnel files of every endpoint but `but`, by owner (a listing: only for
    cleaning up, never for anything a user waits for)."""
    owners: Dict[str, List[str]] = {}
    for name in os.listdir(tunnel_dir):
        owner = owner_of(name)
        if owner is not None and owner != but:
            owners.setdefault(owner, []).append(name)
    return owners


def owner_of(name: str) -> Optional[str]:
    """The endpoint id that owns a tunnel file name, or None for other names."""
    if name.endswith(BELL_SUFFIX) or name.endswith(BELL_SUFFIX + NEW_SUFFIX):
        return name.split(".", 1)[0]
    if _CHUNK.match(name):
        return name.split("-", 1)[0]
    if _CLAIM.match(name):
        return name.split(".", 1)[0]
    return None
