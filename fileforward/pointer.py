"""The server pointer: the `server` file that names the endpoint serving a tunnel directory.

One writer at a time: the serving endpoint writes it (JSON: eid, pid, host, boot
id, format) and holds its owner lock while it serves; a clean stop empties it (the
empty file stays: it is the lock's anchor). Readers open it afresh each time
(close-to-open: the open asks the file server), and treat anything they cannot
parse as "no server yet" (they may read while it is rewritten).
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

from . import tunneldir
from .errors import ProtocolError
from .files import TABLE, SharedFile
from .records import FORMAT_VERSION

EID_RE = re.compile(r"^[0-9a-f]{16}$")


def path_in(tunnel_dir: Path) -> Path:
    """Where the pointer of `tunnel_dir` is."""
    return tunnel_dir / tunneldir.SERVER_FILE


def parse(data: bytes) -> Optional[dict]:
    """The pointer's fields, or None for an empty or partly written file."""
    try:
        info = json.loads(data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def read(tunnel_dir: Path) -> Optional[dict]:
    """The current pointer (None: no server), checked for our on-disk format:
    ProtocolError naming both versions if another one serves here."""
    try:
        pointer = TABLE.open(path_in(tunnel_dir))
    except FileNotFoundError:
        return None
    try:
        info = parse(pointer.read())
    finally:
        TABLE.release(pointer)
    if info is not None and info.get("format") != FORMAT_VERSION:
        raise ProtocolError(
            f"tunnel directory {tunnel_dir} is served with tunnel format {info.get('format')}, "
            f"this fileforward speaks format {FORMAT_VERSION}: install the same fileforward version on both sides")
    return info


def server_eid(info: Optional[dict]) -> Optional[str]:
    """The endpoint id a pointer names, if it is a valid one."""
    eid = str(info.get("eid", "")) if info else ""
    return eid if EID_RE.match(eid) else None


def describe(info: Optional[dict]) -> str:
    """"pid P on host H" of the server a pointer names."""
    info = info or {}
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


def write(pointer: SharedFile, eid: str, boot: str, sync: bool) -> None:
    """Name ourselves as the server."""
    pointer.replace(json.dumps({
        "eid": eid, "pid": os.getpid(), "host": socket.gethostname(), "boot": boot,
        "format": FORMAT_VERSION, "started": time.time(),
    }).encode(), sync)
