"""The `fileforward` command: forward a TCP port through a shared directory.

    login node:  fileforward --server --port 8888   (listens on 127.0.0.1:8888)
    in the job:  fileforward --client --port 8888   (connects to localhost:8888)
    anywhere:    fileforward demo                   (both sides in one process, measured)

Each connection accepted by --server travels through the tunnel directory to
--client, which opens a connection to the service. Both start in either order.
Commands (`demo`) are subcommands; the two roles are the classic
flags, so that `fileforward --server --port P` keeps working.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__, demo, doctor
from .cliargs import Parser, add_job_option, add_logging_options, dir_option, job_tunnel_dir, raise_descriptor_limit, \
    setup_logging
from .errors import EndpointFailedError
from .forward import Fatal, connecting, listening, prepare_tunnel_dir, serve_until_stopped, until_stopped
from .options import Options
from .netforward import ENV_NET_DIR
from .netcli import add_commands, add_forward_options, add_transport_options, has_forwards, run_requester, \
    transport_options
from .tunneldir import ENV_TUNNEL_DIR, default_tunnel_dir

log = logging.getLogger("fileforward")

DESCRIPTION = """\
Forward a TCP port through a directory shared by two machines (e.g. an HPC login
node and a compute node that cannot connect to each other).

  on the login node:   fileforward --server --port 8888
  in the SLURM job:    fileforward --client --port 8888
  try it here first:   fileforward demo

The internet (or any port) from a job, with ssh's habits (-L, -R, -D):

  on the login node:   fileforward serve
  in the SLURM job:    fileforward run -- pip install numpy
  what runs there:     fileforward status

--server listens on 127.0.0.1:PORT and carries every connection through the
tunnel directory; --client, next to the service, connects each one to
localhost:PORT. Then, from your laptop: ssh -L 8888:localhost:8888 login-node,
and open http://localhost:8888.
"""

EPILOG = f"""\
The tunnel directory defaults to ${ENV_TUNNEL_DIR}, else ~/.cache/fileforward/tunnel
(currently {default_tunnel_dir()}): the same command on both nodes meets there when
the home directory is shared. Use one directory per forwarded service; in a SLURM
job, --job picks the job's own. It is created mode 0700 (and logged); a directory
writable by others is refused.
SIGINT/SIGTERM shut down cleanly: connections reset, tunnel files removed, exit 0.
A connection that breaks (the other side killed, a damaged file) reaches the program
on its socket as a reset, never as a clean end.
"""


class StopRequest:
    """SIGINT / SIGTERM ask for a clean stop at any moment of the process's life,
    even before the event loop runs or while it shuts down: never a KeyboardInterrupt
    traceback."""

    def __init__(self) -> None:
        self.requested = False
        self._event: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: we are past the point of stopping
                pass

    def event(self) -> asyncio.Event:
        """An event set by a stop request (also one that came before); call it on the loop."""
        if self._event is None:
            self._event = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            if self.requested:
                self._event.set()
        return self._event


def build_parser() -> Parser:
    """The command line: the classic --server/--client form, and subcommands."""
    parser = Parser(prog="fileforward", description=DESCRIPTION, epilog=EPILOG)
    role = parser.add_mutually_exclusive_group()
    role.add_argument("--server", action="store_true",
                      help="listen on BIND:PORT and send each connection through the tunnel (login node)")
    role.add_argument("--client", action="store_true",
                      help="take connections from the tunnel and connect each to HOST:PORT (next to the service)")
    parser.add_argument("--port", type=int,
                        help="TCP port to listen on (--server) or connect to (--client); usually the same "
                             "number on both sides (required, no default)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tunnel-dir", metavar="DIR", type=Path,
                       help=f"shared directory the connections travel through (default: ${ENV_TUNNEL_DIR}, "
                            f"else ~/.cache/fileforward/tunnel; with -L/-R/-D/--http-proxy: "
                            f"${ENV_NET_DIR}, else ~/.cache/fileforward/net, as for serve)")
    add_job_option(where, "tunnel directory")
    parser.add_argument("--bind", default="127.0.0.1",
                        help="--server: address to listen on (default: 127.0.0.1, so that other users of a "
                             "shared login node cannot reach it from elsewhere)")
    parser.add_argument("--host", default="localhost", help="--client: host to connect to")
    parser.add_argument("--force", action="store_true",
                        help="--client: make a running --client on the same tunnel directory step down "
                             "(default: refuse to start)")
    add_transport_options(parser)
    add_forward_options(parser)
    add_logging_options(parser)
    parser.add_argument("--version", action="version", version=f"fileforward {__version__}")
    parser.set_defaults(run=_run_forward)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    try_it = commands.add_parser(
        "demo", help="run both sides on this machine, fetch a web page through them, print what was measured",
        description=demo.__doc__, epilog="Exit status 0 if every byte came through, 1 otherwise.")
    try_it.add_argument("--size", type=float, default=8.0, metavar="MIB", help="size of the download, in MiB")
    try_it.add_argument("--dir", type=Path, metavar="DIR",
                        help="create the temporary tunnel directory in DIR, e.g. on the shared filesystem "
                             "to measure it (default: the system's temporary directory)")
    add_logging_options(try_it, suppress_defaults=True, default_level="WARNING")
    try_it.set_defaults(run=_run_demo, default_log_level="WARNING")  # its report says it all
    add_commands(commands)
    doctor.add_command(commands, run=_run_doctor)
    return parser


def _tunnel_dir(parser: Parser, args: argparse.Namespace) -> Optional[Path]:
    if args.job is None:
        return args.tunnel_dir
    try:
        return job_tunnel_dir(args.job, "tunnel")
    except ValueError as exc:
        parser.error(str(exc))


async def _serve(args: argparse.Namespace, tunnel_dir: Optional[Path], options: Options, stop: StopRequest) -> None:
    """--server until a stop request, or until its tunnel endpoint fails."""
    async with listening(tunnel_dir, args.bind, args.port, options) as side:
        log.info("forwarding %s:%d -> tunnel %s (the other side, next to the service: "
                 "fileforward --client --port %d %s)",
                 side.bind, side.port, side.tunnel_dir, side.port, dir_option(side.tunnel_dir, "tunnel"))
        await until_stopped(stop.event(), side.connector.wait_closed())
    if side.connector.failure is not None:
        raise side.connector.failure


async def _client(args: argparse.Namespace, tunnel_dir: Optional[Path], options: Options,
                  stop: StopRequest) -> None:
    """--client until a stop request, until another --client --force takes over, or
    until its tunnel endpoint fails (then shutting down raises the failure)."""
    async with connecting(tunnel_dir, args.host, args.port, options, force=args.force) as server:
        log.info("forwarding tunnel %s -> %s:%d (the other side, on the login node: "
                 "fileforward --server --port %d %s)",
                 server.tunnel_dir, args.host, args.port, args.port, dir_option(server.tunnel_dir, "tunnel"))
        await serve_until_stopped(server, stop.event(), "fileforward --client")


def _run_forward(parser: Parser, args: argparse.Namespace, stop: StopRequest) -> int:
    """The classic form: `fileforward --server|--client --port P ...`, or a
    requesting process (`fileforward -L/-R/-D/--http-proxy ...`)."""
    if has_forwards(args):
        return run_requester(parser, args, stop)
    if not (args.server or args.client):
        parser.error("give --server (login node) or --client (next to the service), -L/-R/-D/--http-proxy "
                     "(with fileforward serve on the other side), or a command: demo, serve, env, run, status")
    if args.port is None:
        parser.error("--port is required with --server and --client")
    if not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    tunnel_dir, options = _tunnel_dir(parser, args), transport_options(parser, args)
    asyncio.run((_serve if args.server else _client)(args, tunnel_dir, options, stop))
    log.info("stopped")
    return 0


def _run_demo(parser: Parser, args: argparse.Namespace, stop: StopRequest) -> int:
    """`fileforward demo`: the whole path on this machine, measured."""
    if args.server or args.client or args.port is not None or args.tunnel_dir or args.job is not None:
        parser.error("demo makes its own tunnel: it takes no --server, --client, --port, --tunnel-dir or --job")
    if not 0 < args.size <= 1024:
        parser.error(f"--size must be more than 0 and at most 1024 MiB, not {args.size:g}")
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir} is not a directory")

    async def run() -> "tuple[demo.Measured, Path]":
        return await demo.run(args.dir, args.size, stop.event())

    try:
        measured, tunnel_dir = asyncio.run(run())
    except asyncio.CancelledError:
        sys.stderr.write("fileforward demo: interrupted\n")
        return 130
    except (Fatal, OSError, ValueError) as exc:
        sys.stderr.write(f"fileforward demo: FAILED: {exc}\n")
        return 1
    print("\n".join(demo.report(measured, tunnel_dir)), flush=True)
    return 0


def _run_doctor(parser: Parser, args: argparse.Namespace, stop: StopRequest) -> int:
    """`fileforward doctor`: can the tunnel work in this directory? (fileforward/doctor.py)"""
    if args.server or args.client or args.port is not None:
        parser.error("doctor takes no --server, --client or --port")
    if args.wait <= 0:
        parser.error(f"--wait must be more than 0 seconds, not {args.wait:g}")
    directory = prepare_tunnel_dir(_tunnel_dir(parser, args))
    return doctor.run(directory, args.peer, args.wait, lambda: stop.requested)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the `fileforward` command."""
    stop = StopRequest()
    raise_descriptor_limit()
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("fileforward", args, getattr(args, "default_log_level", "INFO"))
    try:
        status = args.run(parser, args, stop)
    except EndpointFailedError:  # logged at ERROR, with its cause, where it happened
        status = 1
    except (Fatal, OSError, ValueError) as exc:
        sys.stderr.write(f"fileforward: error: {exc}\n")
        status = 1
    sys.exit(status)
