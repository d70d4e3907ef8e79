"""Where a running proxy can be found: one small file per requesting process.

A requesting process with `-D` or `--http-proxy` on a TCP port writes
`proxy-<host>-<pid>.json` (mode 0600: it may hold the proxy's password) into its
tunnel directory, and removes it at exit. `fileforward env` and `fileforward run`
turn the proxy URLs into the environment variables that pip, git, curl and
requests read.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional

from .forwardspec import Listen
from .proxyproto import Credentials

PREFIX = "proxy-"
SUFFIX = ".json"
NO_PROXY = "localhost,127.0.0.1"


@dataclasses.dataclass(frozen=True)
class ProxyURLs:
    """The URLs of one process's proxies (None: that kind is not running)."""

    http: Optional[str] = None
    socks: Optional[str] = None

    def environment(self) -> Dict[str, str]:
        """HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY and their lowercase twins
        (curl reads only lowercase http_proxy). HTTP(S)_PROXY prefer the HTTP proxy
        (pip needs it: it speaks SOCKS only with an extra package); ALL_PROXY
        prefers SOCKS, with names resolved on the serve side (socks5h)."""
        http = self.http or self.socks
        everything = self.socks or self.http
        if http is None or everything is None:
            return {}
        values = {"HTTP_PROXY": http, "HTTPS_PROXY": http, "ALL_PROXY": everything, "NO_PROXY": NO_PROXY}
        return {**values, **{name.lower(): value for name, value in values.items()}}

    def export_lines(self) -> List[str]:
        """The shell lines that set environment()."""
        return [f"export {name}={shlex.quote(value)}" for name, value in self.environment().items()]


def url(scheme: str, listen: Listen, credentials: Optional[Credentials]) -> str:
    """A proxy URL for a TCP listener (0.0.0.0 is reached as 127.0.0.1)."""
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host
    host = f"[{host}]" if ":" in host else host
    user = f"{credentials.user}:{credentials.password}@" if credentials is not None else ""
    return f"{scheme}://{user}{host}:{listen.port}"


def write(tunnel_dir: Path, urls: ProxyURLs) -> Path:
    """Publish this process's proxy URLs; returns the file (remove() it at exit)."""
    path = tunnel_dir / f"{PREFIX}{socket.gethostname()}-{os.getpid()}{SUFFIX}"
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "http": urls.http, "socks": urls.socks}
    remove(path)  # a file of an earlier process with our pid
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)
    return path


def remove(path: Path) -> None:
    """Remove a proxy file (gone already is fine)."""
    path.unlink(missing_ok=True)


def newest_live(tunnel_dir: Path) -> Optional[ProxyURLs]:
    """The URLs of the newest proxy of a live process on this host, if any."""
    best: Optional[ProxyURLs] = None
    best_started = float("-inf")
    try:
        names = os.listdir(tunnel_dir)
    except FileNotFoundError:
        return None
    for name in names:
        if not (name.startswith(PREFIX) and name.endswith(SUFFIX)):
            continue
        try:
            with open(tunnel_dir / name) as source:
                record = json.load(source)
            host, pid, started = record["host"], int(record["pid"]), float(record["started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours to judge
        if host == socket.gethostname() and _alive(pid) and started > best_started:
            best, best_started = ProxyURLs(record.get("http"), record.get("socks")), started
    return best


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
