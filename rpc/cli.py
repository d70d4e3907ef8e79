"""``python -m rpc serve MODULE:ATTR [...]`` and ``python -m rpc status [...]``."""
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

from .blocking import status
from .errors import RPCError
from .protocol import DEFAULT_MAX_FRAME
from .server import serve

log = logging.getLogger("rpc.cli")


def load_functions(spec: str) -> Dict[str, Callable[..., Any]]:
    """Resolve ``MODULE:ATTR`` (MODULE may be a dotted name or a ``.py`` path).

    ATTR may name a dict of name -> function, a list of functions (served under
    their ``__name__``), or a single function.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, got {spec!r}")
    obj: Any = _import(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, (list, tuple)):
        return {fn.__name__: fn for fn in obj}
    if callable(obj):
        return {obj.__name__: obj}
    raise TypeError(f"{spec} is a {type(obj).__name__}, not a dict, list or function")


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
    group.add_argument("--tunnel_dir", help="tunnel directory of the file transport "
                       "(default: $FILEFORWARD_RPC_TUNNEL_DIR or ~/.cache/fileforward/rpc-tunnel)")
    group.add_argument("--tcp", metavar="HOST:PORT", help="TCP address (host defaults to 127.0.0.1)")
    group.add_argument("--unix", metavar="PATH", help="Unix socket path (created mode 0600)")
    if stdio:
        group.add_argument("--stdio", action="store_true",
                           help="serve one client on stdin/stdout (e.g. through ssh)")
    parser.add_argument("--key_file", help="key file (default: $FILEFORWARD_RPC_KEY or "
                        "~/.cache/fileforward/rpc.key)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m rpc", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    srv = commands.add_parser("serve", help="serve the functions of MODULE:ATTR")
    srv.add_argument("functions", metavar="MODULE:ATTR")
    _add_transport(srv, stdio=True)
    srv.add_argument("--workers", type=int, default=4, help="how many plain functions may run at once (default 4)")
    srv.add_argument("--force", action="store_true",
                     help="take over a tunnel directory whose server looks alive")
    srv.add_argument("--max_frame", type=int, default=DEFAULT_MAX_FRAME,
                     help="largest accepted message in bytes")
    srv.add_argument("--liveness_timeout", type=float, default=15.0,
                     help="file transport: seconds of silence after which a client is dead")
    st = commands.add_parser("status", help="show whether a server runs, and its counters")
    _add_transport(st, stdio=False)
    st.add_argument("--connect_timeout", type=float, default=5.0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    transport = {"tunnel_dir": args.tunnel_dir, "tcp": args.tcp, "unix": args.unix}
    try:
        if args.command == "serve":
            try:
                functions = load_functions(args.functions)
            except (ValueError, TypeError, ImportError, AttributeError) as exc:
                log.error("cannot load %s: %s: %s", args.functions, type(exc).__name__, exc)
                return 2
            serve(functions, stdio=args.stdio, workers=args.workers, key_file=args.key_file,
                  force=args.force, max_frame=args.max_frame,
                  liveness_timeout=args.liveness_timeout, **transport)
            return 0
        info = status(connect_timeout=args.connect_timeout, key_file=args.key_file,
                      **transport)
    except (RPCError, OSError, ValueError) as exc:  # OSError: e.g. address in use
        log.error("%s: %s", type(exc).__name__, exc)
        return 2
    print(json.dumps(info, indent=2, default=str))
    return 0 if info["alive"] else 1
