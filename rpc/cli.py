"""`python -m rpc serve MODULE:ATTR [...]`, `python -m rpc status [...]` and
`python -m rpc worker [...]`."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

from fileforward import EndpointFailedError
from fileforward.coherence import COHERENCE_CHOICES
from fileforward.cliargs import (Parser, add_job_option, add_logging_options, job_tunnel_dir,
                                 raise_descriptor_limit, setup_logging)

from .blocking import DEFAULT_CONNECT_TIMEOUT, status
from .errors import RPCError
from .frames import DEFAULT_MAX_FRAME
from .pool import DEFAULT_POOL_DIR
from .poolstatus import NoPoolError, describe_pool, pool_status
from .server import DEFAULT_MAX_PENDING_HANDSHAKES, check_functions, serve
from .transports import DEFAULT_LIVENESS_TIMEOUT, TUNNEL_DIR_ENV
from .worker import DEFAULT_JOIN_TIMEOUT, DEFAULT_WORKER_POLL_MAX, run_worker

log = logging.getLogger("rpc.cli")

DESCRIPTION = f"""\
Call Python functions that run on the other side: a SLURM job calls a function,
it runs on the login node (which has the internet), the result comes back.

  on the login node:  python -m rpc serve llm_server:FUNCTIONS
  in the job:         python -c 'import rpc; print(rpc.proxy("completion")(...))'
  anywhere:           python -m rpc status
                      python -m rpc status --pool DIR   (an rpc.Pool's workers and tasks)
  in each job of a worker pool (rpc.Pool):  python -m rpc worker --pool DIR

Both ends use the same transport: by default the tunnel directory
${TUNNEL_DIR_ENV}, else ~/.cache/fileforward/rpc-tunnel (no port at all).
Run `python -m rpc COMMAND --help` for each command's options.
"""

FUNCTIONS_HELP = ("the functions to serve: ATTR of MODULE (a module name, or the path of a .py "
                  "file) is a dict of name -> function, a list of functions, or one function")

#: Exit status after Ctrl-C, as a shell reports a process ended by SIGINT.
INTERRUPTED = 130


def load_functions(spec: str) -> Dict[str, Callable[..., Any]]:
    """Resolve ``MODULE:ATTR`` (MODULE may be a dotted name or a ``.py`` path).

    ATTR may name a dict of name -> function, a list of functions (served under
    their ``__name__``), or a single function. Raises TypeError naming a bad entry.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, got {spec!r}")
    obj: Any = _import(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, dict):
        functions = dict(obj)
    elif isinstance(obj, (list, tuple)):
        functions = {getattr(fn, "__name__", repr(fn)): fn for fn in obj}
    elif callable(obj):
        functions = {obj.__name__: obj}
    else:
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a dict, list or function")
    check_functions(functions)
    return functions


def _import(name: str) -> ModuleType:
    if not name.endswith(".py"):
        sys.path.insert(0, "")  # like `python -m`: the current directory first
        return importlib.import_module(name)
    path = Path(name).resolve()
    if path.stem in sys.modules:
        raise ImportError(f"cannot load {path} as module {path.stem!r}: a module of that name "
                          f"is already imported; rename the file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # so that cloudpickle pickles its functions by reference
    spec.loader.exec_module(module)
    return module


def _add_transport(parser: argparse.ArgumentParser, stdio: bool) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tunnel-dir", metavar="DIR", help=(
        f"tunnel directory of the file transport (default: ${TUNNEL_DIR_ENV} or "
        f"~/.cache/fileforward/rpc-tunnel)"))
    add_job_option(group, "RPC tunnel directory (rpc/)")
    group.add_argument("--tcp", metavar="HOST:PORT",
                       help="TCP address; HOST defaults to 127.0.0.1 (default: off)")
    group.add_argument("--unix", metavar="PATH",
                       help="Unix socket path, created mode 0600 (default: off)")
    if stdio:
        group.add_argument("--stdio", action="store_true",
                           help="serve one client on stdin/stdout, e.g. through ssh (default: off)")
    parser.add_argument("--key-file", metavar="FILE", help=(
        "key file shared by both ends (default: $FILEFORWARD_RPC_KEY or "
        "~/.cache/fileforward/rpc.key)"))
    _add_coherence(parser)


def _add_coherence(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coherence", choices=COHERENCE_CHOICES, help=(
        "file transport: whether the filesystem's locks exclude across nodes; auto "
        "judges it when the two sides meet (see `fileforward doctor`), locks / "
        "lock-free override that (default: auto)"))


def build_parser() -> Parser:
    """The command-line interface."""
    parser = Parser(prog="python -m rpc", description=DESCRIPTION)
    add_logging_options(parser, suppress_defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    srv = commands.add_parser("serve", help="serve the functions of MODULE:ATTR",
                              description="Serve the functions of MODULE:ATTR until Ctrl-C or "
                                          "SIGTERM\n(or, with --stdio, until the client leaves).")
    srv.add_argument("functions", metavar="MODULE:ATTR", help=FUNCTIONS_HELP)
    _add_transport(srv, stdio=True)
    srv.add_argument("--workers", type=int, default=4, metavar="N",
                     help="how many plain functions may run at once")
    srv.add_argument("--force", action="store_true",
                     help="take over a tunnel directory whose server looks alive (default: off)")
    srv.add_argument("--max-frame", type=int, default=DEFAULT_MAX_FRAME, metavar="BYTES",
                     help="largest accepted message in bytes")
    srv.add_argument("--liveness-timeout", type=float, default=DEFAULT_LIVENESS_TIMEOUT, metavar="S",
                     help="file transport: seconds of silence after which a client is dead")
    srv.add_argument("--max-pending-handshakes", type=int, default=DEFAULT_MAX_PENDING_HANDSHAKES, metavar="N",
                     help="TCP/Unix: connections allowed to be authenticating at once (the oldest is "
                          "dropped beyond that)")
    add_logging_options(srv, suppress_defaults=True)
    st = commands.add_parser("status", help="show whether a server runs, and its counters; "
                                             "or, with --pool, an rpc.Pool's workers and tasks",
                             description="Print the server's status as JSON; exit 1 if no "
                                         "server answers.\nWith --pool DIR: the rpc.Pool there, as "
                                         "pool.info() shows it (workers,\ntheir hosts and SLURM "
                                         "jobs, busy or idle, running tasks and their\nprogress; "
                                         "the queue; done and failed counts), from either node;\n"
                                         "exit 1 if no pool answers.")
    _add_transport(st, stdio=False)
    st.add_argument("--pool", metavar="DIR", nargs="?", const=str(DEFAULT_POOL_DIR), help=(
        "show the rpc.Pool serving DIR, as given to rpc.Pool(tunnel_dir=...) (DIR "
        "defaults to ~/.cache/fileforward/pool); this is no worker: it takes no task "
        "(default: off)"))
    st.add_argument("--json", action="store_true",
                    help="with --pool: print pool.info() as JSON (without --pool the status "
                         "is always JSON) (default: off)")
    st.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
                    help="seconds to wait for a server to answer")
    add_logging_options(st, suppress_defaults=True)
    wk = commands.add_parser("worker", help="run the tasks of an rpc.Pool",
                             description="Join the rpc.Pool whose directory is --pool and run its "
                                         "tasks, until\nthe pool closes, or SIGTERM/Ctrl-C: then "
                                         "take no new task, give the\nrunning ones --grace "
                                         "seconds, hand back the rest, and exit 0.")
    wk.add_argument("--pool", metavar="DIR", help=(
        "the pool's directory, as given to rpc.Pool(tunnel_dir=...) "
        "(default: ~/.cache/fileforward/pool)"))
    wk.add_argument("--threads", type=int, default=1, metavar="N",
                    help="tasks run at once (the most this worker holds)")
    wk.add_argument("--grace", type=float, default=30.0, metavar="S",
                    help="on SIGTERM, seconds the running tasks get before they are handed back")
    wk.add_argument("--key-file", metavar="FILE", help=(
        "key file shared with the pool (default: $FILEFORWARD_RPC_KEY or "
        "~/.cache/fileforward/rpc.key)"))
    wk.add_argument("--join-timeout", type=float, default=DEFAULT_JOIN_TIMEOUT, metavar="S",
                    help="seconds to wait for the pool to answer when the worker starts")
    wk.add_argument("--liveness-timeout", type=float, default=DEFAULT_LIVENESS_TIMEOUT, metavar="S",
                    help="seconds of silence after which the pool is presumed dead")
    wk.add_argument("--poll-max", type=float, default=DEFAULT_WORKER_POLL_MAX, metavar="S",
                    help="longest pause between looks at the tunnel when idle: a task sent after "
                         "a quiet spell starts up to S seconds late; shorter costs the file "
                         "server more")
    _add_coherence(wk)
    add_logging_options(wk, suppress_defaults=True)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("rpc", args)
    if args.command == "worker":
        return _worker(args, parser)
    if args.command == "status" and args.pool is not None:
        return _pool_status(args, parser)
    tunnel_dir = args.tunnel_dir
    if args.job is not None:
        try:
            tunnel_dir = job_tunnel_dir(args.job, "rpc")
        except ValueError as exc:
            parser.error(str(exc))
    transport = {"tunnel_dir": tunnel_dir, "tcp": args.tcp, "unix": args.unix,
                 "coherence": args.coherence}
    try:
        if args.command == "serve":
            return _serve(args, transport)
        info = status(connect_timeout=args.connect_timeout, key_file=args.key_file, **transport)
    except KeyboardInterrupt:
        return INTERRUPTED
    except EndpointFailedError:  # the tunnel failed for good: logged at ERROR where it happened
        return 1
    except (RPCError, OSError, ValueError) as exc:  # OSError: e.g. address in use
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    print(json.dumps(info, indent=2, default=str))
    return 0 if info["alive"] else 1


def _serve(args: argparse.Namespace, transport: Dict[str, Any]) -> int:
    raise_descriptor_limit()  # every client holds descriptors
    try:
        functions = load_functions(args.functions)
    except Exception as exc:  # whatever importing the user's module raised
        log.error("cannot load %s: %s: %s", args.functions, type(exc).__name__, exc)
        log.debug("the traceback of that error:", exc_info=True)
        return 2
    serve(functions, stdio=args.stdio, workers=args.workers, key_file=args.key_file,
          force=args.force, max_frame=args.max_frame, liveness_timeout=args.liveness_timeout,
          max_pending_handshakes=args.max_pending_handshakes,
          **transport)
    return 0


def _pool_status(args: argparse.Namespace, parser: Parser) -> int:
    if args.tunnel_dir or args.job is not None or args.tcp or args.unix:
        parser.error("--pool names the pool's directory: give no other transport")
    try:
        info = pool_status(Path(args.pool).expanduser(), key_file=args.key_file,
                           connect_timeout=args.connect_timeout)
    except KeyboardInterrupt:
        return INTERRUPTED
    except EndpointFailedError:  # logged at ERROR where it happened
        return 1
    except NoPoolError as exc:
        log.error("%s", exc)
        return 1
    except (RPCError, OSError, ValueError) as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    print(json.dumps(info, indent=2, default=str) if args.json else describe_pool(info))
    return 0


def _worker(args: argparse.Namespace, parser: Parser) -> int:
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        return run_worker(args.pool, threads=args.threads, grace=args.grace,
                          key_file=args.key_file, connect_timeout=args.join_timeout,
                          liveness_timeout=args.liveness_timeout, poll_max=args.poll_max,
                          coherence=args.coherence)
    except EndpointFailedError:  # logged at ERROR where it happened
        return 1
    except (RPCError, OSError, ValueError) as exc:
        log.error("cannot join the pool: %s: %s", type(exc).__name__, exc)
        return 2
