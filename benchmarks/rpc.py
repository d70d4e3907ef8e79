"""Benchmark of the RPC layer, in one run: file transport, TCP, and a reference.

    python benchmarks/rpc.py [--dir DIR] [--runs 3] [--calls 2000]

For each of: RPC over the file transport (tunnel directory under DIR, default a
temporary directory on local disk), RPC over TCP loopback, and
``multiprocessing.connection`` over a Unix socket (the reference: a bare pickled
send/recv, no framing of ours, no thread pool), it starts a server process and
measures from this process:

- latency of ``echo(b"x")``: median and p99;
- latency of ``echo(1 MiB)``: median and p99;
- calls per second with 4 client threads (RPC: the threads share one client, as
  users of ``rpc.proxy`` do; the reference: one connection per thread);
- calls per second with 4 client processes, each with its own connection to the
  one server (RPC only: a job array is many connections), timed from when all
  four are connected and warm until the last one is done.

Every latency is timed after half a second of untimed calls: a client and server
that ping-pong share one CPU at first, until the scheduler spreads them over two
(multiprocessing.connection: 20 us a call for ~0.1 s, 45 us after), so a short
measurement would compare phases of the scheduler rather than code.

Each figure is the median over --runs runs; the table ends with the budgets of
issue 12, each marked met or not.

``--two-nodes`` runs the file transport across the two emulated NFS nodes of
tests/nfs_harness (root, after .ci/install-nfs.sh; 0.5 ms per request, 2 s caches):
the server on node A, the client (the job side) as a process on node B (and the
4 client processes there too), and adds the filesystem requests each node's mount
served per small call.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.report import Budget, Row, print_table  # noqa: E402
from fileforward.cliargs import Parser  # noqa: E402

MIB = 1 << 20
SMALL_LABEL = 'echo(b"x") ms'
THREADS = 4
PROCESSES = 4
ISSUE12 = "issue 12"
WARMUP = 20
#: Calls keep warming up for this long before any is timed. A client and server
#: that ping-pong start out sharing one CPU (20 us a call for multiprocessing.
#: connection) until the scheduler's load balancer spreads them over two, about
#: 0.1 s later (45 us): timing only the start would compare phases, not code.
WARMUP_SECONDS = 0.5

RPC_SERVER = """
import logging, sys
import rpc
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
rpc.serve({"echo": lambda x: x}, workers=4, **eval(sys.argv[1]))
"""

MP_SERVER = """
import sys, threading
from multiprocessing.connection import Listener
listener = Listener(sys.argv[1], "AF_UNIX", authkey=b"bench")
print("ready", flush=True)
def serve(conn):
    try:
        while True:
            conn.send(conn.recv())
    except EOFError:
        pass
while True:
    threading.Thread(target=serve, args=(listener.accept(),), daemon=True).start()
"""


def start(code: str, arg: str, ready: str) -> "tuple[subprocess.Popen, str]":
    """Start a server process; return it and the first match of ``ready`` in its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), arg], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(ready, line)
        if match:
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, match.group(1) if match.groups() else ""
    raise RuntimeError(f"server did not start: {' '.join(proc.args)}")


def warm_up(call: Callable[[bytes], bytes], payload: bytes) -> None:
    """Call for WARMUP calls and at least WARMUP_SECONDS, untimed."""
    started = time.perf_counter()
    warmed = 0
    while warmed < WARMUP or time.perf_counter() - started < WARMUP_SECONDS:
        call(payload)
        warmed += 1


def latencies(call: Callable[[bytes], bytes], payload: bytes, n: int) -> List[float]:
    """Seconds per call of ``n`` sequential calls (warm up first)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = call(payload)
        out.append(time.perf_counter() - t0)
        assert len(result) == len(payload)
    return out


def throughput(calls: List[Callable[[bytes], bytes]], per_thread: int) -> float:
    """Calls per second of len(calls) threads each making ``per_thread`` small calls."""
    barrier = threading.Barrier(len(calls) + 1)

    def work(call: Callable[[bytes], bytes]) -> None:
        barrier.wait()
        for _ in range(per_thread):
            call(b"x")

    threads = [threading.Thread(target=work, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return len(calls) * per_thread / (time.perf_counter() - t0)


def measure(calls: List[Callable[[bytes], bytes]], n: int,
            requests: Optional[Callable[[], Dict[str, int]]] = None) -> Dict[str, float]:
    """The table's figures; with ``requests`` (filesystem requests served so far per
    node), also the requests per small call on each node."""
    warm_up(calls[0], b"x")
    before = requests() if requests else {}
    small = latencies(calls[0], b"x", n)
    per_call = {f"requests_{node}": (count - before[node]) / n
                for node, count in (requests() if requests else {}).items()}
    warm_up(calls[0], b"\x01" * MIB)
    big = latencies(calls[0], b"\x01" * MIB, max(20, n // 20))
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1e3  # noqa: E731
    return {"small_med": statistics.median(small) * 1e3, "small_p99": q(small, 99),
            "big_med": statistics.median(big) * 1e3, "big_p99": q(big, 99),
            "rate": throughput(calls, n // 2), **per_call}


def measure_rpc(address: Dict[str, str], n: int,
                counters: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """The client side: measure() through one client, whose threads share it. With
    ``counters`` (the harness's per-node request counter files), count requests too."""
    import rpc
    requests = None
    if counters:
        from tests.nfs_harness.counters import read_counters
        requests = lambda: {node: sum(read_counters(Path(path)).values())  # noqa: E731
                            for node, path in counters.items()}
    with rpc.connect(**address, connect_timeout=30) as client:
        echo = client.proxy("echo")
        return measure([echo] * THREADS, n, requests)


def calls_in_process(address: Dict[str, str], n: int) -> None:
    """One of the client processes: connect, warm up, say "ready", wait for "go" on
    stdin, make ``n`` small calls, print when they started and ended (JSON)."""
    import rpc
    with rpc.connect(**address, connect_timeout=30) as client:
        echo = client.proxy("echo")
        warm_up(echo, b"x")
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of this machine
        for _ in range(n):
            echo(b"x")
        print(json.dumps({"started": started, "ended": time.monotonic()}), flush=True)


def processes_rate(address: Dict[str, str], per_process: int, prefix: Sequence[str] = ()) -> float:
    """Calls per second of PROCESSES client processes (argv ``prefix``: where they
    run), each on its own connection, from the first call of any to the last reply."""
    procs = [subprocess.Popen([*prefix, sys.executable, __file__, "--caller", json.dumps(address),
                               "--calls", str(per_process)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(PROCESSES)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a client process did not connect (exit status {proc.wait()})")
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        spans = [json.loads(proc.stdout.readline()) for proc in procs]
        for proc in procs:
            if proc.wait(60) != 0:
                raise RuntimeError(f"a client process failed (exit status {proc.returncode})")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = max(s["ended"] for s in spans) - min(s["started"] for s in spans)
    return PROCESSES * per_process / elapsed


def measure_on_job_node(pair, address: Dict[str, str], n: int) -> Dict[str, float]:
    """measure_rpc() in a process on node B of the two-node harness ``pair``."""
    out = subprocess.run(
        [*pair.b_prefix, sys.executable, __file__, "--job-side", json.dumps(address),
         "--calls", str(n), "--counters", json.dumps({k: str(v) for k, v in pair.counters.items()})],
        check=True, stdout=subprocess.PIPE, text=True, timeout=600).stdout
    return json.loads(out)


def bench_rpc(address: Dict[str, str], n: int, pair=None) -> Dict[str, float]:
    """Serve echo on ``address`` (node A's view with a two-node ``pair``) and measure."""
    proc, where = start(RPC_SERVER, repr(address), r"serving \d+ functions on (\S+)")
    try:
        if where.startswith("tcp://"):
            address = {"tcp": where[len("tcp://"):]}
        if pair is not None:
            address = {"tunnel_dir": str(pair.b / Path(address["tunnel_dir"]).relative_to(pair.a))}
            result = measure_on_job_node(pair, address, n)
        else:
            result = measure_rpc(address, n)
        result["processes_rate"] = processes_rate(address, n // 2, pair.b_prefix if pair else ())
        result["processes_per_threads"] = result["processes_rate"] / result["rate"]  # within one run
        return result
    finally:
        proc.kill()
        proc.wait()


def bench_mp(sock: str, n: int) -> Dict[str, float]:
    from multiprocessing.connection import Client
    proc, _ = start(MP_SERVER, sock, r"ready")
    conns = [Client(sock, "AF_UNIX", authkey=b"bench") for _ in range(THREADS)]
    try:
        def caller(conn):  # type: ignore[no-untyped-def]
            def call(x: bytes) -> bytes:
                conn.send(x)
                return conn.recv()
            return call
        return measure([caller(c) for c in conns], n)
    finally:
        for conn in conns:
            conn.close()
        proc.kill()
        proc.wait()


def main() -> None:
    parser = Parser(prog="python benchmarks/rpc.py", description=__doc__)
    parser.add_argument("--dir", help="where the tunnel directory goes (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=3, metavar="N", help="runs; every figure is their median")
    parser.add_argument("--calls", type=int, default=2000, metavar="N",
                        help="small calls per measurement (the file transport makes half as many)")
    parser.add_argument("--two-nodes", action="store_true",
                        help="file transport across the two emulated NFS nodes of "
                             "tests/nfs_harness (root, after .ci/install-nfs.sh)")
    parser.add_argument("--job-side", metavar="ADDRESS_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--counters", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--caller", metavar="ADDRESS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.caller:  # internal: one of the client processes of the "4 processes" column
        calls_in_process(json.loads(args.caller), args.calls)
        return
    if args.job_side:  # internal: the client half of --two-nodes, on node B
        print(json.dumps(measure_rpc(json.loads(args.job_side), args.calls,
                                     json.loads(args.counters) if args.counters else None)))
        return
    with contextlib.ExitStack() as stack:
        run_all(args, stack)


def run_all(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    work = Path(tempfile.mkdtemp(prefix="rpcbench", dir=args.dir or "/tmp"))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    os.environ["FILEFORWARD_RPC_KEY"] = str(work / "rpc.key")
    import rpc
    rpc.auth.load_key(create=True)
    pair, tunnels = None, work
    if args.two_nodes:
        from tests.nfs_harness.cluster import start_two_nodes
        pair = stack.enter_context(start_two_nodes(work / "nodes"))
        tunnels = pair.a
    cases = {
        "file transport": lambda i: bench_rpc({"tunnel_dir": str(tunnels / f"tunnel{i}")},
                                              args.calls // 2, pair),
        "RPC over TCP": lambda i: bench_rpc({"tcp": "127.0.0.1:0"}, args.calls),
        "mp.connection (unix)": lambda i: bench_mp(str(work / f"mp{i}.sock"), args.calls),
    }
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in cases}
    for run in range(args.runs):
        for name, case in cases.items():
            results[name].append(case(run))
            print(f"run {run + 1}/{args.runs}: {name} done", file=sys.stderr)
    med = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
           for name, runs in results.items()}
    where = ("file transport across two emulated NFS nodes (0.5 ms/request, 2 s caches): "
             "server on node A, client on node B" if pair else
             f"tunnel dir under {args.dir or '/tmp'}")
    print(f"\nRPC benchmark, medians of {args.runs} runs "
          f"({where}; Python {sys.version.split()[0]})\n")
    print(f"{'':22} {SMALL_LABEL:>18} {'echo(1 MiB) ms':>18} {'calls/s':>9} {'calls/s':>11}")
    print(f"{'':22} {'median':>8} {'p99':>9} {'median':>8} {'p99':>9} {'4 threads,':>9} {'4 processes,':>11}")
    print(f"{'':22} {'':>8} {'':>9} {'':>8} {'':>9} {'1 conn.':>9} {'4 conn.':>11}")
    for name, m in med.items():
        processes = f"{m['processes_rate']:11.0f}" if "processes_rate" in m else f"{'-':>11}"
        print(f"{name:22} {m['small_med']:8.3f} {m['small_p99']:9.3f} "
              f"{m['big_med']:8.2f} {m['big_p99']:9.2f} {m['rate']:9.0f} {processes}")
    f, t, ref = med["file transport"], med["RPC over TCP"], med["mp.connection (unix)"]
    if pair:
        print_table("two NFS nodes", [
            Row("small-call median (ms)", f["small_med"], ".2f", Budget("<=", 25, "issue 4")),
            Row("filesystem requests per small call, node A (server)", f["requests_a"], ".1f"),
            Row("filesystem requests per small call, node B (client)", f["requests_b"], ".1f"),
        ])
        return
    print_table("budgets", [
        Row("file transport, small-call median (ms)", f["small_med"], ".3f", Budget("<=", 1, ISSUE12)),
        Row("file transport, 1 MiB call median (ms)", f["big_med"], ".2f", Budget("<=", 8, ISSUE12)),
        Row("file transport, calls/s, 4 threads on one connection", f["rate"], ".0f",
            Budget(">=", 2500, ISSUE12)),
        Row("file transport, calls/s, 4 processes on 4 connections", f["processes_rate"], ".0f",
            Budget(">=", 2500, ISSUE12)),
        Row("file transport, calls/s 4 processes / 4 threads", f["processes_per_threads"], ".2f",
            Budget(">=", 1, ISSUE12)),
        Row("TCP small-call median / mp.connection's", t["small_med"] / ref["small_med"], ".2f",
            Budget("<=", 5, ISSUE12)),
    ])
    print("for comparison, fileproxy 0.1.1: small call 202 ms, 20 calls/s with 4 threads")

if __name__ == "__main__":
    main()
