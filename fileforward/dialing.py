"""The first line of a forwarded connection: where the `serve` side should connect.

A requesting process (`fileforward -L/-D/--http-proxy/-R`) opens a tunnel
connection to `fileforward serve` and writes one JSON line; `serve` answers with
one JSON line, then the connection carries the user's bytes both ways:

    -> {"v": 1, "open": "HOST:PORT"}            connect there from the serve side
    <- {"ok": true}   or   {"ok": false, "error": "why", "kind": "refused"}
    -> {"v": 1, "listen": "[BIND:]PORT"}        -R: listen on the serve side
    <- {"ok": true, "on": "127.0.0.1:PORT"}, then {"incoming": TOKEN} per connection
    -> {"v": 1, "take": TOKEN}                  -R: this tunnel connection carries it

The lines are small, bounded JSON, never pickle. `kind` tells the requesting side
which error its application should see (a SOCKS reply code, an HTTP status):
"rule" (refused by --permit), "refused", "unreachable" or "failed".
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from typing import Any, Dict, Optional

from .forwardspec import parse_destination

VERSION = 1
MAX_LINE = 4096


FAILURE_KINDS = ("rule", "refused", "unreachable", "failed")


class DialError(ConnectionError):
    """The serve side could not, or would not, connect where we asked."""

    def __init__(self, reason: str, kind: str = "failed") -> None:
        super().__init__(reason)
        self.kind = kind if kind in FAILURE_KINDS else "failed"


async def write_line(writer: asyncio.StreamWriter, message: Dict[str, Any]) -> None:
    """One JSON line."""
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


async def read_line(reader: asyncio.StreamReader) -> Dict[str, Any]:
    """One JSON object line of at most MAX_LINE bytes; ValueError if it is anything else."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ValueError(f"request line longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        raise ConnectionError(f"connection ended after {len(exc.partial)} bytes of a request line") from None
    if len(line) > MAX_LINE:
        raise ValueError(f"request line longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except ValueError:
        raise ValueError("request line is not JSON (is the other side `fileforward serve` "
                         "of the same version?)") from None
    if not isinstance(message, dict):
        raise ValueError("request line is not a JSON object")
    return message


async def request_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
    """Ask the serve side to connect to host:port; DialError if it did not."""
    destination = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    await write_line(writer, {"v": VERSION, "open": destination})
    answer = await read_line(reader)
    if not answer.get("ok"):
        raise DialError(str(answer.get("error", "refused")), str(answer.get("kind")))


def parse_open(message: Dict[str, Any]) -> "tuple[str, int]":
    """The destination of an open request; ValueError naming what is wrong."""
    if message.get("v") != VERSION:
        raise ValueError(f"request version {message.get('v')!r}, this fileforward speaks {VERSION}: "
                         f"run the same fileforward version on both sides")
    destination = message.get("open")
    if not isinstance(destination, str):
        raise ValueError("request has no destination")
    return parse_destination(destination)


async def answer(writer: asyncio.StreamWriter, error: Optional[DialError] = None, **details: str) -> None:
    """The serve side's answer: success (with `details`, e.g. where it listens), or
    the reason for a failure."""
    if error is None:
        await write_line(writer, {"ok": True, **details})
    else:
        await write_line(writer, {"ok": False, "error": str(error), "kind": error.kind})


def dial_error(exc: OSError, host: str, port: int) -> DialError:
    """A failed connect to host:port, as the requesting side will see it."""
    if isinstance(exc, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(exc, socket.gaierror) or exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        kind = "unreachable"
    else:
        kind = "failed"
    why = os.strerror(exc.errno) if exc.errno else str(exc)
    return DialError(f"cannot connect to {host}:{port}: {why}", kind)
