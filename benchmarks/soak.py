"""Soak benchmark: mixed traffic through the real CLI for a while, every byte checked.

    python benchmarks/soak.py [--minutes 30] [--interval 10] [--settle 5] [--dir DIR]

Starts `fileforward --server` and `--client` on a fresh tunnel directory under DIR
(default: a temporary directory on local disk) with an echo service behind them
(benchmarks/tunnel.py's setup), then runs until --minutes have passed (fractions
allowed), all on 127.0.0.1:

- bulk: 2 threads, each echoing 8 MiB per connection (send and receive at once);
- short: 2 threads opening connection after connection (200 bytes, half-close, EOF);
- round trips: 1 long-lived connection, 64-byte echoes;
- resets: 1 thread, every 0.5 s a connection that sends 64 KiB, reads the first
  echoed KiB, and closes with RST (SO_LINGER 0), as a killed client would.

Every payload is a deterministic pattern (shake_256 of a counter) compared byte for
byte with what comes back, and a normal connection must end with a clean EOF.

Every --interval seconds it prints one line per side: RSS (/proc/PID/status), open
descriptors (/proc/PID/fd) and files in the tunnel directory. At the end: data and
connection errors; descriptors and tunnel files before the load and after it stopped
(back within --settle seconds? it watches up to 60 s to say when); RSS over the last
2/3 of the run (start, last, max; flat means never above the start + 10 %).

Exit status 1 on a data or connection error, or on resources not back to idle.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.tunnel import Setup, Target, connect  # noqa: E402
from tests.tunnel_support import Proc, recv_exactly, tunnel_files  # noqa: E402

BULK_THREADS, BULK_BYTES = 2, 8 << 20
SHORT_THREADS, SHORT_BYTES = 2, 200
ROUND_TRIP_BYTES = 64
RESET_EVERY_S, RESET_SEND_BYTES, RESET_READ_BYTES = 0.5, 64 << 10, 1 << 10
OBSERVE_S = 60.0  # how long to watch for the way back to idle, even past --settle
RSS_WINDOW = 2 / 3  # RSS is judged over the last 2/3 of the run
RSS_TOLERANCE = 0.10
MiB = 1 << 20


class DataError(Exception):
    """What came back differs from what was sent."""


def pattern(seed: int, size: int) -> bytes:
    """`size` deterministic bytes, different for every seed."""
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)


def expect_equal(got: bytes, sent: bytes, what: str) -> None:
    if got != sent:
        first = next((i for i, (a, b) in enumerate(zip(got, sent)) if a != b), min(len(got), len(sent)))
        raise DataError(f"{what}: {len(got)} of {len(sent)} bytes back, first difference at byte {first}")


def expect_eof(sock: socket.socket, what: str) -> None:
    extra = sock.recv(1 << 16)
    if extra:
        raise DataError(f"{what}: {len(extra)} unexpected bytes after the echo")


class Tally:
    """Counters shared by the traffic threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.done: Dict[str, int] = {}
        self.errors: Dict[str, List[str]] = {"data": [], "connection": []}
        self.seeds = itertools.count()

    def seed(self) -> int:
        with self.lock:
            return next(self.seeds)

    def ok(self, kind: str, nbytes: int) -> None:
        with self.lock:
            self.done[kind] = self.done.get(kind, 0) + 1
            self.bytes += nbytes

    def error(self, category: str, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[category].append(f"{kind}: {type(exc).__name__}: {exc}")

    def summary(self) -> str:
        with self.lock:
            done = ", ".join(f"{n} {kind}" for kind, n in sorted(self.done.items()))
            return (f"{self.bytes / MiB:.0f} MiB echoed, {done or 'nothing done'}; errors: "
                    f"{len(self.errors['data'])} data, {len(self.errors['connection'])} connection")


# --- traffic -----------------------------------------------------------------------------


def bulk(port: int, tally: Tally) -> int:
    sent = pattern(tally.seed(), BULK_BYTES)
    with connect(port) as sock:
        sender = threading.Thread(target=sock.sendall, args=(sent,), daemon=True)
        sender.start()
        got = recv_exactly(sock, len(sent))
        sender.join()
        sock.shutdown(socket.SHUT_WR)
        expect_equal(got, sent, "bulk")
        expect_eof(sock, "bulk")
    return 2 * len(sent)


def short(port: int, tally: Tally) -> int:
    sent = pattern(tally.seed(), SHORT_BYTES)
    with connect(port) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        got = recv_exactly(sock, len(sent))
        expect_equal(got, sent, "short")
        expect_eof(sock, "short")
    return 2 * len(sent)


def reset(port: int, tally: Tally) -> int:
    sent = pattern(tally.seed(), RESET_SEND_BYTES)
    sock = connect(port)
    try:
        sock.sendall(sent)
        expect_equal(recv_exactly(sock, RESET_READ_BYTES), sent[:RESET_READ_BYTES], "reset")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()  # with SO_LINGER 0: RST, the unread echo discarded
    return len(sent) + RESET_READ_BYTES


def run_round_trips(port: int, tally: Tally, stop: threading.Event) -> None:
    """One long-lived connection for the whole run; ends with a clean half-close."""
    try:
        with connect(port) as sock:
            while not stop.is_set():
                sent = pattern(tally.seed(), ROUND_TRIP_BYTES)
                sock.sendall(sent)
                expect_equal(recv_exactly(sock, len(sent)), sent, "round trip")
                tally.ok("round trips", 2 * len(sent))
            sock.shutdown(socket.SHUT_WR)
            expect_eof(sock, "round trip")
    except DataError as exc:
        tally.error("data", "round trip", exc)
    except OSError as exc:
        tally.error("connection", "round trip", exc)


def repeat(kind: str, one: Callable[[int, Tally], int], port: int, tally: Tally, stop: threading.Event,
           pause: float = 0.0) -> None:
    """Run `one` connection after another until `stop`, counting successes and errors."""
    while not stop.is_set():
        try:
            tally.ok(kind, one(port, tally))
        except DataError as exc:
            tally.error("data", kind, exc)
        except OSError as exc:
            tally.error("connection", kind, exc)
        if pause:
            stop.wait(pause)


def start_traffic(port: int, tally: Tally, stop: threading.Event) -> List[threading.Thread]:
    jobs: List[Tuple[Callable[..., None], tuple]] = []
    jobs += [(repeat, ("bulk", bulk, port, tally, stop))] * BULK_THREADS
    jobs += [(repeat, ("short", short, port, tally, stop))] * SHORT_THREADS
    jobs += [(repeat, ("resets", reset, port, tally, stop, RESET_EVERY_S)), (run_round_trips, (port, tally, stop))]
    threads = [threading.Thread(target=target, args=args, daemon=True) for target, args in jobs]
    for thread in threads:
        thread.start()
    return threads


# --- resources ---------------------------------------------------------------------------


class Sample:
    """One reading of a process, and of the tunnel directory both sides share."""

    def __init__(self, pid: int, files: int) -> None:
        status = Path(f"/proc/{pid}/status").read_text()
        self.rss_mb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
        self.fds = len(os.listdir(f"/proc/{pid}/fd"))
        self.files = files

    def __str__(self) -> str:
        return f"rss {self.rss_mb:6.1f} MB  fds {self.fds:5d}  tunnel files {self.files:4d}"


def sample_sides(sides: Dict[str, Proc], tunnel_dir: Path) -> Dict[str, Sample]:
    files = len(tunnel_files(tunnel_dir))
    return {name: Sample(proc.popen.pid, files) for name, proc in sides.items()}


def idle_level(sides: Dict[str, Proc], tunnel_dir: Path, timeout: float = 10.0) -> Dict[str, Sample]:
    """Descriptors and files once two readings 0.5 s apart agree (a fresh endpoint
    may still be opening its files), or after `timeout`."""
    deadline = time.monotonic() + timeout
    last = sample_sides(sides, tunnel_dir)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sample_sides(sides, tunnel_dir)
        if all((now[s].fds, now[s].files) == (last[s].fds, last[s].files) for s in sides):
            return now
        last = now
    return last


def back_to_idle(now: Dict[str, Sample], idle: Dict[str, Sample]) -> bool:
    return all(now[s].fds <= idle[s].fds and now[s].files <= idle[s].files for s in idle)


def settle(sides: Dict[str, Proc], tunnel_dir: Path, idle: Dict[str, Sample],
           timeout: float) -> Tuple[Dict[str, Sample], Optional[float]]:
    """Poll until descriptors and tunnel files are back to `idle`, for up to `timeout`
    seconds; (last sample, seconds it took, or None)."""
    started = time.monotonic()
    while True:
        now = sample_sides(sides, tunnel_dir)
        elapsed = time.monotonic() - started
        if back_to_idle(now, idle):
            return now, elapsed
        if elapsed > timeout:
            return now, None
        time.sleep(0.2)


def rss_verdict(history: List[Tuple[float, Dict[str, Sample]]], side: str, since: float) -> str:
    """RSS from `since` on. Bulk buffers make single readings noisy, so the start is
    the median of the first three; flat means no reading above start + 10 %."""
    values = [samples[side].rss_mb for t, samples in history if t >= since]
    if not values:
        return "no readings"
    start, last, top = statistics.median(values[:3]), values[-1], max(values)
    flat = top <= start * (1 + RSS_TOLERANCE)
    return (f"start {start:.1f} MB (median of the first 3 of {len(values)} readings), last {last:.1f} MB, "
            f"max {top:.1f} MB: {'flat' if flat else 'NOT flat'} (max within start + {RSS_TOLERANCE:.0%})")


def warnings_of(proc: Proc) -> List[str]:
    return [line for line in proc.output.splitlines() if " WARNING " in line or " ERROR " in line]


# --- main --------------------------------------------------------------------------------


class Load:
    """The traffic threads, and the resource readings taken while they run."""

    def __init__(self, setup: Setup, sides: Dict[str, Proc]) -> None:
        self.setup, self.sides = setup, sides
        self.tally, self.stop = Tally(), threading.Event()
        self.history: List[Tuple[float, Dict[str, Sample]]] = []
        self.stuck = 0

    def run(self, seconds: float, interval: float) -> None:
        """Traffic for `seconds`, a reading every `interval`; then stop the threads."""
        started = time.monotonic()
        end = started + seconds
        threads = start_traffic(self.setup.port, self.tally, self.stop)
        while time.monotonic() < end:
            time.sleep(max(0.0, min(interval, end - time.monotonic())))
            t = time.monotonic() - started
            self.history.append((t, sample_sides(self.sides, self.setup.login_dir)))
            for side, sample in self.history[-1][1].items():
                print(f"[{t:5.0f} s] {side:9} {sample}", flush=True)
            print(f"[{t:5.0f} s] traffic   {self.tally.summary()}", flush=True)
        self.stop.set()
        for thread in threads:
            thread.join(120)
        self.stuck = sum(thread.is_alive() for thread in threads)

    def peak(self, side: str, what: str) -> int:
        return max((getattr(samples[side], what) for _, samples in self.history), default=0)


def report(load: Load, idle: Dict[str, Sample], after: Dict[str, Sample], took: Optional[float],
           settle_s: float, seconds: float) -> bool:
    """Print the summary; True if the run failed."""
    tally = load.tally
    print(f"\nsoak summary: {seconds / 60:g} min on {load.setup.login_dir}")
    print(f"traffic: {tally.summary()}")
    for category, messages in tally.errors.items():
        for message in messages[:5]:
            print(f"  {category} error: {message}")
    for side in load.sides:
        print(f"{side}: descriptors idle {idle[side].fds}, max during load {load.peak(side, 'fds')}, after load "
              f"{after[side].fds}; RSS idle {idle[side].rss_mb:.1f} MB, after load {after[side].rss_mb:.1f} MB")
    any_side = next(iter(load.sides))
    print(f"tunnel files: idle {idle[any_side].files}, max during load {load.peak(any_side, 'files')}, "
          f"after load {after[any_side].files}")
    settled = took is not None and took <= settle_s
    print(f"back to idle within {settle_s:g} s: {'yes' if settled else 'NO'} ("
          + (f"{took:.1f} s after the load stopped)" if took is not None else f"not after {OBSERVE_S:g} s)"))
    for side, proc in load.sides.items():
        print(f"{side} RSS over the last {RSS_WINDOW:.0%} of the run: "
              + rss_verdict(load.history, side, seconds * (1 - RSS_WINDOW)))
        lines = warnings_of(proc)
        print(f"{side} logged {len(lines)} warnings/errors" + "".join(f"\n  {line}" for line in lines[:3]))
    if load.stuck:
        print(f"{load.stuck} traffic threads still blocked 120 s after the stop")
    failed = bool(tally.errors["data"] or tally.errors["connection"] or not settled or load.stuck)
    print("RESULT: " + ("FAIL" if failed else "ok"))
    return failed


def soak(minutes: float, interval: float, settle_s: float, base: Path) -> int:
    with Setup(Target(base)) as setup:
        sides = {"--server": setup.login_side, "--client": setup.job_side}
        short(setup.port, Tally())  # both sides are up: a side still starting would pass for idle
        idle = idle_level(sides, setup.login_dir)
        for side, sample in idle.items():
            print(f"[   idle] {side:9} {sample}", flush=True)
        load = Load(setup, sides)
        load.run(minutes * 60, interval)
        after, took = settle(sides, setup.login_dir, idle, max(settle_s, OBSERVE_S))
        return 1 if report(load, idle, after, took, settle_s, minutes * 60) else 0

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the load (default %(default)s)")
    parser.add_argument("--interval", type=float, default=10.0,
                        help="seconds between resource lines (default %(default)s)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds allowed to get back to idle after the load (default %(default)s)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="filesystem to put the tunnel directory on (default: %(default)s)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.interval <= 0:
        parser.error("--minutes and --interval must be positive")
    sys.exit(soak(args.minutes, args.interval, args.settle, args.dir))


if __name__ == "__main__":
    main()
