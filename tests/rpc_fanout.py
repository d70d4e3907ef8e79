"""Many RPC client processes: imports rpc once, then forks them (cheap, no threads yet).

    python rpc_fanout.py --unix PATH --procs N --calls M [--barrier]

Each child connects, optionally waits at the server's barrier until all N children
are connected and calling at once, then makes M echo calls and checks every result.
Prints one JSON line: {"ok": children that succeeded, "failed": those that did not}.
"""
import argparse
import json
import os
import sys
import traceback

import rpc


def child(index: int, args: argparse.Namespace) -> int:
    try:
        with rpc.connect(unix=args.unix, tcp=args.tcp, tunnel_dir=args.tunnel_dir,
                         connect_timeout=30) as client:
            if args.barrier:
                client.call("barrier", args.procs)
            for i in range(args.calls):
                if client.call("echo", (index, i)) != (index, i):
                    return 1
        return 0
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unix")
    parser.add_argument("--tcp")
    parser.add_argument("--tunnel_dir")
    parser.add_argument("--procs", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--barrier", action="store_true")
    args = parser.parse_args()
    children = []
    for index in range(args.procs):
        pid = os.fork()
        if pid == 0:
            code = child(index, args)
            sys.stderr.flush()
            os._exit(code)
        children.append(pid)
    ok = sum(os.waitpid(pid, 0)[1] == 0 for pid in children)
    print(json.dumps({"ok": ok, "failed": args.procs - ok}))


if __name__ == "__main__":
    main()
