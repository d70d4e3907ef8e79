"""Local listeners: TCP on 127.0.0.1 unless told otherwise, or Unix sockets mode 0600.

On a shared login node every user can reach every 127.0.0.1 port; a Unix socket
readable by its owner only cannot be reached by anyone else.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import socket
import stat
from pathlib import Path
from typing import Awaitable, Callable

from .forwardspec import Listen

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def bind_unix(path: str) -> socket.socket:
    """A Unix socket bound at `path`, mode 0600 before it listens (so no other user
    ever connects); a stale socket of a dead process is replaced, a live one is an
    EADDRINUSE error."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody listens: a dead process's socket
            else:
                raise OSError(errno.EADDRINUSE, f"a process is already listening on {path}")
            finally:
                probe.close()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


def remove_socket(path: str) -> None:
    """Remove a Unix socket file we created (gone already is fine)."""
    Path(path).unlink(missing_ok=True)


def bind(listen: Listen) -> "tuple[Listen, socket.socket]":
    """A socket bound where `listen` says, and that address (port 0 replaced by the
    port chosen). OSError names the address on failure."""
    try:
        if listen.path is not None:
            return listen, bind_unix(listen.path)
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.create_server((listen.host, listen.port), family=family)
    except OSError as exc:
        why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise OSError(exc.errno, f"cannot listen on {listen}: {why}") from None
    return dataclasses.replace(listen, port=sock.getsockname()[1]), sock


async def start_listener(sock: socket.socket, handler: Handler) -> asyncio.AbstractServer:
    """Accept connections on a socket from bind(), handing each to `handler`."""
    if sock.family == socket.AF_UNIX:
        return await asyncio.start_unix_server(handler, sock=sock)
    return await asyncio.start_server(handler, sock=sock)


def stop_listener(listen: Listen, server: asyncio.AbstractServer) -> None:
    """Stop listening (open connections go on), and remove a Unix listener's socket file."""
    server.close()
    if listen.path is not None:
        remove_socket(listen.path)
