"""The `fileforward` command: forward a TCP port through a shared directory.

    login node:  fileforward --server --port 8888   (listens on 127.0.0.1:8888)
    in the job:  fileforward --client --port 8888   (connects to localhost:8888)

Each connection accepted by --server travels through the tunnel directory to
--client, which opens a connection to the service. Both start in either order.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import sys
from typing import Awaitable, Callable, List, Optional, Set

from . import __version__
from .api import Connector, start_server
from .errors import NoServerError
from .options import MiB, Options
from .pump import splice
from .tunneldir import ENV_TUNNEL_DIR, default_tunnel_dir

log = logging.getLogger("fileforward")

DESCRIPTION = """\
Forward a TCP port through a directory shared by two machines (e.g. an HPC login
node and a compute node that cannot connect to each other).

  on the login node:   fileforward --server --port 8888
  in the SLURM job:    fileforward --client --port 8888

--server listens on 127.0.0.1:PORT and carries every connection through the
tunnel directory; --client connects each one to localhost:PORT. Then, from your
laptop: ssh -L 8888:localhost:8888 login-node, and open http://localhost:8888.
"""

EPILOG = f"""\
The tunnel directory defaults to ${ENV_TUNNEL_DIR}, else ~/.cache/fileforward/tunnel
(currently {default_tunnel_dir()}): the same command on both nodes meets there when
the home directory is shared. Use one directory per forwarded service. It is created
mode 0700; a directory writable by others is refused.
SIGINT/SIGTERM shut down cleanly: connections closed, tunnel files removed, exit 0.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"fileforward: error: {message} (see fileforward --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, FileForward compatible (--server/--client, --port, --tunnel_dir)."""
    parser = _Parser(prog="fileforward", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    role = parser.add_mutually_exclusive_group(required=True)
    role.add_argument("--server", action="store_true",
                      help="listen on BIND:PORT and send each connection through the tunnel (login node)")
    role.add_argument("--client", action="store_true",
                      help="take connections from the tunnel and connect each to HOST:PORT (next to the service)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on (--server) or connect to (--client)")
    parser.add_argument("--tunnel_dir", "--tunnel-dir", dest="tunnel_dir", metavar="DIR",
                        help="shared directory the connections travel through (default: see below)")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="--server: address to listen on (default 127.0.0.1: other users of a shared "
                             "login node cannot reach it from elsewhere)")
    parser.add_argument("--host", default="localhost", help="--client: host to connect to (default localhost)")
    parser.add_argument("--force", action="store_true",
                        help="--client: make a running --client on the same tunnel directory step down")
    parser.add_argument("--connect-timeout", type=float, default=Options.connect_timeout, metavar="S",
                        help="--server: give up on a connection if no --client answers within S seconds (default %(default)s)")
    parser.add_argument("--liveness-timeout", type=float, default=Options.liveness_timeout, metavar="S",
                        help="declare the other side dead after S seconds without a sign of life (default %(default)s)")
    parser.add_argument("--poll-max", type=float, default=Options.poll_max, metavar="S",
                        help="longest polling interval when idle, in seconds (default %(default)s)")
    parser.add_argument("--window", type=float, default=Options.window / MiB, metavar="MIB",
                        help="unread data allowed on disk per connection and direction, MiB (default %(default)g)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="default %(default)s")
    parser.add_argument("--log-file", metavar="FILE", help="also append the log to FILE (default: stderr only)")
    parser.add_argument("--version", action="version", version=f"fileforward {__version__}")
    return parser


def _setup_logging(level: str, log_file: Optional[str]) -> None:
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, handlers=handlers,
                        format="%(asctime)s fileforward[%(process)d] %(levelname)s %(message)s")


class _Connections:
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
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


async def _listen_side(args: argparse.Namespace, options: Options, stop: asyncio.Event) -> None:
    """--server: TCP listener on the login node; each connection goes into the tunnel."""
    connections = _Connections()
    async with Connector(args.tunnel_dir, options, peer_name="fileforward --client") as connector:

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                tunnel = await connector.open_connection()
            except (NoServerError, OSError) as exc:
                log.warning("%s", exc)
                writer.transport.abort()
                return
            await splice((reader, writer), tunnel)

        try:
            server = await asyncio.start_server(lambda r, w: connections.run(forward(r, w)), args.bind, args.port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _Fatal(f"port {args.port} on {args.bind} is already in use; choose another --port") from None
            raise _Fatal(f"cannot listen on {args.bind}:{args.port}: {exc.strerror}") from None
        log.info("forwarding %s:%d -> tunnel %s (the far end: fileforward --client --port PORT --tunnel_dir %s)",
                 args.bind, args.port, connector.tunnel_dir, connector.tunnel_dir)
        async with server:
            await stop.wait()
            server.close()
            await connections.cancel_all()


async def _connect_side(args: argparse.Namespace, options: Options, stop: asyncio.Event) -> None:
    """--client: next to the service; each tunneled connection goes to HOST:PORT."""
    connections = _Connections()

    async def forward(tunnel_reader: asyncio.StreamReader, tunnel_writer: asyncio.StreamWriter) -> None:
        try:
            service = await asyncio.open_connection(args.host, args.port)
        except OSError as exc:
            log.warning("cannot connect to %s:%d: %s", args.host, args.port, exc.strerror or exc)
            tunnel_writer.transport.reset(f"it cannot connect to {args.host}:{args.port}: {exc.strerror or exc}")
            return
        await splice((tunnel_reader, tunnel_writer), service)

    server = await start_server(lambda r, w: connections.run(forward(r, w)), args.tunnel_dir,
                                force=args.force, options=options, peer_name="fileforward --server")
    log.info("forwarding tunnel %s -> %s:%d (the far end: fileforward --server --port PORT --tunnel_dir %s)",
             server.tunnel_dir, args.host, args.port, server.tunnel_dir)
    stepped_down = asyncio.ensure_future(server.wait_closed())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stepped_down, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if server.stepped_down_for:
        log.warning("another fileforward --client (%s) took over %s with --force; exiting",
                    server.stepped_down_for, server.tunnel_dir)
    await connections.cancel_all()
    await server.shutdown()


class _Fatal(Exception):
    """An error the user can fix: one line, no traceback."""


async def _main(args: argparse.Namespace, options: Options) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    run: Callable[..., Awaitable[None]] = _listen_side if args.server else _connect_side
    await run(args, options, stop)
    log.info("stopped")


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the `fileforward` command."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level, args.log_file)
    try:
        if not 0 < args.port < 65536:
            raise _Fatal(f"--port must be between 1 and 65535, not {args.port}")
        options = Options(connect_timeout=args.connect_timeout, liveness_timeout=args.liveness_timeout,
                          poll_max=args.poll_max, window=int(args.window * MiB))
        asyncio.run(_main(args, options))
    except (_Fatal, OSError, ValueError) as exc:
        sys.stderr.write(f"fileforward: error: {exc}\n")
        sys.exit(1)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        sys.exit(130)
