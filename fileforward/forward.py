"""The two sides of `fileforward`, each an async context manager that serves while open.

- listening() is `--server` (login node): a TCP listener; each accepted connection
  goes into the tunnel directory.
- connecting() is `--client` (next to the service): the tunnel directory's server;
  each connection it accepts goes to HOST:PORT.

The command runs one of them; `fileforward demo` runs both in one process.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional, Set

from . import tunneldir
from .cliargs import dir_option
from .api import Connector, Server, start_server
from .errors import NoServerError
from .options import Options
from .pump import Spliced, Streams, reset, splice

log = logging.getLogger("fileforward")


class Fatal(Exception):
    """An error the user can fix: shown as one line, no traceback."""


def prepare_tunnel_dir(requested: Optional[Path]) -> Path:
    """Create the tunnel directory if needed, and say so: a mistyped path would
    otherwise be created silently, and the two sides would never meet."""
    path = tunneldir.absolute(requested)
    try:
        created = tunneldir.make_dirs(path)
    except OSError as exc:
        raise Fatal(f"cannot create tunnel directory {path}: {exc.strerror or exc}") from None
    if created:
        log.info("created tunnel directory %s; the other side must use the same path", path)
    return path


class Connections:
    """The splices in progress, so that shutdown can end them all."""

    def __init__(self) -> None:
        self._tasks: Set[asyncio.Task] = set()

    async def run(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        try:
            await task
        except asyncio.CancelledError:  # ended by cancel_all: a normal end for the server's callback
            pass
        finally:
            self._tasks.discard(task)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _forward(name: str, a: Streams, b: Streams) -> None:
    """Splice a (user side) with b (service side); one DEBUG line when it ends."""
    stats = Spliced()
    try:
        await splice(a, b, stats)
    finally:
        log.debug("connection %s: %d bytes to the service, %d bytes back, %.3f s, %s",
                  name, stats.forward, stats.backward, stats.seconds, stats.describe())


@dataclasses.dataclass(frozen=True)
class Listening:
    """A running `--server`: where it listens and which tunnel it feeds."""

    tunnel_dir: Path
    bind: str
    port: int
    connector: Connector


@contextlib.asynccontextmanager
async def listening(tunnel_dir: Optional[Path], bind: str, port: int,
                    options: Options) -> AsyncIterator[Listening]:
    """`--server`: listen on bind:port (port 0: any free port) while the context is open."""
    connections = Connections()
    requested = tunneldir.absolute(tunnel_dir)
    connector = Connector(requested, options, peer_name="fileforward --client")

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "%s:%d" % writer.get_extra_info("peername")[:2]
        try:
            tunnel = await connector.open_connection()
        except BaseException as exc:  # cancelled too: a connection never served is reset, not ended
            reset(writer)
            where = connector.tunnel_dir or requested
            if isinstance(exc, NoServerError):  # the transport's words say "server" for the user's --client
                log.warning("no fileforward --client is serving tunnel %s (start it next to the service: "
                            "fileforward --client --port %d %s)", where, port, dir_option(where, "tunnel"))
            elif isinstance(exc, OSError):
                log.warning("connection from %s: cannot open a connection through tunnel %s: %s", peer, where, exc)
            else:
                raise
            return
        await _forward(f"from {peer} via {tunnel[1].get_extra_info('connection_id')}", (reader, writer), tunnel)

    try:  # first, so that a busy port (the likelier mistake) creates nothing
        server = await asyncio.start_server(lambda r, w: connections.run(accept(r, w)), bind, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise Fatal(f"port {port} on {bind} is already in use; choose another --port") from None
        raise Fatal(f"cannot listen on {bind}:{port}: {exc.strerror or exc}") from None
    port = server.sockets[0].getsockname()[1]  # the one chosen, if asked for port 0
    async with server:
        await asyncio.to_thread(prepare_tunnel_dir, requested)  # filesystem calls stay off the event loop
        async with connector:
            try:
                yield Listening(connector.tunnel_dir, bind, port, connector)
            finally:
                server.close()
                await connections.cancel_all()


@contextlib.asynccontextmanager
async def connecting(tunnel_dir: Optional[Path], host: str, port: int, options: Options,
                     force: bool = False) -> AsyncIterator[Server]:
    """`--client`: serve the tunnel directory while the context is open, connecting
    each connection to host:port. The Server's wait_closed() returns if another
    `--client --force` took over."""

    async def accept(tunnel_reader: asyncio.StreamReader, tunnel_writer: asyncio.StreamWriter) -> None:
        name = f"{tunnel_writer.get_extra_info('connection_id')} to {host}:{port}"
        try:
            service = await asyncio.open_connection(host, port)
        except BaseException as exc:  # cancelled too: a connection never served is reset, not ended
            if not isinstance(exc, OSError):
                reset(tunnel_writer)
                raise
            why = f"cannot connect to {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}"
            reset(tunnel_writer, f"it {why}")
            log.warning("%s", why)
            return
        await _forward(name, (tunnel_reader, tunnel_writer), service)

    async with serving_tunnel(accept, tunnel_dir, options, force, "fileforward --server") as server:
        yield server


@contextlib.asynccontextmanager
async def serving_tunnel(handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                         tunnel_dir: Optional[Path], options: Options, force: bool,
                         peer_name: str) -> AsyncIterator[Server]:
    """Serve the tunnel directory while the context is open, each connection to
    `handle`; closing it ends them all. `peer_name` names the other side in logs."""
    connections = Connections()
    path = await asyncio.to_thread(prepare_tunnel_dir, tunnel_dir)  # filesystem calls stay off the event loop
    server = await start_server(lambda r, w: connections.run(handle(r, w)), path,
                                force=force, options=options, peer_name=peer_name)
    try:
        yield server
    finally:
        await connections.cancel_all()
        await server.shutdown()


async def until_stopped(stop: asyncio.Event, ended: Awaitable[None]) -> None:
    """Wait for a stop request, or for `ended`: the tunnel endpoint stopped (it failed,
    or, for a server, another side took the directory over with --force)."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(ended)]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()


async def serve_until_stopped(server: Server, stop: asyncio.Event, role: str) -> None:
    """A tunnel server (`--client`, `serve`) until a stop request, a failure (raised
    when the server shuts down), or another `role --force` taking the directory over."""
    await until_stopped(stop, server.wait_closed())
    if server.stepped_down_for:
        log.warning("another %s (%s) took over %s with --force; exiting", role, server.stepped_down_for,
                    server.tunnel_dir)
