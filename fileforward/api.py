"""The public asyncio API, in the shape of asyncio.open_connection / start_server."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Tuple, Union

from .endpoint import Endpoint
from .errors import EndpointFailedError
from .loops import call_soon_if_open
from .options import Options
from .transport import FileTransport
from .tunneldir import default_tunnel_dir

PathLike = Union[str, Path, None]
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Optional[Awaitable[None]]]
STREAM_LIMIT = 2 ** 16


def _client_streams(loop: asyncio.AbstractEventLoop, transport: FileTransport,
                    limit: int) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The standard asyncio stream pair over a tunnel transport, as asyncio builds it for TCP."""
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.attach(loop, protocol)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def _serve_streams(loop: asyncio.AbstractEventLoop, transport: FileTransport, limit: int,
                   callback: ClientConnected) -> None:
    """Hand an accepted connection to `callback`, which StreamReaderProtocol calls with its own pair."""
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport.attach(loop, asyncio.StreamReaderProtocol(reader, callback, loop=loop))


class Connector:
    """Opens any number of connections to the server of one tunnel directory.

    All its connections share one endpoint (one I/O thread, one bell), so the idle
    cost stays constant however many are open. Use as ``async with``, or close().
    `peer_name` names the server in log lines (default "tunnel server").
    """

    def __init__(self, tunnel_dir: PathLike = None, options: Optional[Options] = None, *,
                 peer_name: Optional[str] = None, **knobs: Any) -> None:
        self._tunnel_dir = tunnel_dir
        self._peer_name = peer_name
        self._options = (options or Options()).replace(**knobs)
        self._endpoint: Optional[Endpoint] = None
        self._starting: Optional[asyncio.Future] = None

    @property
    def tunnel_dir(self) -> Optional[Path]:
        """The resolved tunnel directory, once started."""
        return self._endpoint.tunnel_dir if self._endpoint is not None else None

    async def start(self, autostop: bool = False) -> "Connector":
        """Create the endpoint (done by the first open_connection if not called)."""
        if self._starting is None:
            loop = asyncio.get_running_loop()
            self._starting = loop.create_future()
            endpoint = Endpoint(_as_path(self._tunnel_dir), loop, self._options, autostop=autostop,
                                peer_name=self._peer_name)
            try:
                await endpoint.start()
            except BaseException as exc:
                self._starting.set_exception(exc)
                self._starting.exception()  # retrieved here; re-raised to every waiter below
                raise
            self._endpoint = endpoint
            self._starting.set_result(None)
        await asyncio.shield(self._starting)
        return self

    async def open_connection(self, *, limit: int = STREAM_LIMIT) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection: (StreamReader, StreamWriter). NoServerError if no server answers."""
        await self.start()
        assert self._endpoint is not None
        transport = await self._endpoint.connect()
        return _client_streams(asyncio.get_running_loop(), transport, limit)

    async def close(self) -> None:
        """Close every connection (the peers see a reset) and remove our files."""
        if self._endpoint is not None:
            self._endpoint.stop()
            await self._endpoint.wait_stopped()

    async def wait_closed(self) -> None:
        """Wait until the endpoint stops: after close(), or when it fails (see `failure`).

        A program that lives for its connections waits for this too, so that it does
        not stay up unable to serve."""
        await self.start()
        assert self._endpoint is not None
        await self._endpoint.wait_stopped()

    @property
    def failure(self) -> Optional[EndpointFailedError]:
        """Why the endpoint stopped by itself (already logged at ERROR), else None."""
        return self._endpoint.failure if self._endpoint is not None else None

    async def __aenter__(self) -> "Connector":
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def open_connection(tunnel_dir: PathLike = None, *, limit: int = STREAM_LIMIT,
                          options: Optional[Options] = None, peer_name: Optional[str] = None, **knobs: Any
                          ) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the server of `tunnel_dir`, like asyncio.open_connection.

    The connection gets an endpoint of its own that goes away when it closes; to
    open many connections, share one with a Connector. `peer_name`: see Connector.
    Knobs: see Options.
    """
    connector = Connector(tunnel_dir, options, peer_name=peer_name, **knobs)
    await connector.start(autostop=True)
    try:
        return await connector.open_connection(limit=limit)
    except BaseException:
        await connector.close()
        raise


class Server:
    """What start_server returns: the asyncio.Server interface, for a tunnel directory."""

    def __init__(self, endpoint: Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        self._endpoint = endpoint
        self._loop = loop
        self._closed = loop.create_future()
        self.stepped_down_for: Optional[str] = None
        endpoint.stopped.add_done_callback(lambda _: call_soon_if_open(loop, self._mark_closed))

    def _mark_closed(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    @property
    def tunnel_dir(self) -> Path:
        """The resolved tunnel directory served."""
        return self._endpoint.tunnel_dir

    @property
    def sockets(self) -> tuple:
        """No sockets: connections come through the tunnel directory."""
        return ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return not self._closed.done()

    def close(self) -> None:
        """Stop accepting. Open connections go on; the endpoint ends after the last."""
        if self._closed.done():
            return
        done = self._endpoint.stop_serving()
        self._endpoint.autostop = True
        self._endpoint.wake()
        asyncio.wrap_future(done, loop=self._loop).add_done_callback(lambda _: self._mark_closed())

    def _stepped_down(self, description: str) -> None:
        self.stepped_down_for = description
        self._endpoint.autostop = True
        self._mark_closed()

    @property
    def failure(self) -> Optional[EndpointFailedError]:
        """Why the server stopped by itself (already logged at ERROR), else None."""
        return self._endpoint.failure

    async def wait_closed(self) -> None:
        """Wait until the server stopped accepting (after close(), a stepdown, or a
        failure: see `failure`)."""
        await asyncio.shield(self._closed)

    async def shutdown(self) -> None:
        """Stop accepting, reset every open connection and remove our files.
        EndpointFailedError if the endpoint had failed."""
        self.close()
        self._endpoint.stop()
        await self._endpoint.wait_stopped()
        await self.wait_closed()
        self._endpoint.raise_failure()

    async def start_serving(self) -> None:
        """Already serving since start_server returned (asyncio.Server compatibility)."""

    async def serve_forever(self) -> None:
        """Serve until close() (or a stepdown); cancelling this closes the server.
        EndpointFailedError if the endpoint failed."""
        try:
            await asyncio.shield(self._closed)
        except asyncio.CancelledError:
            self.close()
            raise
        self._endpoint.raise_failure()

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(client_connected_cb: ClientConnected, tunnel_dir: PathLike = None, *,
                       limit: int = STREAM_LIMIT, force: bool = False, options: Optional[Options] = None,
                       peer_name: Optional[str] = None, **knobs: Any) -> Server:
    """Serve connections made through `tunnel_dir`, like asyncio.start_server.

    One server per directory: ServerAlreadyRunningError if another is alive, unless
    `force`, which asks it to step down. `peer_name` names the clients in log lines
    (default "tunnel client"). Knobs: see Options.
    """
    loop = asyncio.get_running_loop()
    server: Optional[Server] = None

    def on_accept(transport: FileTransport) -> None:
        _serve_streams(loop, transport, limit, client_connected_cb)

    def on_stepdown(description: str) -> None:
        if server is not None:
            server._stepped_down(description)

    endpoint = Endpoint(_as_path(tunnel_dir), loop, (options or Options()).replace(**knobs), serve=True,
                        force=force, on_accept=on_accept, on_stepdown=on_stepdown, peer_name=peer_name)
    await endpoint.start()
    server = Server(endpoint, loop)
    return server


def _as_path(tunnel_dir: PathLike) -> Path:
    return Path(tunnel_dir) if tunnel_dir is not None else default_tunnel_dir()
