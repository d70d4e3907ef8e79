"""Where the byte streams come from: the file transport, TCP, Unix sockets, pipes.

The tunnel and pipes are asyncio transports driven by a protocol (the asyncio
driver); a pair of pipes is one transport here (:class:`Pipes`). TCP and Unix
sockets give a socket (for the sync driver).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Optional, Sequence, Set, Tuple, Union

from fileforward.listeners import bind_unix, remove_socket

from .errors import RPCError, ServerNotRunningError
from .throttle import ThrottledLog

log = logging.getLogger(__name__)

#: Environment variable overriding the default tunnel directory of the RPC server.
TUNNEL_DIR_ENV = "FILEFORWARD_RPC_TUNNEL_DIR"
#: Bind address when ``tcp=`` names only a port: other users of a login node can
#: reach its localhost ports, but not beyond.
DEFAULT_HOST = "127.0.0.1"
#: Seconds of silence after which a peer is presumed dead (while calls wait for it;
#: over the tunnel, at any time). Long, because a served function that holds the GIL
#: (a long C call) silences its whole process; a process that dies is noticed at once
#: over sockets, as its kernel closes them.
DEFAULT_LIVENESS_TIMEOUT = 60.0
ProtocolFactory = Callable[[], asyncio.Protocol]
SocketHandler = Callable[[socket.socket], Awaitable[None]]
TcpAddress = Union[str, int, Tuple[str, int]]


def default_tunnel_dir() -> Path:
    """``$FILEFORWARD_RPC_TUNNEL_DIR``, else ``~/.cache/fileforward/rpc-tunnel``.

    Separate from the port forwarder's default tunnel so that both can run at once.
    """
    env = os.environ.get(TUNNEL_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fileforward" / "rpc-tunnel"


@dataclass(frozen=True)
class Endpoint:
    """One way to reach (or serve) an RPC server."""

    kind: str  # "tunnel", "tcp", "unix", "command" or "stdio"
    address: Any
    #: A tunnel's transport knobs, as (name, value) pairs of fileforward.Options fields.
    knobs: Tuple[Tuple[str, Any], ...] = ()

    def __str__(self) -> str:
        if self.kind == "tcp":
            return f"tcp://{self.address[0]}:{self.address[1]}"
        if self.kind == "command":
            return "command " + shlex.join(self.address)
        return f"{self.kind}:{self.address}" if self.address else self.kind


def endpoint(tunnel_dir: Any = None, tcp: Optional[TcpAddress] = None,
             unix: Any = None, command: Union[str, Sequence[str], None] = None,
             stdio: bool = False, *, poll_max: Optional[float] = None,
             coherence: Optional[str] = None) -> Endpoint:
    """Pick the one transport the caller named; the default tunnel dir if none.
    ``poll_max`` and ``coherence`` (None: the transport's defaults) tune a tunnel."""
    given = [name for name, value in (("tunnel_dir", tunnel_dir), ("tcp", tcp),
                                      ("unix", unix), ("command", command),
                                      ("stdio", stdio or None)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of tunnel_dir, tcp, unix, command, stdio "
                         f"(got {', '.join(given)})")
    knobs = tuple((name, value) for name, value in (("poll_max", poll_max), ("coherence", coherence))
                  if value is not None)
    if knobs and given and given[0] != "tunnel_dir":
        raise ValueError(f"{' and '.join(name for name, _ in knobs)}: for the file transport (a "
                         f"tunnel directory) only, not {given[0]}")
    if tcp is not None:
        return Endpoint("tcp", parse_tcp(tcp))
    if unix is not None:
        return Endpoint("unix", os.fspath(Path(unix).expanduser()))
    if command is not None:
        return Endpoint("command", tuple(shlex.split(command) if isinstance(command, str)
                                         else command))
    if stdio:
        return Endpoint("stdio", None)
    return Endpoint("tunnel", Path(tunnel_dir).expanduser() if tunnel_dir is not None
                    else default_tunnel_dir(), knobs)


def parse_tcp(address: TcpAddress) -> Tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"``, ``"PORT"``, ``PORT`` or ``(HOST, PORT)``."""
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    host, _, port = str(address).rpartition(":")
    try:
        return host.strip("[]") or DEFAULT_HOST, int(port)
    except ValueError:
        raise ValueError(f"bad TCP address {address!r}: expected HOST:PORT") from None


# ---------------------------------------------------------------- client side

#: Endpoint kinds reached through a socket (see :func:`connect_socket`).
SOCKET_KINDS = ("tcp", "unix")


async def open_transport(ep: Endpoint, protocol_factory: ProtocolFactory, connect_timeout: float,
                         liveness_timeout: float) -> Optional["Child"]:
    """Connect ``protocol_factory()``'s protocol to a ``tunnel`` or ``command``
    endpoint (a tunnel with the endpoint's knobs).

    Returns, for ``command`` endpoints, the child process (None for the tunnel).
    """
    if ep.kind == "tunnel":
        import fileforward  # the transport layer; only needed for this endpoint
        try:
            await fileforward.create_connection(
                protocol_factory, ep.address, connect_timeout=connect_timeout,
                liveness_timeout=liveness_timeout, peer_name="RPC server", **dict(ep.knobs))
        except ConnectionRefusedError as exc:  # fileforward.NoServerError: its text
            raise _not_running(ep, connect_timeout) from exc  # advises fileforward users
        return None
    if ep.kind == "command":
        loop = asyncio.get_running_loop()
        try:
            _, child = await loop.subprocess_exec(
                lambda: Child(protocol_factory()), *ep.address,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        except OSError as exc:
            raise ServerNotRunningError(f"cannot start {ep}: {exc}") from exc
        return child
    raise ValueError(f"{ep} is reached with connect_socket()")


def connect_socket(ep: Endpoint, connect_timeout: float) -> socket.socket:
    """A blocking socket connected to a ``tcp`` or ``unix`` endpoint (TCP_NODELAY set).

    Refused connections are retried, with back-off, until ``connect_timeout``: a
    server that is still starting is waited for.
    """
    deadline = time.monotonic() + connect_timeout
    delay = 0.01
    while True:
        try:
            return _connect_once(ep, max(deadline - time.monotonic(), 0.01))
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if time.monotonic() + delay > deadline:
                raise _not_running(ep, connect_timeout, exc) from exc
        except socket.timeout as exc:
            raise _not_running(ep, connect_timeout, exc) from exc
        time.sleep(delay)  # back-off between connection attempts
        delay = min(delay * 2, 0.25)


def _connect_once(ep: Endpoint, timeout: float) -> socket.socket:
    if ep.kind == "tcp":
        sock = socket.create_connection(ep.address, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(ep.address)
        except BaseException:
            sock.close()
            raise
    sock.settimeout(None)
    return sock


def _not_running(ep: Endpoint, waited: float,
                 cause: Optional[BaseException] = None) -> ServerNotRunningError:
    """The error naming the fix: start an RPC server on that same endpoint."""
    address = f"{ep.address[0]}:{ep.address[1]}" if ep.kind == "tcp" else os.fspath(ep.address)
    flag = "--tunnel-dir" if ep.kind == "tunnel" else f"--{ep.kind}"
    reason = f" ({cause})" if cause is not None else ""
    return ServerNotRunningError(
        f"no RPC server answered at {ep} within {waited:g} s{reason}; start the RPC server "
        f"first: python -m rpc serve MODULE:ATTR {flag} {shlex.quote(address)}")


# ---------------------------------------------------------------- server side

class Listener:
    """A listening endpoint: asyncio's server, or the file transport's, plus cleanup."""

    def __init__(self, server: Any, address: str,
                 cleanup: Optional[Callable[[], None]] = None) -> None:
        self.server = server
        self.address = address
        self._cleanup = cleanup

    def close(self) -> None:
        """Stop accepting connections."""
        self.server.close()
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None

    async def wait_closed(self) -> None:
        """Wait until the listener is closed (or, for the tunnel, has failed)."""
        await self.server.wait_closed()

    @property
    def failure(self) -> Optional[BaseException]:
        """Why a tunnel listener stopped on its own (None: it did not, or not a tunnel)."""
        return getattr(self.server, "failure", None)


async def listen(ep: Endpoint, protocol_factory: ProtocolFactory, socket_handler: SocketHandler, *,
                 force: bool = False,
                 liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT) -> Listener:
    """Start accepting connections on ``ep``: the tunnel's each get a protocol from
    ``protocol_factory``, TCP and Unix sockets go to ``socket_handler`` as sockets."""
    if ep.kind == "tunnel":
        import fileforward
        server = await fileforward.create_server(protocol_factory, ep.address, force=force,
                                                 liveness_timeout=liveness_timeout, peer_name="RPC client",
                                                 **dict(ep.knobs))
        return Listener(server, str(Endpoint("tunnel", server.tunnel_dir)))  # absolute
    if ep.kind == "tcp":
        host, port = ep.address
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        host, port = sock.getsockname()[:2]
        return Listener(SocketServer(sock, socket_handler, f"accepting connections on {ep}"),
                        str(Endpoint("tcp", (host, port))))
    if ep.kind == "unix":
        try:
            sock = bind_unix(ep.address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RPCError(f"a server is already listening on {ep.address}") from None
            raise
        sock.listen(BACKLOG)
        return Listener(SocketServer(sock, socket_handler, f"accepting connections on {ep}"),
                        str(ep), lambda: remove_socket(ep.address))
    raise ValueError(f"cannot listen on {ep}")


#: Connections the kernel keeps waiting to be accepted (asyncio's default).
BACKLOG = 100
#: Seconds between attempts to accept a connection while out of descriptors.
ACCEPT_RETRY_DELAY = 1.0
#: ``accept()`` failures that mean "out of resources": retried, and logged counted.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class SocketServer:
    """Accepts connections on a listening TCP or Unix socket, on the event loop, and
    serves each with ``handler(socket)`` (TCP_NODELAY set) in a task of its own."""

    def __init__(self, sock: socket.socket, handler: SocketHandler, what: str) -> None:
        self.sock = sock
        sock.setblocking(False)
        self._failures = ThrottledLog(log, f"{what} failed (raise the descriptor limit: ulimit -n)")
        self._what = what
        self._serving: Set["asyncio.Task[None]"] = set()
        self._accepting = asyncio.ensure_future(self._accept(handler))

    async def _accept(self, handler: SocketHandler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except ConnectionAbortedError:
                continue  # the client gave up before we took it
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._failures.note(exc)
                else:
                    log.warning("%s failed: %s", self._what, exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)  # back-off, as asyncio's servers do
                continue
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.ensure_future(handler(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    def close(self) -> None:
        """Stop accepting (the connections go on)."""
        self._accepting.cancel()
        self.sock.close()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has been called."""
        await asyncio.wait({self._accepting})


class Pipes(asyncio.Transport):
    """Two pipes, one read and one written, as one duplex transport for ``protocol``
    (a subprocess's stdout and stdin, or our own stdin and stdout).

    The pipes report here as to a ``SubprocessProtocol`` (``READ_FD``: the pipe we
    read, ``WRITE_FD``: the one we write). The protocol hears of the end once: the
    first pipe that fails, or both closed; EOF on the read pipe comes first."""

    READ_FD, WRITE_FD = 1, 0  # named after the child's stdout and stdin

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self._pipes: Dict[int, asyncio.BaseTransport] = {}
        self._open = {self.READ_FD, self.WRITE_FD}
        self._lost = False

    def pipe_made(self, fd: int, pipe: asyncio.BaseTransport) -> None:
        """One pipe is connected; once both are, the protocol's connection is made."""
        self._pipes[fd] = pipe
        if len(self._pipes) == 2:
            self.protocol.connection_made(self)

    # ---- what the pipes report (the SubprocessProtocol interface)
    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.protocol.data_received(data)

    def pipe_connection_lost(self, fd: int, exc: Optional[Exception]) -> None:
        self._open.discard(fd)
        if self._lost:
            return
        if fd == self.READ_FD and exc is None:
            self.protocol.eof_received()
        if exc is not None or not self._open:
            self._lost = True
            self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    # ---- the transport the protocol writes to
    def write(self, data: Any) -> None:
        self._pipes[self.WRITE_FD].write(data)  # type: ignore[attr-defined]

    def is_closing(self) -> bool:
        return self._pipes[self.WRITE_FD].is_closing()

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.close()

    def abort(self) -> None:
        for pipe in self._pipes.values():
            pipe.abort()  # type: ignore[attr-defined]

    def pause_reading(self) -> None:
        self._pipes[self.READ_FD].pause_reading()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        self._pipes[self.READ_FD].resume_reading()  # type: ignore[attr-defined]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._pipes[self.WRITE_FD].get_extra_info(name, default)


class Child(Pipes):
    """A ``command=`` server: the subprocess's stdin and stdout as :class:`Pipes`,
    and the process itself (``loop.subprocess_exec``'s protocol)."""

    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__(protocol)
        self._process: Optional[asyncio.SubprocessTransport] = None
        self._exited: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._process = transport  # type: ignore[assignment]
        for fd in (self.WRITE_FD, self.READ_FD):
            self.pipe_made(fd, self._process.get_pipe_transport(fd))  # type: ignore[arg-type]

    def process_exited(self) -> None:
        self._exited.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        """The process and its pipes are all gone (the pipes told us already)."""

    @property
    def returncode(self) -> Optional[int]:
        """The exit status, once the process is gone."""
        return self._process.get_returncode() if self._process is not None else None

    async def reap(self, grace: float) -> None:
        """Let the server exit after its stdin closes; kill it if it lingers."""
        self.close()
        await asyncio.wait({self._exited}, timeout=grace)
        if not self._exited.done():
            assert self._process is not None
            self._process.kill()
            await self._exited
        self._process.close()  # type: ignore[union-attr]


class _PipeEnd(asyncio.Protocol):
    """The protocol of one pipe of :class:`Pipes` (``serve --stdio``)."""

    def __init__(self, pipes: Pipes, fd: int) -> None:
        self._pipes = pipes
        self._fd = fd

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._pipes.pipe_made(self._fd, transport)

    def data_received(self, data: bytes) -> None:
        self._pipes.pipe_data_received(self._fd, data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._pipes.pipe_connection_lost(self._fd, exc)

    def pause_writing(self) -> None:
        self._pipes.pause_writing()

    def resume_writing(self) -> None:
        self._pipes.resume_writing()


async def connect_stdio(protocol: asyncio.Protocol, in_fd: int, out_fd: int) -> None:
    """Drive ``protocol`` over two pipe file descriptors (``serve --stdio``)."""
    loop = asyncio.get_running_loop()
    pipes = Pipes(protocol)
    await loop.connect_write_pipe(lambda: _PipeEnd(pipes, Pipes.WRITE_FD),
                                  os.fdopen(out_fd, "wb", buffering=0))
    await loop.connect_read_pipe(lambda: _PipeEnd(pipes, Pipes.READ_FD),
                                 os.fdopen(in_fd, "rb", buffering=0))


def claim_stdio() -> Tuple[int, int]:
    """Take stdin/stdout for the protocol and return their new descriptors.

    Descriptor 1 then points at stderr and 0 at /dev/null, so a stray ``print()``
    or ``input()`` in a served function cannot corrupt the frame stream.
    """
    import sys
    sys.stdout.flush()
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return in_fd, out_fd
