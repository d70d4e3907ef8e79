"""The ssh-style commands: `fileforward serve`, `fileforward -L/-R/-D/--http-proxy`,
`fileforward env`, `fileforward run -- CMD` and `fileforward status`.

    login node:  fileforward serve                       (carries out what requesters ask, like sshd)
    in the job:  fileforward run -- pip install numpy    (an HTTP proxy for one command)
                 fileforward --http-proxy 3128 -D 1080   (proxies until stopped)
                 eval "$(fileforward env)"               (their variables, in this shell)
    anywhere:    fileforward status                      (who runs, their forwards, bytes, rates)

Also the transport options every form of the command shares.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, List

from . import proxyfiles, statusfile, tunneldir
from . import status as statusreport
from .cliargs import Parser, add_job_option, add_logging_options, dir_option, job_tunnel_dir
from .coherence import COHERENCE_CHOICES
from .forward import serve_until_stopped, until_stopped
from .forwardspec import Listen, Permit, parse_forward, parse_listen
from .netforward import ENV_NET_DIR, Requesting, Requests, default_net_dir, requesting, serving
from .options import MiB, Options
from .proxyproto import Credentials

log = logging.getLogger("fileforward")

NET_DIR_HELP = (f"shared directory the requests travel through (default: ${ENV_NET_DIR}, else "
                f"~/.cache/fileforward/net; serve and its requesting processes must use the same)")


def add_transport_options(parser: argparse.ArgumentParser) -> None:
    """The knobs of the tunnel, the same for every form of the command."""
    parser.add_argument("--connect-timeout", type=float, default=Options.connect_timeout, metavar="S",
                        help="give up on a connection if the other side does not answer within S seconds")
    parser.add_argument("--liveness-timeout", type=float, default=Options.liveness_timeout, metavar="S",
                        help="declare the other side dead after S seconds without a sign of life")
    parser.add_argument("--poll-max", type=float, default=Options.poll_max, metavar="S",
                        help="longest polling interval when idle, in seconds")
    parser.add_argument("--window", type=float, default=Options.window / MiB, metavar="MIB",
                        help="unread data allowed on disk per connection and direction, in MiB")
    parser.add_argument("--coherence", choices=COHERENCE_CHOICES, default=Options.coherence,
                        help="auto: trust the other side's locks (to notice within a second that its process "
                             "died) only where they were seen to exclude this side's; locks: always; "
                             "lock-free: never, only heartbeats (liveness timeout). Data never depends on locks")


def transport_options(parser: Parser, args: argparse.Namespace) -> Options:
    """Options from add_transport_options' flags; a bad value is a usage error."""
    if args.window * MiB < Options.chunk:
        parser.error(f"--window must be at least {Options.chunk / MiB:g} MiB, not {args.window:g}")
    try:
        return Options(connect_timeout=args.connect_timeout, liveness_timeout=args.liveness_timeout,
                       poll_max=args.poll_max, window=int(args.window * MiB), coherence=args.coherence)
    except ValueError as exc:
        parser.error(str(exc))


def _spec(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a forwardspec parser: its ValueError becomes the usage error."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def add_forward_options(parser: argparse.ArgumentParser) -> None:
    """-L, -R, -D, --http-proxy (each repeats) and --proxy-auth."""
    parser.add_argument("-L", dest="local", action="append", default=[], type=_spec(parse_forward),
                        metavar="[BIND:]PORT:HOST:HOSTPORT",
                        help="listen here (or on a Unix socket path, created mode 0600) and connect each "
                             "connection to HOST:HOSTPORT from the serve side (repeats; default: none)")
    parser.add_argument("-R", dest="remote", action="append", default=[], type=_spec(parse_forward),
                        metavar="[BIND:]PORT:HOST:HOSTPORT",
                        help="listen on the serve side and connect each connection to HOST:HOSTPORT from "
                             "here (repeats; default: none)")
    parser.add_argument("-D", dest="socks", action="append", default=[], type=_spec(parse_listen),
                        metavar="[BIND:]PORT",
                        help="SOCKS5/SOCKS4a proxy here; connections leave from the serve side, which "
                             "resolves the names; PORT 0 picks a free port (repeats; default: none)")
    parser.add_argument("--http-proxy", dest="http", action="append", default=[], type=_spec(parse_listen),
                        metavar="[BIND:]PORT",
                        help="HTTP proxy here (CONNECT for https, http:// URLs); connections leave from "
                             "the serve side; PORT 0 picks a free port (repeats; default: none)")
    parser.add_argument("--proxy-auth", choices=("none", "auto"), default="none",
                        help="auto: -D and --http-proxy require a random user and password, given in the "
                             "proxy URL (printed, and in a 0600 file that fileforward env reads)")


def _add_net_dir_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tunnel-dir", metavar="DIR", type=Path, help=NET_DIR_HELP)
    add_job_option(where, "net directory")


def add_commands(commands: "argparse._SubParsersAction") -> None:
    """The subcommands serve, env, run and status."""
    serve = commands.add_parser(
        "serve", help="the far end of -L/-R/-D/--http-proxy (login node): connects where requesters ask",
        description="Serve the requests of any number of fileforward processes on the same tunnel directory\n"
                    "(-L, -R, -D, --http-proxy, run): connect where they ask, from here, like sshd.",
        epilog="A destination refused by --permit is logged here and on the requesting side, and the "
               "application gets a SOCKS or HTTP error (or, through -L, a reset).")
    serve.add_argument("--permit", action="append", default=[], metavar="HOST:PORT",
                       help="allow connections to HOST:PORT only (* matches any host or port; repeats; "
                            "default: anywhere)")
    serve.add_argument("--force", action="store_true",
                       help="make a running serve on the same tunnel directory step down (default: refuse)")
    _add_net_dir_options(serve)
    add_transport_options(serve)
    add_logging_options(serve, suppress_defaults=True)
    serve.set_defaults(run=_run_serve)

    env = commands.add_parser(
        "env", help="print the export lines for the newest running proxy on this host",
        description='Print HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY (and their lowercase twins)\n'
                    'for the newest proxy (-D, --http-proxy) running on this host: eval "$(fileforward env)"',
        epilog="Exit status 1, with the reason, if no proxy runs on this host in the tunnel directory.")
    _add_net_dir_options(env)
    add_logging_options(env, suppress_defaults=True)
    env.set_defaults(run=_run_env)

    run = commands.add_parser(
        "run", help="run one command with proxies (default: --http-proxy 0) and their variables",
        description="Start the forwards, run CMD with HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and NO_PROXY set,\n"
                    "and stop when CMD ends:  fileforward run -- pip install numpy",
        epilog="Without -L/-R/-D/--http-proxy: an HTTP proxy on a free port. Exit status: CMD's "
               "(127: not found, 126: cannot be run, 128+N: killed by signal N).")
    add_forward_options(run)
    _add_net_dir_options(run)
    add_transport_options(run)
    add_logging_options(run, suppress_defaults=True)
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    run.set_defaults(run=_run_command)

    status = commands.add_parser(
        "status", help="show the serve and requesting processes of a tunnel directory, and their forwards",
        description="Show the serve and requesting processes of a tunnel directory (pid, host, up since, state,\n"
                    "last sign of life) and their forwards (open connections, bytes each way, rate), from the\n"
                    "status files they publish. A process of this host is judged by its pid; one of another host\n"
                    "by whether its file changes within --wait seconds (clocks differ between nodes; it rewrites\n"
                    f"the file at least every {statusfile.HEARTBEAT:g} s). On NFS, a process started on the other node\n"
                    "a moment ago may show up late: this command lists the directory.",
        epilog="Exit status 0 if a process runs (or is not judged yet), 1 if none does. The classic "
               "--server/--client processes publish nothing and are not shown.")
    status.add_argument("--json", action="store_true", help="print a JSON document for scripts")
    status.add_argument("--wait", type=float, default=statusreport.DEFAULT_WAIT, metavar="S",
                        help="how long to watch another host's processes for a sign of life before calling "
                             "them stale (0: do not watch)")
    _add_net_dir_options(status)
    add_logging_options(status, suppress_defaults=True)
    status.set_defaults(run=_run_status)


def has_forwards(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a requesting process."""
    return bool(getattr(args, "local", None) or getattr(args, "remote", None) or getattr(args, "socks", None)
                or getattr(args, "http", None))


def _net_dir(parser: Parser, args: argparse.Namespace) -> Path:
    if args.job is not None:
        try:
            return job_tunnel_dir(args.job, "net")
        except ValueError as exc:
            parser.error(str(exc))
    return args.tunnel_dir if args.tunnel_dir is not None else default_net_dir()


def _requests(args: argparse.Namespace) -> Requests:
    return Requests(local=args.local, remote=args.remote, socks=args.socks, http=args.http,
                    credentials=Credentials.generate() if args.proxy_auth == "auto" else None)


def run_requester(parser: Parser, args: argparse.Namespace, stop) -> int:
    """`fileforward -L/-R/-D/--http-proxy ...` until a stop request, or until its
    tunnel endpoint fails (raised: the command exits 1)."""
    if args.server or args.client or args.port is not None:
        parser.error("-L/-R/-D/--http-proxy start a requesting process for `fileforward serve`; "
                     "they do not combine with --server, --client or --port")
    tunnel_dir, options, requests = _net_dir(parser, args), transport_options(parser, args), _requests(args)

    async def main() -> None:
        async with requesting(tunnel_dir, requests, options) as running:
            _print_exports(running, requests.credentials is not None)
            await until_stopped(stop.event(), running.connector.wait_closed())
        if running.connector.failure is not None:
            raise running.connector.failure

    asyncio.run(main())
    log.info("stopped")
    return 0


def _print_exports(running: Requesting, with_credentials: bool) -> None:
    """The shell lines that point programs at this process's proxies (stdout)."""
    lines = running.proxies.export_lines()
    if not lines:
        return
    secret = " (with its password)" if with_credentials else ""
    print(f"# proxy of this process{secret}; also in {running.proxy_file} until it stops, "
          f"and from: fileforward env {dir_option(running.tunnel_dir, 'net')}", *lines, sep="\n", flush=True)


def _run_serve(parser: Parser, args: argparse.Namespace, stop) -> int:
    """`fileforward serve` until a stop request, or until another serve --force takes over."""
    try:
        permit = Permit(args.permit)
    except ValueError as exc:
        parser.error(str(exc))
    tunnel_dir, options = _net_dir(parser, args), transport_options(parser, args)

    async def main() -> None:
        async with serving(tunnel_dir, permit, options, force=args.force) as running:
            server = running.server
            log.info("serving tunnel %s; connecting to %s for the requesting processes "
                     "(fileforward -L/-R/-D/--http-proxy/run %s)",
                     server.tunnel_dir, permit, dir_option(server.tunnel_dir, "net"))
            await serve_until_stopped(server, stop.event(), "fileforward serve")

    asyncio.run(main())
    log.info("stopped")
    return 0


def _run_env(parser: Parser, args: argparse.Namespace, stop) -> int:
    """`fileforward env`: the export lines of the newest live proxy on this host."""
    tunnel_dir = _net_dir(parser, args)
    urls = proxyfiles.newest_live(tunnel_dir)
    if urls is None:
        sys.stderr.write(f"fileforward env: no proxy is running on this host with tunnel directory {tunnel_dir} "
                         f"(start one: fileforward --http-proxy 3128 {dir_option(tunnel_dir, 'net')} &)\n")
        return 1
    print("\n".join(urls.export_lines()), flush=True)
    return 0


def _run_status(parser: Parser, args: argparse.Namespace, stop) -> int:
    """`fileforward status`: 0 if something runs on the tunnel directory, 1 if nothing does."""
    if args.wait < 0:
        parser.error(f"--wait must be 0 or more seconds, not {args.wait:g}")
    tunnel_dir = tunneldir.absolute(_net_dir(parser, args))
    processes = statusreport.collect(tunnel_dir, args.wait, lambda: stop.requested)
    print((statusreport.as_json if args.json else statusreport.as_table)(tunnel_dir, processes), flush=True)
    return 0 if any(p.running for p in processes) else 1


def _run_command(parser: Parser, args: argparse.Namespace, stop) -> int:
    """`fileforward run ... -- CMD ARGS`: CMD's exit status."""
    command: List[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command: fileforward run [-D ...|--http-proxy ...] -- CMD ARGS")
    if not has_forwards(args):
        args.http = [Listen(port=0)]
    tunnel_dir, options, requests = _net_dir(parser, args), transport_options(parser, args), _requests(args)

    async def main() -> int:
        async with requesting(tunnel_dir, requests, options) as running:
            return await _run_child(command, {**os.environ, **running.proxies.environment()}, stop)

    return asyncio.run(main())


async def _run_child(command: List[str], env: "dict[str, str]", stop) -> int:
    """Run command to its end (a stop request terminates it); its exit status, shell style."""
    try:
        child = await asyncio.create_subprocess_exec(*command, env=env)
    except FileNotFoundError:
        log.error("cannot run %s: command not found", command[0])
        return 127
    except OSError as exc:
        log.error("cannot run %s: %s", command[0], exc.strerror or exc)
        return 126
    ended = asyncio.ensure_future(child.wait())
    stopping = asyncio.ensure_future(stop.event().wait())
    await asyncio.wait([ended, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not ended.done():
        log.info("stopping %s", command[0])
        child.send_signal(signal.SIGTERM)
    status = await ended
    return 128 - status if status < 0 else status
