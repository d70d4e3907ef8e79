"""Benchmark of the `fileforward` tunnel against direct TCP loopback, in one run.

    python benchmarks/tunnel.py [--dir DIR] [--runs 3] [--mb 64]

Starts the real CLI (`python -m fileforward --server/--client`) with a tunnel
directory under DIR (default: a temporary directory on local disk), an echo service
behind it, and prints one table (medians over --runs):

- bulk throughput (MB/s each way, echo) through the tunnel and directly, and their ratio;
- the proxies (`fileforward serve` and a requester with `-D` and `--http-proxy`, on
  a tunnel directory of their own): bulk throughput through the SOCKS5 and the HTTP
  CONNECT proxy against the same echo service, their ratio to the plain tunnel's
  in the same run, and the connection setup time (connect, proxy handshake, first
  byte echoed; median of 100) through each, and through the plain tunnel;
- 64-byte round trip median and p99, tunnel and direct, and the ratio;
- idle filesystem syscalls per second per endpoint with 1 and 100 idle connections,
  counted by `strace -c -f` (install it with `apt-get install strace` if missing);
- idle CPU % per endpoint (from /proc, without strace attached).

Other filesystems: `--dir` on NFS measures there; `--two-nodes` runs the login side
and the job side on the two emulated NFS nodes of tests/nfs_harness and adds the
filesystem requests each node's mount served while idle.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.tunnel_support import Proc, free_port, python, recv_exactly, start_cli, start_service  # noqa: E402

FS_SYSCALLS = ("openat,close,read,write,pread64,pwrite64,fcntl,fstat,newfstatat,statx,lseek,ftruncate,"
               "rename,renameat,renameat2,unlink,unlinkat,getdents64,mkdir,mkdirat,fsync,fdatasync,flock")
IDLE_SETTLE_S = 3.0
IDLE_MEASURE_S = 10.0
SETUP_SAMPLES = 100

Opener = Callable[[], socket.socket]


# --- helpers ---------------------------------------------------------------------------


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}")
            time.sleep(0.05)


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


def setup_times(open_echo: Opener, count: int = SETUP_SAMPLES) -> List[float]:
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


def round_trips(port: int, count: int = 2000) -> List[float]:
    """Seconds per 64-byte echo round trip, after a warm-up."""
    message = b"r" * 64
    times = []
    with connect(port) as sock:
        for i in range(count + 100):
            started = time.perf_counter()
            sock.sendall(message)
            if recv_exactly(sock, 64) != message:
                raise RuntimeError("corrupted round trip")
            if i >= 100:
                times.append(time.perf_counter() - started)
    return times


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def strace_count(pids: Sequence[int], seconds: float) -> Dict[int, int]:
    """Filesystem syscalls made by each process (all threads) during `seconds`."""
    tracers = {}
    for pid in pids:
        out = tempfile.NamedTemporaryFile("w+", suffix=".strace", delete=False)
        tracers[pid] = (subprocess.Popen(["strace", "-c", "-f", "-e", f"trace={FS_SYSCALLS}", "-o", out.name,
                                          "-p", str(pid)], stderr=subprocess.DEVNULL), out.name)
    time.sleep(seconds)
    counts = {}
    for pid, (tracer, path) in tracers.items():
        tracer.terminate()
        tracer.wait(10)
        totals = [line.split() for line in Path(path).read_text().splitlines() if line.rstrip().endswith("total")]
        os.unlink(path)
        counts[pid] = int(totals[-1][3]) if totals else 0
    return counts


class Target:
    """Where the two endpoints run: one local directory, or the two emulated NFS nodes."""

    def __init__(self, base: Path, pair=None) -> None:
        self.base = base
        self.pair = pair

    def dirs(self) -> "tuple[Path, Path, list]":
        """(login-side tunnel dir, job-side tunnel dir, argv prefix of the job side)."""
        name = tempfile.mkdtemp(prefix="ffbench-", dir=self.pair.backing if self.pair else self.base)
        if self.pair is None:
            return Path(name), Path(name), []
        leaf = Path(name).name
        return self.pair.a / leaf, self.pair.b / leaf, list(self.pair.b_prefix)

    def requests(self) -> "Dict[str, int] | None":
        """Filesystem requests served so far per node (two-node harness only)."""
        if self.pair is None:
            return None
        return {node: self.pair.total_requests(node) for node in ("a", "b")}


class Setup:
    """Echo services + the two CLI endpoints on a fresh tunnel directory; with
    `proxies`, also `fileforward serve` next to the job side's echo service and a
    requester with -D and --http-proxy next to the login side, on a second one."""

    def __init__(self, target: Target, proxies: bool = False) -> None:
        login_dir, job_dir, job_prefix = target.dirs()
        self.tunnel_dirs = [login_dir]
        self.proxies: List[Proc] = []
        self.reference_port, self.echo_port, self.port = free_port(), free_port(), free_port()
        quiet = ("--log-level", "WARNING")  # no log writes in the idle windows counted
        with contextlib.ExitStack() as started:  # a failed start stops the others
            self.reference = start_service("echo", self.reference_port)
            started.callback(self.reference.stop)
            self.echo = start_service("echo", self.echo_port, prefix=job_prefix)
            started.callback(self.echo.stop)
            self.job_side = start_cli("client", self.echo_port, job_dir, *quiet, prefix=job_prefix,
                                      ready=False)
            started.callback(self.job_side.stop)
            self.login_side = start_cli("server", self.port, login_dir, *quiet, ready=False)
            started.callback(self.login_side.stop)
            if proxies:
                login_net, job_net, _ = target.dirs()
                self.tunnel_dirs.append(login_net)
                self.socks_port, self.http_port = free_port(), free_port()
                self.proxies.append(Proc(python("-m", "fileforward", "serve", "--tunnel-dir", str(job_net), *quiet),
                                         job_prefix))
                started.callback(self.proxies[-1].stop)
                self.proxies.append(Proc(python("-m", "fileforward", "--tunnel-dir", str(login_net), *quiet,
                                                "-D", str(self.socks_port), "--http-proxy", str(self.http_port))))
                started.callback(self.proxies[-1].stop)
                wait_listening(self.socks_port)
                wait_listening(self.http_port)
            wait_listening(self.port)
            started.pop_all()

    def openers(self) -> Dict[str, Opener]:
        """How to reach an echo service: directly ("tcp"), through the tunnel, and
        (with proxies) through the tunnel's SOCKS5 and HTTP proxies."""
        ways = {"tcp": lambda: connect(self.reference_port), "tunnel": lambda: connect(self.port)}
        if self.proxies:
            ways["socks"] = lambda: through_socks5(self.socks_port, self.echo_port)
            ways["http"] = lambda: through_http_proxy(self.http_port, self.echo_port)
        return ways

    def close(self) -> None:
        for proc in (*reversed(self.proxies), self.login_side, self.job_side, self.echo, self.reference):
            proc.stop()
        for tunnel_dir in self.tunnel_dirs:
            shutil.rmtree(tunnel_dir, ignore_errors=True)


def idle_costs(target: Target, connections: int) -> Dict[str, float]:
    setup = Setup(target)
    socks = []
    try:
        for _ in range(connections):
            sock = connect(setup.port)
            sock.sendall(b"hello")
            recv_exactly(sock, 5)
            socks.append(sock)
        time.sleep(IDLE_SETTLE_S)  # let the endpoints back off to their idle polling
        pids = [setup.login_side.popen.pid, setup.job_side.popen.pid]
        before, requests_before = {pid: cpu_seconds(pid) for pid in pids}, target.requests()
        time.sleep(IDLE_MEASURE_S)
        cpu = {pid: 100 * (cpu_seconds(pid) - before[pid]) / IDLE_MEASURE_S for pid in pids}
        requests_after = target.requests()
        calls = strace_count(pids, IDLE_MEASURE_S)
        for sock in socks:  # still alive after the idle period?
            sock.sendall(b"still")
            if recv_exactly(sock, 5) != b"still":
                raise RuntimeError("idle connection corrupted")
        result = {"syscalls": max(calls.values()) / IDLE_MEASURE_S, "cpu": max(cpu.values())}
        if requests_before is not None:
            result["requests"] = max(requests_after[n] - requests_before[n] for n in requests_after) / IDLE_MEASURE_S
        return result
    finally:
        for sock in socks:
            sock.close()
        setup.close()


def one_run(target: Target, megabytes: int) -> Dict[str, float]:
    result: Dict[str, float] = {}
    setup = Setup(target, proxies=True)
    try:
        for way, open_echo in setup.openers().items():
            result[f"{way}_mbs"] = throughput(open_echo, megabytes)
        for way in ("socks", "http"):  # a ratio within one run: the load of the machine varies between runs
            result[f"{way}_ratio"] = result[f"{way}_mbs"] / result["tunnel_mbs"]
        for way, open_echo in setup.openers().items():
            if way != "tcp":
                result[f"{way}_setup_med"] = statistics.median(setup_times(open_echo))
        direct, tunneled = round_trips(setup.reference_port), round_trips(setup.port, 500 if target.pair else 2000)
        result["tcp_rtt_med"], result["tcp_rtt_p99"] = statistics.median(direct), _p99(direct)
        result["tunnel_rtt_med"], result["tunnel_rtt_p99"] = statistics.median(tunneled), _p99(tunneled)
    finally:
        setup.close()
    for n in (1, 100):
        for key, value in idle_costs(target, n).items():
            result[f"idle{n}_{key}"] = value
    return result


def _p99(values: List[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="filesystem to put the tunnel directory on (default: %(default)s)")
    parser.add_argument("--two-nodes", action="store_true",
                        help="run the sides on the two emulated NFS nodes of tests/nfs_harness (root, "
                             "after .ci/install-nfs.sh): 0.5 ms per request, 2 s caches")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=64, help="MB per bulk transfer (default %(default)s)")
    args = parser.parse_args()
    if shutil.which("strace") is None:
        sys.exit("strace is needed to count syscalls: apt-get install -y strace")
    with contextlib.ExitStack() as stack:
        pair = None
        if args.two_nodes:
            from tests.nfs_harness.cluster import start_two_nodes
            workdir = Path(tempfile.mkdtemp(dir=args.dir, prefix="ffnodes-"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)  # after the unmount
            pair = stack.enter_context(start_two_nodes(workdir))
        target = Target(args.dir, pair)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(target, args.mb))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k}={v:.4g}" for k, v in runs[-1].items()), flush=True)
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    ms = 1000
    rows = [
        ("bulk throughput, tunnel (MB/s)", f"{med['tunnel_mbs']:.1f}"),
        ("bulk throughput, direct TCP (MB/s)", f"{med['tcp_mbs']:.0f}"),
        ("throughput ratio tunnel/TCP", f"{med['tunnel_mbs'] / med['tcp_mbs']:.3f}"),
        ("64 B round trip median, tunnel (ms)", f"{med['tunnel_rtt_med'] * ms:.3f}"),
        ("64 B round trip p99, tunnel (ms)", f"{med['tunnel_rtt_p99'] * ms:.3f}"),
        ("64 B round trip median, direct TCP (ms)", f"{med['tcp_rtt_med'] * ms:.3f}"),
        ("round trip ratio tunnel/TCP (median)", f"{med['tunnel_rtt_med'] / med['tcp_rtt_med']:.1f}"),
        ("connection setup + first byte median, tunnel (ms)", f"{med['tunnel_setup_med'] * ms:.2f}"),
    ]
    for way, name in (("socks", "-D (SOCKS5)"), ("http", "--http-proxy (CONNECT)")):
        rows += [
            (f"bulk throughput, {name} (MB/s)", f"{med[f'{way}_mbs']:.1f}"),
            (f"throughput ratio {name}/tunnel (target >= 0.9)", f"{med[f'{way}_ratio']:.3f}"),
            (f"connection setup + first byte median, {name} (ms)", f"{med[f'{way}_setup_med'] * ms:.2f}"),
        ]
    for n in (1, 100):
        rows.append((f"idle fs syscalls/s per endpoint, {n} conn(s)", f"{med[f'idle{n}_syscalls']:.1f}"))
        if f"idle{n}_requests" in med:
            rows.append((f"idle fs requests/s per node (harness), {n} conn(s)", f"{med[f'idle{n}_requests']:.1f}"))
        rows.append((f"idle CPU % per endpoint, {n} conn(s)", f"{med[f'idle{n}_cpu']:.2f}"))
    width = max(len(name) for name, _ in rows)
    where = "two emulated NFS nodes (0.5 ms/request, 2 s caches)" if args.two_nodes else str(args.dir)
    print(f"\nfileforward tunnel benchmark: {where}, median of {args.runs} runs, {args.mb} MB transfers")
    print(f"| {'metric'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
