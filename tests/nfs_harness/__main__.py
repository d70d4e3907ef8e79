"""Command line for manual and benchmark use of the two-node NFS emulation.

  python -m tests.nfs_harness mount --backing DIR --a MNT_A --b MNT_B [--profile beegfs]
                                    [--latency-ms 0.5 --write-behind --no-lock-forwarding ...]
      mounts both nodes, prints where everything is, serves until SIGTERM/SIGINT;
      a profile sets several knobs at once (`mount --help`), knobs given override it.
  python -m tests.nfs_harness exec-b [--netns NAME] -- CMD [ARGS...]
      runs CMD on node B (in the namespace of the one running `mount` by default).
  python -m tests.nfs_harness stats FILE...
      prints the FUSE request counts of counter files as JSON.
"""
import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

from .cluster import start_two_nodes
from .counters import read_counters
from .mounts import is_mounted
from .netns import exec_prefix, live_names
from .options import NodeOptions

POLL_INTERVAL = 0.5


def _mount(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    workdir = args.counters_dir or Path(tempfile.mkdtemp(prefix="nfs_harness-"))
    options = NodeOptions.from_args(args)
    with start_two_nodes(workdir, options, a=args.a.resolve(), b=args.b.resolve(),
                         backing=args.backing.resolve(), debug=args.debug) as nodes:
        print(f"node A: {nodes.a}\nnode B: {nodes.b}\nbacking: {nodes.backing}\n"
              f"netns: {nodes.netns}\nrun on node B: {' '.join(nodes.b_prefix)} CMD\n"
              f"counters: a={nodes.counters['a']} b={nodes.counters['b']}\n"
              f"options: {options}\nready", flush=True)
        while not stop.wait(POLL_INTERVAL):
            if not (is_mounted(nodes.a) and is_mounted(nodes.b)):
                print("a node's daemon stopped; unmounting", file=sys.stderr)
                return 1
    return 0


def _exec_b(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("exec-b: no command given")
    name = args.netns
    if name is None:
        names = live_names()
        if len(names) != 1:
            sys.exit(f"exec-b: pass --netns; running harness namespaces: {names or 'none'}")
        name = names[0]
    argv = [*exec_prefix(name), *command]
    os.execvp(argv[0], argv)
    return 1  # not reached


def _stats(args: argparse.Namespace) -> int:
    print(json.dumps({str(path): read_counters(path) for path in args.files}, indent=1))
    return 0


def main(argv=None) -> int:
    """Parse the command line and run one subcommand."""
    parser = argparse.ArgumentParser(prog="python -m tests.nfs_harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    mount = sub.add_parser("mount", help="mount two nodes until SIGTERM/SIGINT")
    mount.add_argument("--backing", type=Path, required=True, help="the shared export")
    mount.add_argument("--a", type=Path, required=True, help="node A's mountpoint")
    mount.add_argument("--b", type=Path, required=True, help="node B's mountpoint")
    mount.add_argument("--counters-dir", type=Path, help="where request counter files go")
    mount.add_argument("--debug", action="store_true", help="log the daemons' lock activity")
    NodeOptions.add_arguments(mount)
    mount.set_defaults(func=_mount)
    exec_b = sub.add_parser("exec-b", help="run a command on node B")
    exec_b.add_argument("--netns", help="node B's namespace (printed by `mount`)")
    exec_b.add_argument("command", nargs=argparse.REMAINDER)
    exec_b.set_defaults(func=_exec_b)
    stats = sub.add_parser("stats", help="print request counters as JSON")
    stats.add_argument("files", type=Path, nargs="+")
    stats.set_defaults(func=_stats)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
