"""The public asyncio API, in the shape of asyncio.open_connection / start_server."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Tuple, TypeVar, Union

from .endpoint import Endpoint
from .errors import EndpointFailedError
from .loops import call_soon_if_open
from .options import Options
from .transport import FileTransport
from .tunneldir import default_tunnel_dir

PathLike = Union[str, Path, None]
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Optional[Awaitable[None]]]
STREAM_LIMIT = 2 ** 16
P = TypeVar("P", bound=asyncio.BaseProtocol)


def _stream_pair(loop: asyncio.AbstractEventLoop, limit: int, callback: Optional[ClientConnected] = None
                 ) -> Tuple[asyncio.StreamReader, asyncio.StreamReaderProtocol]:
    """The reader and protocol of asyncio's own streams; with `callback`, the protocol
    hands an accepted connection's (reader, writer) pair to it."""
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    return reader, asyncio.StreamReaderProtocol(reader, callback, loop=loop)


def _streams(loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, reader: asyncio.StreamReader,
             protocol: asyncio.StreamReaderProtocol) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The standard asyncio stream pair over a tunnel transport, as asyncio builds it for TCP."""
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


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

    async def create_connection(self, protocol_factory: Callable[[], P]) -> Tuple[asyncio.Transport, P]:
        """A new connection driven by a protocol, like loop.create_connection:
        (transport, protocol). NoServerError if no server answers."""
        await self.start()
        assert self._endpoint is not None
        transport = await self._endpoint.connect()
        protocol = protocol_factory()
        transport.attach(asyncio.get_running_loop(), protocol)
        return transport, protocol

    async def open_connection(self, *, limit: int = STREAM_LIMIT) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection: (StreamReader, StreamWriter). NoServerError if no server answers."""
        loop = asyncio.get_running_loop()
        reader, protocol = _stream_pair(loop, limit)
        transport, _ = await self.create_connection(lambda: protocol)
        return _streams(loop, transport, reader, protocol)

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


async def create_connection(protocol_factory: Callable[[], P], tunnel_dir: PathLike = None, *,
                            options: Optional[Options] = None, peer_name: Optional[str] = None,
                            **knobs: Any) -> Tuple[asyncio.Transport, P]:
    """Connect to the server of `tunnel_dir`, like loop.create_connection.

    The connection gets an endpoint of its own that goes away when it closes; to
    open many connections, share one with a Connector. `peer_name`: see Connector.
    Knobs: see Options.
    """
    connector = Connector(tunnel_dir, options, peer_name=peer_name, **knobs)
    await connector.start(autostop=True)
    try:
        return await connector.create_connection(protocol_factory)
    except BaseException:
        await connector.close()
        raise


async def open_connection(tunnel_dir: PathLike = None, *, limit: int = STREAM_LIMIT,
                          options: Optional[Options] = None, peer_name: Optional[str] = None, **knobs: Any
                          ) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the server of `tunnel_dir`, like asyncio.open_connection (see
    create_connection)."""
    loop = asyncio.get_running_loop()
    reader, protocol = _stream_pair(loop, limit)
    transport, _ = await create_connection(lambda: protocol, tunnel_dir, options=options,
                                           peer_name=peer_name, **knobs)
    return _streams(loop, transport, reader, protocol)


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


async def create_server(protocol_factory: Callable[[], asyncio.BaseProtocol], tunnel_dir: PathLike = None, *,
                        force: bool = False, options: Optional[Options] = None,
                        peer_name: Optional[str] = None, **knobs: Any) -> Server:
    """Serve connections made through `tunnel_dir`, each driven by a new protocol,
    like loop.create_server.

    One server per directory: ServerAlreadyRunningError if another is alive, unless
    `force`, which asks it to step down. `peer_name` names the clients in log lines
    (default "tunnel client"). Knobs: see Options.
    """
    loop = asyncio.get_running_loop()
    server: Optional[Server] = None

    def on_accept(transport: FileTransport) -> None:
        transport.attach(loop, protocol_factory())

    def on_stepdown(description: str) -> None:
        if server is not None:
            server._stepped_down(description)

    endpoint = Endpoint(_as_path(tunnel_dir), loop, (options or Options()).replace(**knobs), serve=True,
                        force=force, on_accept=on_accept, on_stepdown=on_stepdown, peer_name=peer_name)
    await endpoint.start()
    server = Server(endpoint, loop)
    return server


async def start_server(client_connected_cb: ClientConnected, tunnel_dir: PathLike = None, *,
                       limit: int = STREAM_LIMIT, force: bool = False, options: Optional[Options] = None,
                       peer_name: Optional[str] = None, **knobs: Any) -> Server:
    """Serve connections made through `tunnel_dir`, like asyncio.start_server (see
    create_server)."""
    loop = asyncio.get_running_loop()
    return await create_server(lambda: _stream_pair(loop, limit, client_connected_cb)[1], tunnel_dir,
                               force=force, options=options, peer_name=peer_name, **knobs)


def _as_path(tunnel_dir: PathLike) -> Path:
    return Path(tunnel_dir) if tunnel_dir is not None else default_tunnel_dir()
