"""The shared key, and the HMAC challenge-response that proves both ends hold it.

Both ends send a fresh random nonce; each answers with an HMAC over both nonces
and its role, so the key never travels, an answer cannot be replayed on another
connection, and a server's answer cannot be reflected back as a client's.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Optional, Union

from .errors import AuthenticationError

log = logging.getLogger(__name__)

#: Environment variable naming the key file (overrides the default location).
KEY_ENV = "FILEFORWARD_RPC_KEY"
NONCE_BYTES = 16
_KEY_BYTES = 32

PathLike = Union[str, "os.PathLike[str]"]


def default_key_path() -> Path:
    """``$FILEFORWARD_RPC_KEY``, else ``~/.cache/fileforward/rpc.key``.

    The home directory is shared by login and compute nodes, so both ends find the
    same key without copying anything.
    """
    env = os.environ.get(KEY_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fileforward" / "rpc.key"


def load_key(key_file: Optional[PathLike] = None, *, create: bool = False) -> bytes:
    """Read the key (creating it ``0600`` first if ``create`` and it is missing).

    Refuses a key file that others could read or that another user owns: anyone
    who can read the key can run code as you through the server.
    """
    path = Path(key_file).expanduser() if key_file is not None else default_key_path()
    if create and not path.exists():
        _create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise AuthenticationError(
            f"no RPC key file at {path}: start the server once on this filesystem to "
            f"create it, or point key_file= / ${KEY_ENV} at the server's key file") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid():
            raise AuthenticationError(f"RPC key file {path} is owned by uid {st.st_uid}, "
                                      f"not by you (uid {os.getuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise AuthenticationError(
                f"RPC key file {path} has mode {stat.S_IMODE(st.st_mode):o}, readable by "
                f"others; fix it with: chmod 600 {path}")
        key = f.read().strip()
    if not key:
        raise AuthenticationError(f"RPC key file {path} is empty")
    return key


def _create_key(path: Path) -> None:
    """Write a new random key atomically: a reader never sees a half-written key, and
    of two servers starting at once, one key wins and both use it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(_KEY_BYTES) + "\n")
        os.link(tmp, path)
        log.info("created a new RPC key file at %s", path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def new_nonce() -> str:
    """A fresh challenge, hex encoded for the JSON handshake."""
    return secrets.token_hex(NONCE_BYTES)


def answer(key: bytes, role: str, client_nonce: str, server_nonce: str) -> str:
    """The HMAC with which ``role`` ("client" or "server") proves it holds ``key``."""
    msg = f"fileforward-rpc/{role}/{client_nonce}/{server_nonce}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def check_answer(key: bytes, role: str, client_nonce: str, server_nonce: str,
                 mac: object) -> bool:
    """Constant-time check of the peer's answer (``role`` is the peer's role)."""
    return isinstance(mac, str) and hmac.compare_digest(
        answer(key, role, client_nonce, server_nonce), mac)
