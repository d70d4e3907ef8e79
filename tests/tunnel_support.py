"""Helpers for end-to-end tests: free ports, subprocesses that announce readiness,
and the `fileforward` CLI run as a real subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from fileforward import tunneldir
from fileforward.bell import SLOT_SIZE, OwnerSlot, PeerSlot, read_peers
from fileforward.files import TABLE
from fileforward.peers import claim_slot, machine_identity

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checkout_commands(bin_dir: Path, modules: Sequence[str] = ("fileforward",)) -> Path:
    """Fill `bin_dir` (created) for the front of PATH, as a user's shell would find
    them: `python3`/`python` are this interpreter, and each of `modules` is a
    command running `python -m MODULE` (with the checkout on PYTHONPATH: this
    checkout's code, installed or not)."""
    bin_dir.mkdir(parents=True)
    for module in modules:
        wrapper = bin_dir / module
        wrapper.write_text('#!/bin/sh\nexec "%s" -m %s "$@"\n' % (sys.executable, module))
        wrapper.chmod(0o755)
    for name in ("python3", "python"):
        (bin_dir / name).symlink_to(sys.executable)
    return bin_dir


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes from `sock`; ConnectionError if the stream ends first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Proc:
    """A subprocess whose merged output is collected by a thread, line by line."""

    def __init__(self, argv: Sequence[str], prefix: Sequence[str] = ()) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(list(prefix) + self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=REPO_ROOT, text=True)
        self.lines: List[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        """Wait until a line satisfies `predicate`; fail with the output so far."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"{self.argv} did not print the expected line; output:\n{self.output}")
                self._changed.wait(min(remaining, 0.2))

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`. Returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            raise AssertionError(f"{self.argv} ignored SIGTERM for {timeout} s; output:\n{self.output}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


def one_line_error(proc: Proc) -> str:
    """The single line a failing command printed (it must exit non-zero, without a traceback)."""
    assert proc.popen.wait(15) != 0
    lines = [l for l in proc.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.output, proc.output
    return lines[0]


def python(*args: str) -> List[str]:
    return [sys.executable, *args]


def start_service(kind: str, port: int, prefix: Sequence[str] = ()) -> Proc:
    """One of tests/services.py, ready to accept connections."""
    proc = Proc(python("-m", "tests.services", kind, str(port)), prefix)
    proc.wait_for(lambda line: line == "READY")
    return proc


def start_cli(role: str, port: int, tunnel_dir: Path, *extra: str, prefix: Sequence[str] = (),
              ready: bool = True) -> Proc:
    """`fileforward --server|--client --port PORT --tunnel_dir DIR ...`, waiting for its start line."""
    proc = Proc(python("-m", "fileforward", f"--{role}", "--port", str(port), "--tunnel_dir", str(tunnel_dir),
                       *extra), prefix)
    if ready:
        proc.wait_for(lambda line: "forwarding" in line)
    return proc


def tunnel_files(tunnel_dir: Path) -> List[str]:
    """What is left in a tunnel directory, the (empty) server pointer excepted."""
    names = sorted(os.listdir(tunnel_dir)) if tunnel_dir.exists() else []
    return [n for n in names if not (n == "server" and (tunnel_dir / n).stat().st_size == 0)]


class CraftedPeer:
    """An endpoint made by hand, to say exactly what a test needs to another
    endpoint's bell (a connection, a BYE...) and see what that endpoint says back."""

    def __init__(self, tunnel_dir: Path, eid: str = "c0ffee00" * 2) -> None:
        self.tunnel_dir = tunnel_dir
        self.eid = eid
        boot, host = machine_identity(tunnel_dir)
        self.bell = tunneldir.bell_path(tunnel_dir, eid)
        self._write(self.bell, OwnerSlot(eid, os.getpid(), boot, host).encode(), 0, create=True)
        self._slots: Dict[str, "tuple[int, PeerSlot]"] = {}
        self._alive = TABLE.open(self.bell)  # as a live endpoint holds its bell's owner lock
        self._alive.try_hold_alive()

    def connection(self, number: int) -> "tuple[str, Path, Path]":
        """Create the files of our connection `number`: (cid, to server, to client)."""
        cid = f"{self.eid}-{number}"
        to_server, to_client = tunneldir.chunk_paths(self.tunnel_dir, cid)
        for path in (to_server, to_client):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        return cid, to_server, to_client

    def say(self, owner: str, tail: bytes = b"", fresh: bool = False, **fields: object) -> PeerSlot:
        """Change our slot in `owner`'s bell (claimed on first use, or again when
        `fresh`: a new meeting), e.g. conns=1, ring=..., flags=Flag.BYE; `tail` is
        written right after the slot."""
        if owner not in self._slots or fresh:
            self._slots[owner] = (claim_slot(self.tunnel_dir, owner), PeerSlot(self.eid))
        index, slot = self._slots[owner]
        for name, value in fields.items():
            setattr(slot, name, value)
        self._write(tunneldir.bell_path(self.tunnel_dir, owner), slot.encode() + tail, index * SLOT_SIZE)
        return slot

    def heard_from(self, owner: str) -> Optional[PeerSlot]:
        """What `owner` says in its latest slot of our bell (None: nothing yet)."""
        raw = memoryview(self.bell.read_bytes())
        slots = [slot for _, slot in read_peers(raw) if slot is not None and slot.eid == owner]
        return max(slots, key=lambda slot: slot.ping, default=None)

    @staticmethod
    def _write(path: Path, data: bytes, offset: int, create: bool = False) -> None:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)


def server_eid(tunnel_dir: Path) -> str:
    """The endpoint id the server pointer names."""
    return json.loads((tunnel_dir / tunneldir.SERVER_FILE).read_text())["eid"]
