"""Benchmark of the `fileforward` tunnel against direct TCP loopback, in one run.

    python benchmarks/tunnel.py [--dir DIR] [--runs 3] [--mb 64] [--coherence MODE]
    python benchmarks/tunnel.py --two-nodes [--profile nfs] [--coherence MODE]

Starts the real CLI (`python -m fileforward --server/--client`) with a tunnel
directory under DIR (default: a temporary directory on local disk), an echo service
behind it, and prints one table of medians over --runs runs, each figure next to
its budget (issues 10 and 13) and whether it is met. Every reference (direct TCP
to an identical echo service) is measured in the same run as the tunnel:

- bulk throughput (MB/s each way, echo) through the tunnel and directly, and their ratio;
- the proxies (`fileforward serve` and a requester with `-D` and `--http-proxy`, on
  a tunnel directory of their own): bulk throughput through the SOCKS5 and the HTTP
  CONNECT proxy against the same echo service, their ratio to the plain tunnel's,
  and the connection setup time (connect, proxy handshake, first byte echoed;
  median of --setup-samples, 100) through each, and through the plain tunnel;
- 64-byte round trip median and p99, tunnel and direct, and the ratio;
- 20 connections each doing 64-byte round trips at once: total round trips per
  second, tunnel and direct (one client thread drives all 20 sockets in both cases),
  and the ratio;
- first byte after 2 s idle: on one open connection, wait 2 s, send one byte, time
  its echo (median of --first-byte-samples);
- idle cost per endpoint with 1 and 100 open idle connections: system calls per
  second that name a path or a descriptor in the tunnel directory (`strace -f -y`
  on each endpoint process, all threads; reads and writes on sockets, pipes and
  eventfds are not counted), and CPU % (from /proc, without strace attached).

`--two-nodes` runs the login side on node A and the job side on node B of the
emulated NFS of tests/nfs_harness (root, after .ci/install-nfs.sh; `--profile`
picks the filesystem it models) and adds, from the harness's per-mount request
counters: filesystem requests per small message per direction (both nodes
together, during the round trips) and idle requests per second per node.

`--coherence MODE` is passed to every endpoint, and only when given: a version
without the flag then still runs. Smaller --runs, --mb, --round-trips,
--setup-samples, --concurrent-seconds, --first-byte-samples and --idle-seconds
shorten a run (the defaults take about 3 minutes on local disk, 7 on the two nodes).
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.report import Budget, Row, print_table  # noqa: E402
from fileforward.cliargs import Parser  # noqa: E402
from tests.nfs_harness.options import PROFILES, NodeOptions  # noqa: E402
from tests.tunnel_support import Proc, free_port, python, recv_exactly, start_cli, start_service  # noqa: E402

IDLE_SETTLE_S = 3.0
MESSAGE = 64
CONCURRENT_CONNECTIONS = 20
IDLE_SPELL_S = 2.0
ISSUE10 = "issue 10"

Opener = Callable[[], socket.socket]
T = TypeVar("T")


# --- helpers ---------------------------------------------------------------------------


def poll_until(check: Callable[[], Optional[T]], timeout: float, what: str) -> T:
    """Call `check` until it returns something true; RuntimeError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_listening(port: int, procs: Sequence[Proc], timeout: float = 30.0) -> None:
    """Wait until something accepts connections on `port`; fail with its output if
    one of `procs` (the processes started to listen there or behind it) exits."""
    def ready() -> bool:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{' '.join(proc.argv)} exited ({proc.popen.returncode}):\n{proc.output}")
        return accepts(port)
    poll_until(ready, timeout, f"a listener on port {port}")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def through_socks5(proxy_port: int, port: int) -> socket.socket:
    """A connection to 127.0.0.1:port through the SOCKS5 proxy on proxy_port (no auth)."""
    sock = connect(proxy_port)
    sock.sendall(b"\x05\x01\x00")
    if recv_exactly(sock, 2) != b"\x05\x00":
        raise RuntimeError("SOCKS5 proxy refused the no-authentication method")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"))
    version, reply, _, kind = recv_exactly(sock, 4)
    if (version, reply) != (5, 0):
        raise RuntimeError(f"SOCKS5 proxy answered {reply} to CONNECT")
    recv_exactly(sock, {1: 4, 4: 16}.get(kind) or recv_exactly(sock, 1)[0])  # the bound address
    recv_exactly(sock, 2)  # and port
    return sock


def through_http_proxy(proxy_port: int, port: int) -> socket.socket:
    """A connection to 127.0.0.1:port through the HTTP proxy on proxy_port (CONNECT)."""
    sock = connect(proxy_port)
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: nothing of the tunnel is read
        head += recv_exactly(sock, 1)
    if head.split(b" ", 2)[1] != b"200":
        raise RuntimeError(f"HTTP proxy answered {head!r} to CONNECT")
    return sock


# --- measurements ------------------------------------------------------------------------
def throughput(open_echo: Opener, megabytes: int) -> float:
    """MB/s of an echo transfer: send and receive `megabytes` concurrently; verified."""
    payload = os.urandom(1 << 20) * megabytes
    with open_echo() as sock:
        received: List[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_exactly(sock, len(payload))))
        started = time.perf_counter()
        reader.start()
        sock.sendall(payload)
        reader.join()
        elapsed = time.perf_counter() - started
    if received != [payload]:
        raise RuntimeError("corrupted transfer")
    return megabytes * 1.048576 / elapsed


def setup_times(open_echo: Opener, count: int) -> List[float]:
    """Seconds from connecting (and the proxy handshake) to the first byte echoed."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with open_echo() as sock:
            sock.sendall(b"s")
            if recv_exactly(sock, 1) != b"s":
                raise RuntimeError("corrupted first byte")
            times.append(time.perf_counter() - started)
    return times


def round_trips(port: int, count: int) -> List[float]:
    """Seconds per 64-byte echo round trip, after a warm-up."""
    message = b"r" * MESSAGE
    times = []
    with connect(port) as sock:
        for i in range(count + 100):
            started = time.perf_counter()
            sock.sendall(message)
            if recv_exactly(sock, MESSAGE) != message:
                raise RuntimeError("corrupted round trip")
            if i >= 100:
                times.append(time.perf_counter() - started)
    return times


def concurrent_round_trips(port: int, seconds: float, connections: int = CONCURRENT_CONNECTIONS) -> float:
    """Round trips per second, all connections together, of `connections` connections
    each doing 64-byte echo round trips back to back, for `seconds` after a warm-up
    of a quarter of that. One thread drives every socket (no GIL hand-offs), so
    the direct TCP reference is measured at what one client process can do."""
    socks = [connect(port) for _ in range(connections)]
    try:
        messages = {sock: bytes([65 + i % 26]) * MESSAGE for i, sock in enumerate(socks)}  # one per connection
        received = {sock: b"" for sock in socks}
        for sock in socks:
            sock.sendall(messages[sock])
        done = 0
        warm_until = time.perf_counter() + seconds / 4
        counting_since, stop_at = None, warm_until + seconds
        while True:
            readable, _, _ = select.select(socks, [], [], 60)
            if not readable:
                raise RuntimeError("no echo for 60 s")
            now = time.perf_counter()
            if counting_since is None and now >= warm_until:
                counting_since, done = now, 0
            if now >= stop_at:
                return done / (now - counting_since)
            for sock in readable:
                chunk = sock.recv(MESSAGE - len(received[sock]))
                if not chunk:
                    raise ConnectionError("an echo connection ended")
                received[sock] += chunk
                if len(received[sock]) == MESSAGE:
                    if received[sock] != messages[sock]:
                        raise RuntimeError("corrupted round trip (bytes of another connection?)")
                    received[sock] = b""
                    done += 1
                    sock.sendall(messages[sock])
    finally:
        for sock in socks:
            sock.close()


def first_bytes_after_idle(port: int, samples: int, idle: float = IDLE_SPELL_S) -> List[float]:
    """Seconds from sending one byte to its echo, each time after `idle` seconds
    in which the connection carried nothing (the quiet spell is what is measured)."""
    times = []
    with connect(port) as sock:
        sock.sendall(b"w")
        recv_exactly(sock, 1)
        for _ in range(samples):
            time.sleep(idle)
            started = time.perf_counter()
            sock.sendall(b"k")
            if recv_exactly(sock, 1) != b"k":
                raise RuntimeError("corrupted first byte after idle")
            times.append(time.perf_counter() - started)
    return times


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tunnel_dir_syscalls(traced: Dict[int, Path], seconds: float) -> Dict[int, int]:
    """System calls each process (all its threads) made during `seconds` that name
    a path or a descriptor (as `strace -y` resolves it) under its tunnel directory
    `traced[pid]`: file operations, locks, stats, directory listings. Calls on
    sockets, pipes and eventfds do not count."""
    with tempfile.TemporaryDirectory(prefix="ffstrace-") as scratch:
        tracers = {}
        for pid in traced:
            out, err = Path(scratch, f"{pid}.out"), Path(scratch, f"{pid}.err")
            with open(err, "w") as err_file:
                tracers[pid] = (subprocess.Popen(["strace", "-f", "-y", "-e", "trace=%file,%desc", "-o", str(out),
                                                  "-p", str(pid)], stderr=err_file), out)
            poll_until(lambda: "attached" in err.read_text(), 10, f"strace to attach to process {pid}")
        time.sleep(seconds)
        counts = {}
        for pid, (tracer, out) in tracers.items():
            tracer.terminate()
            tracer.wait(10)
            where = str(traced[pid])
            counts[pid] = sum(1 for line in out.read_text().splitlines() if where in line and "resumed>" not in line)
        return counts


class Target:
    """Where the two endpoints run (one local directory, or the two emulated NFS
    nodes) and the flags every endpoint gets."""

    def __init__(self, base: Path, pair=None, endpoint_args: Sequence[str] = ()) -> None:
        self.base = base
        self.pair = pair
        self.endpoint_args = [*endpoint_args, "--log-level", "WARNING"]  # no log writes in the windows counted

    def dirs(self) -> Tuple[Path, Path, List[str]]:
        """(login-side tunnel dir, job-side tunnel dir, argv prefix of the job side)."""
        name = tempfile.mkdtemp(prefix="ffbench-", dir=self.pair.backing if self.pair else self.base)
        if self.pair is None:
            return Path(name).resolve(), Path(name).resolve(), []
        leaf = Path(name).name
        return self.pair.a / leaf, self.pair.b / leaf, list(self.pair.b_prefix)

    def requests(self) -> Optional[Dict[str, Dict[str, int]]]:
        """Filesystem requests served so far, per node and operation (two nodes only)."""
        if self.pair is None:
            return None
        return {node: self.pair.requests(node) for node in ("a", "b")}


def requests_between(before: Dict[str, Dict[str, int]], after: Dict[str, Dict[str, int]]) -> Dict[str, int]:
    """Requests served between two `Target.requests()` readings, per node."""
    return {node: sum(after[node].values()) - sum(before[node].values()) for node in after}


class Setup:
    """Echo services + the two CLI endpoints on a fresh tunnel directory; with
    `proxies`, also `fileforward serve` next to the job side's echo service and a
    requester with -D and --http-proxy next to the login side, on a second one."""

    def __init__(self, target: Target, proxies: bool = False) -> None:
        self.login_dir, self.job_dir, job_prefix = target.dirs()
        self.tunnel_dirs = [self.login_dir]
        self.proxies: List[Proc] = []
        self.reference_port, self.echo_port, self.port = free_port(), free_port(), free_port()
        flags = target.endpoint_args
        with contextlib.ExitStack() as started:  # a failed start stops the others
            self.reference = start_service("echo", self.reference_port)
            started.callback(self.reference.stop)
            self.echo = start_service("echo", self.echo_port, prefix=job_prefix)
            started.callback(self.echo.stop)
            self.job_side = start_cli("client", self.echo_port, self.job_dir, *flags, prefix=job_prefix,
                                      ready=False)
            started.callback(self.job_side.stop)
            self.login_side = start_cli("server", self.port, self.login_dir, *flags, ready=False)
            started.callback(self.login_side.stop)
            if proxies:
                login_net, job_net, _ = target.dirs()
                self.tunnel_dirs.append(login_net)
                self.socks_port, self.http_port = free_port(), free_port()
                self.proxies.append(Proc(python("-m", "fileforward", "serve", "--tunnel-dir", str(job_net), *flags),
                                         job_prefix))
                started.callback(self.proxies[-1].stop)
                self.proxies.append(Proc(python("-m", "fileforward", "--tunnel-dir", str(login_net), *flags,
                                                "-D", str(self.socks_port), "--http-proxy", str(self.http_port))))
                started.callback(self.proxies[-1].stop)
                wait_listening(self.socks_port, self.proxies)
                wait_listening(self.http_port, self.proxies)
            wait_listening(self.port, [self.login_side, self.job_side])
            for way, open_echo in self.openers().items():  # the sides have met: no start-up time in any figure
                try:
                    setup_times(open_echo, 1)
                except (OSError, RuntimeError) as exc:
                    raise RuntimeError(f"no byte came back through {way} ({exc}); the endpoints said:\n"
                                       + self.output()) from exc
            started.pop_all()

    def __enter__(self) -> "Setup":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in (*reversed(self.proxies), self.login_side, self.job_side, self.echo, self.reference):
            proc.stop()
        for tunnel_dir in self.tunnel_dirs:
            shutil.rmtree(tunnel_dir, ignore_errors=True)

    def openers(self) -> Dict[str, Opener]:
        """How to reach an echo service: directly ("tcp"), through the tunnel, and
        (with proxies) through the tunnel's SOCKS5 and HTTP proxies."""
        ways = {"tcp": lambda: connect(self.reference_port), "tunnel": lambda: connect(self.port)}
        if self.proxies:
            ways["socks"] = lambda: through_socks5(self.socks_port, self.echo_port)
            ways["http"] = lambda: through_http_proxy(self.http_port, self.echo_port)
        return ways

    def output(self) -> str:
        """What the tunnel's processes printed so far (warnings and errors only)."""
        return "\n".join(f"{' '.join(proc.argv[1:4])} ...:\n{proc.output}"
                         for proc in (self.login_side, self.job_side, *self.proxies) if proc.output)

    def endpoints(self) -> Dict[str, Tuple[int, Path]]:
        """Each side's process id and the tunnel directory as that side sees it."""
        return {"login": (self.login_side.popen.pid, self.login_dir), "job": (self.job_side.popen.pid, self.job_dir)}


def idle_costs(target: Target, connections: int, seconds: float, trace: bool) -> Dict[str, float]:
    """CPU %, tunnel-dir system calls/s (with `trace`) per endpoint, and requests/s
    per node (two nodes), with `connections` open connections carrying nothing."""
    with Setup(target) as setup:
        socks = []
        try:
            for _ in range(connections):
                sock = connect(setup.port)
                sock.sendall(b"hello")
                recv_exactly(sock, 5)
                socks.append(sock)
            time.sleep(IDLE_SETTLE_S)  # the quiet spell before measuring: the endpoints back off to idle polling
            sides = setup.endpoints()
            cpu_before, requests_before = {side: cpu_seconds(pid) for side, (pid, _) in sides.items()}, target.requests()
            time.sleep(seconds)  # the window measured
            result = {f"cpu_{side}": 100 * (cpu_seconds(pid) - cpu_before[side]) / seconds
                      for side, (pid, _) in sides.items()}
            if requests_before is not None:
                for node, count in requests_between(requests_before, target.requests()).items():
                    result[f"requests_{node}"] = count / seconds
            if trace:
                calls = tunnel_dir_syscalls({pid: where for pid, where in sides.values()}, seconds)
                result.update({f"syscalls_{side}": calls[pid] / seconds for side, (pid, _) in sides.items()})
            for sock in socks:  # still alive after the idle period?
                sock.sendall(b"still")
                if recv_exactly(sock, 5) != b"still":
                    raise RuntimeError("idle connection corrupted")
            return result
        finally:
            for sock in socks:
                sock.close()


def one_run(target: Target, args) -> Dict[str, float]:
    result: Dict[str, float] = {}
    with Setup(target, proxies=True) as setup:
        for way, open_echo in setup.openers().items():
            result[f"{way}_mbs"] = throughput(open_echo, args.mb)
        # ratios within one run (their median is the figure): the machine's load varies between runs
        result["tunnel_ratio"] = result["tunnel_mbs"] / result["tcp_mbs"]
        for way in ("socks", "http"):
            result[f"{way}_ratio"] = result[f"{way}_mbs"] / result["tunnel_mbs"]
        for way, open_echo in setup.openers().items():
            if way != "tcp":
                result[f"{way}_setup_med"] = statistics.median(setup_times(open_echo, args.setup_samples))
    with Setup(target) as setup:  # no proxies polling the mounts while requests are counted
        direct = round_trips(setup.reference_port, 2000)
        before = target.requests()
        tunneled = round_trips(setup.port, args.round_trips)
        if before is not None:
            after, messages = target.requests(), 2 * (args.round_trips + 100)  # two directions; with the warm-up
            result["requests_per_message"] = sum(requests_between(before, after).values()) / messages
            for op in after["a"]:
                result[f"op_{op}"] = sum(after[node][op] - before[node][op] for node in after) / messages
        result["tcp_rtt_med"], result["tcp_rtt_p99"] = statistics.median(direct), _p99(direct)
        result["tunnel_rtt_med"], result["tunnel_rtt_p99"] = statistics.median(tunneled), _p99(tunneled)
        result["rtt_ratio"] = result["tunnel_rtt_med"] / result["tcp_rtt_med"]
        result["tcp_many_rps"] = concurrent_round_trips(setup.reference_port, args.concurrent_seconds)
        result["tunnel_many_rps"] = concurrent_round_trips(setup.port, args.concurrent_seconds)
        result["many_ratio"] = result["tunnel_many_rps"] / result["tcp_many_rps"]
        result["first_byte_med"] = statistics.median(first_bytes_after_idle(setup.port, args.first_byte_samples))
    for n in (1, 100):
        for key, value in idle_costs(target, n, args.idle_seconds, args.strace).items():
            result[f"idle{n}_{key}"] = value
    return result


def _p99(values: List[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


# --- the table ---------------------------------------------------------------------------


def judged_mode(args) -> str:
    """The coherence mode the two-node budgets apply to: --coherence when given,
    else the one the probe should choose: locks where locks exclude across nodes."""
    if args.coherence not in (None, "auto"):
        return args.coherence
    return "locks" if NodeOptions.preset(args.profile).lock_forwarding else "lock-free"


def per_side(med: Dict[str, float], prefix: str, sides: Sequence[str]) -> Tuple[Optional[float], str]:
    """The worst side's figure (what a budget judges) and "x / y" for every side."""
    values = [med.get(f"{prefix}_{side}") for side in sides]
    if None in values:
        return None, "n/a"
    return max(values), " / ".join(f"{value:.1f}" for value in values)


def table_rows(med: Dict[str, float], args) -> List[Row]:
    ms, local, two = 1000, not args.two_nodes, args.two_nodes
    mode = judged_mode(args) if two else None
    in_mode = f"{ISSUE10}, {mode}"
    rows = [
        Row("bulk throughput, tunnel (MB/s)", med["tunnel_mbs"], ".1f",
            Budget(">=", 80, in_mode) if mode == "locks" else None),
        Row("bulk throughput, direct TCP (MB/s)", med["tcp_mbs"], ".0f"),
        Row("throughput ratio tunnel/TCP", med["tunnel_ratio"], ".3f",
            Budget(">=", 0.34, ISSUE10) if local else None),
        Row("64 B round trip median, tunnel (ms)", med["tunnel_rtt_med"] * ms, ".3f",
            Budget("<=", 1.2, ISSUE10) if local else Budget("<=", 12 if mode == "locks" else 15, in_mode)),
        Row("64 B round trip p99, tunnel (ms)", med["tunnel_rtt_p99"] * ms, ".3f"),
        Row("64 B round trip median, direct TCP (ms)", med["tcp_rtt_med"] * ms, ".3f"),
        Row("round trip ratio tunnel/TCP (median)", med["rtt_ratio"], ".1f"),
        Row(f"{CONCURRENT_CONNECTIONS} connections x 64 B round trips at once, tunnel (round trips/s)",
            med["tunnel_many_rps"], ".0f"),
        Row(f"{CONCURRENT_CONNECTIONS} connections x 64 B round trips at once, direct TCP (round trips/s)",
            med["tcp_many_rps"], ".0f"),
        Row(f"{CONCURRENT_CONNECTIONS} connections at once, ratio tunnel/TCP", med["many_ratio"], ".3f",
            Budget(">=", 0.25, ISSUE10) if local else None),
        Row(f"first byte after {IDLE_SPELL_S:g} s idle, median (ms)", med["first_byte_med"] * ms, ".1f",
            Budget("<=", 100, ISSUE10)),
    ]
    if two:
        rows.append(Row("filesystem requests per small message per direction, both nodes together (harness)",
                        med["requests_per_message"], ".2f", Budget("<=", 5, ISSUE10)))
    rows.append(Row("connection setup + first byte median, tunnel (ms)", med["tunnel_setup_med"] * ms, ".2f"))
    for way, name in (("socks", "-D (SOCKS5)"), ("http", "--http-proxy (CONNECT)")):
        rows += [
            Row(f"bulk throughput, {name} (MB/s)", med[f"{way}_mbs"], ".1f"),
            Row(f"throughput ratio {name}/tunnel", med[f"{way}_ratio"], ".3f", Budget(">=", 0.9, "issue 13")),
            Row(f"connection setup + first byte median, {name} (ms)", med[f"{way}_setup_med"] * ms, ".2f"),
        ]
    for n in (1, 100):
        worst, each = per_side(med, f"idle{n}_syscalls", ("login", "job"))
        rows.append(Row(f"idle syscalls/s on the tunnel dir per endpoint, {n} conn(s) (strace; login / job)",
                        worst, text=each if args.strace else "n/a: strace not installed",
                        budget=Budget("<=", 10, ISSUE10) if local else None))
        if two:
            worst, each = per_side(med, f"idle{n}_requests", ("a", "b"))
            rows.append(Row(f"idle filesystem requests/s per node, {n} conn(s) (harness; node A / node B)",
                            worst, text=each, budget=Budget("<=", 10, ISSUE10)))
        worst, each = per_side(med, f"idle{n}_cpu", ("login", "job"))
        rows.append(Row(f"idle CPU % per endpoint, {n} conn(s) (login / job)", worst, text=each))
    return rows


def main() -> None:
    parser = Parser(prog="python benchmarks/tunnel.py", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="filesystem to put the tunnel directory on")
    parser.add_argument("--two-nodes", action="store_true",
                        help="run the sides on the two emulated NFS nodes of tests/nfs_harness (root, "
                             "after .ci/install-nfs.sh)")
    parser.add_argument("--profile", choices=list(PROFILES), default=None,
                        help="--two-nodes: the filesystem the harness models (default: nfs, write-behind "
                             "on, 0.5 ms per request); " + "; ".join(f"{name}: {p.help}" for name, p in PROFILES.items()))
    parser.add_argument("--coherence", choices=("auto", "locks", "lock-free"),
                        help="passed as --coherence to every endpoint (default: not passed)")
    parser.add_argument("--runs", type=int, default=3, metavar="N", help="runs; every figure is their median")
    parser.add_argument("--mb", type=int, default=64, metavar="MB", help="MB per bulk transfer")
    parser.add_argument("--round-trips", type=int, metavar="N", help="64 B round trips timed through the tunnel "
                        "(default: 2000, with --two-nodes 500)")
    parser.add_argument("--setup-samples", type=int, default=100, metavar="N",
                        help="connections timed from connect to first byte echoed, per way")
    parser.add_argument("--concurrent-seconds", type=float, default=3.0, metavar="S",
                        help=f"seconds the {CONCURRENT_CONNECTIONS} concurrent connections are timed, each way")
    parser.add_argument("--first-byte-samples", type=int, default=5, metavar="N",
                        help=f"first bytes timed after {IDLE_SPELL_S:g} s idle")
    parser.add_argument("--idle-seconds", type=float, default=5.0, metavar="S",
                        help="seconds each idle figure is measured over (CPU, then syscalls)")
    args = parser.parse_args()
    if args.profile and not args.two_nodes:
        parser.error("--profile needs --two-nodes")
    args.profile = args.profile or "nfs"
    args.round_trips = args.round_trips or (500 if args.two_nodes else 2000)
    args.strace = shutil.which("strace") is not None
    if not args.strace:
        print("strace is not installed: the idle syscall counts are left out (apt-get install -y strace)",
              file=sys.stderr)
    endpoint_args = ["--coherence", args.coherence] if args.coherence else []
    with contextlib.ExitStack() as stack:
        pair = None
        if args.two_nodes:
            from tests.nfs_harness.cluster import start_two_nodes
            workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="ffnodes-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # after the unmount
            pair = stack.enter_context(start_two_nodes(workdir, NodeOptions.preset(args.profile)))
        target = Target(args.dir, pair, endpoint_args)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(target, args))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k}={v:.4g}" for k, v in runs[-1].items()
                                                           if not k.startswith("op_")), flush=True)
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    if args.two_nodes:
        options = NodeOptions.preset(args.profile)
        where = (f"two emulated NFS nodes, profile {args.profile} ({options.latency_ms:g} ms/request, "
                 f"write-behind {'on' if options.write_behind else 'off'}, locks "
                 f"{'across nodes' if options.lock_forwarding else 'node-local'}); budgets for {judged_mode(args)} mode")
    else:
        where = str(args.dir)
    print_table(f"fileforward tunnel benchmark: {where}; --coherence {args.coherence or 'not passed'}; "
                f"median of {args.runs} runs, {args.mb} MB transfers", table_rows(med, args))
    if args.two_nodes:
        by_op = sorted(((v, k[3:]) for k, v in med.items() if k.startswith("op_") and v >= 0.005), reverse=True)
        print("filesystem requests per small message per direction, by operation: "
              + ", ".join(f"{op} {value:.2f}" for value, op in by_op))


if __name__ == "__main__":
    main()
