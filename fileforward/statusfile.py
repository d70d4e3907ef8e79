"""What a running `serve` or requesting process publishes for `fileforward status`.

Each process keeps one small file, ``status-<host>-<pid>.json`` (mode 0600), in its
tunnel directory: its role, pid, host, start time, a sequence number that grows
with every write, and every forward's connections, bytes and rate. The transport
ignores these names (tunneldir.owner_of); the process removes its file at exit,
and `fileforward status` judges what a crashed one left (fileforward/status.py).

Cost: the counters are sampled on the event loop once per SAMPLE_INTERVAL (memory
only); the file is rewritten, by a thread of its own, only when a sample differs
from the last one written, or after HEARTBEAT seconds without a write, so that
readers on other nodes can see the sequence number move (one write per HEARTBEAT
when idle). A write replaces the file atomically (temporary file, then rename),
so a reader never sees half of one. A write that has not returned after
HUNG_WARNING seconds is logged: the filesystem stopped answering.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

from .forwarding import ForwardCounters
from .loops import call_soon_if_open

log = logging.getLogger("fileforward")

PREFIX = "status-"
SUFFIX = ".json"
FORMAT = 1
SAMPLE_INTERVAL = 1.0   # seconds between samples of the counters (and at least between writes)
HEARTBEAT = 10.0        # seconds: the longest time without a write, so that liveness can be judged
HUNG_WARNING = 30.0     # seconds a write may take before it is logged as a hung filesystem
CLOSE_TIMEOUT = 5.0     # seconds the removal at exit may take


def file_name(host: str, pid: int) -> str:
    """The status file of process `pid` on `host`."""
    return f"{PREFIX}{host}-{pid}{SUFFIX}"


def temporary_name(name: str) -> str:
    """Where the status file `name` is written before it replaces the old one."""
    return f".{name}.tmp"


def is_status_file(name: str) -> bool:
    """Whether a tunnel directory entry is a (complete) status file."""
    return name.startswith(PREFIX) and name.endswith(SUFFIX)


def forward_sample(name: str, counters: ForwardCounters) -> Dict[str, Any]:
    """One forward's numbers, as published (rates are added by the Publisher)."""
    return {"name": name, "open": counters.open, "connections": counters.connections, "failed": counters.failed,
            "to_destination": counters.to_destination, "from_destination": counters.from_destination}


class Publisher:
    """Publishes one process's status file while `run()` runs; removes it at the end."""

    def __init__(self, tunnel_dir: Path, role: str, counters: Dict[str, ForwardCounters]) -> None:
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.path = tunnel_dir / file_name(self.host, self.pid)
        self._temporary = tunnel_dir / temporary_name(self.path.name)
        self._role = role
        self._counters = counters  # live: forwards come and go (-R on the serve side)
        self._started = time.time()
        self._seq = 0
        self._last_error = ""
        self._thread = _DaemonThread("fileforward-status")

    async def run(self) -> None:
        """Sample every SAMPLE_INTERVAL; write what changed (or the heartbeat) off the
        event loop, one write at a time; never returns (cancel it)."""
        written: Optional[List[Dict[str, Any]]] = None
        last_write = float("-inf")
        previous: Dict[str, Dict[str, Any]] = {}
        previous_at = time.monotonic()
        writing: Optional[asyncio.Future] = None
        writing_since = 0.0
        warned = False
        while True:
            now = time.monotonic()
            forwards = [forward_sample(name, counters) for name, counters in list(self._counters.items())]
            elapsed = max(now - previous_at, 1e-3)
            for forward in forwards:
                before = previous.get(forward["name"], forward)
                forward["rate_to"] = round((forward["to_destination"] - before["to_destination"]) / elapsed)
                forward["rate_from"] = round((forward["from_destination"] - before["from_destination"]) / elapsed)
            previous, previous_at = {f["name"]: f for f in forwards}, now
            if writing is not None and writing.done():
                self._report(writing)
                writing, warned = None, False
            if writing is None and (forwards != written or now - last_write >= HEARTBEAT):
                self._seq += 1
                writing, writing_since = self._thread.run(self._write, self._record(forwards)), now
                written, last_write = forwards, now
            elif writing is not None and not warned and now - writing_since > HUNG_WARNING:
                log.warning("status file %s: a write has not returned for %.0f s; the filesystem of the tunnel "
                            "directory may have stopped answering", self.path, now - writing_since)
                warned = True
            await asyncio.sleep(SAMPLE_INTERVAL)

    def _record(self, forwards: List[Dict[str, Any]]) -> Dict[str, Any]:
        return {"format": FORMAT, "role": self._role, "host": self.host, "pid": self.pid, "seq": self._seq,
                "started": self._started, "written": time.time(), "forwards": forwards}

    def _write(self, record: Dict[str, Any]) -> None:
        """Replace the file atomically; never follows a symlink planted in the directory."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary)  # left by a crash of an earlier process with our pid
        fd = os.open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(record, out, separators=(",", ":"))
        os.replace(self._temporary, self.path)

    def _report(self, write: "asyncio.Future[None]") -> None:
        """A failed write is logged, once per distinct error (the next change or
        heartbeat tries again)."""
        error = write.exception()
        why = "" if error is None else str(error)
        if why and why != self._last_error:
            log.warning("cannot write status file %s (fileforward status will not show this process): %s",
                        self.path, why)
        self._last_error = why

    def _remove(self) -> None:
        for path in (self.path, self._temporary):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def close(self) -> None:
        """Remove the file (after the write in progress, on the same thread); a
        filesystem that does not answer within CLOSE_TIMEOUT does not keep the
        process from exiting (the file is left for `status` to judge)."""
        try:
            await asyncio.wait_for(self._thread.run(self._remove), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("status file %s: not removed, the filesystem did not answer within %g s",
                        self.path, CLOSE_TIMEOUT)
        except OSError as exc:
            log.warning("cannot remove status file %s: %s", self.path, exc.strerror or exc)
        finally:
            self._thread.stop()


class _DaemonThread:
    """Runs filesystem calls one at a time, off the event loop, on a daemon thread:
    a call stuck on a hung mount never keeps the process from exiting (an executor's
    threads are joined at exit)."""

    def __init__(self, name: str) -> None:
        self._calls: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def run(self, function: Callable[..., None], *args: Any) -> "asyncio.Future[None]":
        """`function(*args)` on the thread, after the calls before it; its outcome as a future of the loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, function, args))
        return future

    def stop(self) -> None:
        """The thread ends after the calls already asked for."""
        self._calls.put(None)

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            loop, future, function, args = call
            error: Optional[BaseException] = None
            try:
                function(*args)
            except Exception as exc:  # handed to the loop, which logs it
                error = exc
            call_soon_if_open(loop, _settle, future, error)


def _settle(future: "asyncio.Future[None]", error: Optional[BaseException]) -> None:
    if future.done():  # cancelled (a close that timed out)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


@contextlib.asynccontextmanager
async def publishing(tunnel_dir: Path, role: str, counters: Dict[str, ForwardCounters]) -> AsyncIterator[Publisher]:
    """Publish this process's status file while the context is open."""
    publisher = Publisher(tunnel_dir, role, counters)
    task = asyncio.ensure_future(publisher.run())
    try:
        yield publisher
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await publisher.close()
