"""`fileforward status`: what runs on a tunnel directory, from what its processes publish.

It lists the directory for the status files of `serve` and of the requesting
processes (fileforward/statusfile.py). A listing is fine here, as nothing waits
on this command; but on NFS a file created on another node a moment ago may show
up late (and one just removed may linger), for up to the attribute cache's time.

Is a process alive? Clocks differ between nodes, so a publisher's timestamps are
compared with ours only for a process of this host (same clock), where its pid
settles it too: a pid that no longer runs here is a crash, whose file is removed.
A process of another host is judged by its sequence number, which it bumps at
least every statusfile.HEARTBEAT seconds: this command reads the file again
until the number moves (a sign of life, timed on our clock) or `wait` seconds
pass (then it is reported stale, and left in place: its node may only be slow).
The file's mtime is not used: on NFS it is set by the server and cached for seconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import statusfile

log = logging.getLogger("fileforward")

MAX_SIZE = 1 << 20          # a status file larger than this is not one of ours
REREAD_INTERVAL = 0.5       # seconds between reads while waiting for a sign of life
DEFAULT_WAIT = statusfile.HEARTBEAT + 3.0
PID_REUSE_SLACK = 2.0       # seconds: /proc's start time is rounded to the boot time's whole second

ALIVE, DEAD, STALE, UNKNOWN = "alive", "dead", "stale", "unknown"


@dataclasses.dataclass
class Process:
    """One published process, and what this reader made of it."""

    name: str
    record: Dict[str, Any]
    state: str = UNKNOWN
    last_sign_of_life: Optional[float] = None  # seconds before the report, on our clock
    how: str = ""

    @property
    def running(self) -> bool:
        """Alive, or not judged yet (another host's, with no time to watch it)."""
        return self.state in (ALIVE, UNKNOWN)

    def as_json(self) -> Dict[str, Any]:
        """The record as published, with the judgement."""
        return {**{k: self.record.get(k) for k in ("role", "pid", "host", "started", "written", "seq", "forwards")},
                "state": self.state, "last_sign_of_life_s": self.last_sign_of_life, "judged_by": self.how}


def read(tunnel_dir: Path, name: str) -> Optional[Dict[str, Any]]:
    """A status file's record; None if it is gone, or not a status file (logged)."""
    try:
        fd = os.open(tunnel_dir / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("status: cannot read %s: %s", tunnel_dir / name, exc.strerror or exc)
        return None
    with os.fdopen(fd, "rb") as source:
        data = source.read(MAX_SIZE + 1)
    try:
        record = json.loads(data) if len(data) <= MAX_SIZE else None
        if not (isinstance(record, dict) and isinstance(record.get("pid"), int) and isinstance(record.get("seq"), int)
                and isinstance(record.get("host"), str) and isinstance(record.get("forwards"), list)):
            raise ValueError("not a status record")
    except ValueError as exc:
        log.warning("status: ignoring %s: %s", tunnel_dir / name, exc)
        return None
    return record


def collect(tunnel_dir: Path, wait: float, stopped: Callable[[], bool]) -> List[Process]:
    """Every process that published a status file in `tunnel_dir`, judged (see the
    module's docstring); this host's crashed processes' files are removed. Watching
    ends early once `stopped()` (Ctrl-C)."""
    this_host = socket.gethostname()
    try:
        names = sorted(n for n in os.listdir(tunnel_dir) if statusfile.is_status_file(n))
    except FileNotFoundError:
        return []
    processes = [Process(name, record) for name in names for record in [read(tunnel_dir, name)] if record]
    remote: List[Process] = []
    for process in processes:
        if process.record["host"] == this_host:
            _judge_local(tunnel_dir, process)
        else:
            remote.append(process)
    _watch_remote(tunnel_dir, remote, wait, stopped)
    return processes


def _judge_local(tunnel_dir: Path, process: Process) -> None:
    pid = process.record["pid"]
    if not _pid_runs(pid, process.record.get("started")):
        process.state, process.how = DEAD, f"pid {pid} does not run on this host; its status file was removed"
        try:
            for name in (process.name, statusfile.temporary_name(process.name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tunnel_dir / name)
        except OSError as exc:
            process.how = f"pid {pid} does not run on this host (cannot remove its status file: {exc.strerror})"
        return
    written = process.record.get("written")
    process.state, process.how = ALIVE, f"pid {pid} runs on this host"
    if isinstance(written, (int, float)):  # this host's clock: comparable with ours
        process.last_sign_of_life = max(0.0, time.time() - written)


def _watch_remote(tunnel_dir: Path, processes: List[Process], wait: float, stopped: Callable[[], bool]) -> None:
    """Read other hosts' files again until each one's sequence number moved, or `wait` passed."""
    started = time.monotonic()
    waiting = {p.name: p for p in processes}
    seen: Dict[str, float] = {}  # our monotonic clock when each one's number moved
    while waiting and time.monotonic() - started < wait and not stopped():
        time.sleep(min(REREAD_INTERVAL, max(0.0, wait - (time.monotonic() - started))))
        for name, process in list(waiting.items()):
            record = read(tunnel_dir, name)
            if record is None:
                process.state, process.how = DEAD, "its status file went away (it stopped)"
            elif record["seq"] != process.record["seq"]:
                process.record, process.state = record, ALIVE
                process.how = "its status file changed while watched"
                seen[name] = time.monotonic()
            else:
                continue
            del waiting[name]
    now = time.monotonic()
    for name, at in seen.items():
        next(p for p in processes if p.name == name).last_sign_of_life = now - at
    for process in waiting.values():
        if stopped():
            process.how = "on another host, not watched to the end (interrupted)"
        elif wait > 0:
            process.state = STALE
            process.how = (f"its status file did not change in the {wait:g} s watched (it is rewritten at least "
                           f"every {statusfile.HEARTBEAT:g} s): crashed, or its node or filesystem is stuck")
        else:
            process.how = "on another host, not watched (--wait 0)"


def _pid_runs(pid: int, started: Any) -> bool:
    """Whether process `pid` of this host runs and is the one that published: a
    zombie does not run, and a pid reused by a process started after the
    publisher's own start time (Linux: /proc) is another process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return True  # no /proc: the pid's existence is all we know
    if fields[0] == "Z":
        return False
    began = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return not isinstance(started, (int, float)) or began <= started + PID_REUSE_SLACK


def as_json(tunnel_dir: Path, processes: List[Process]) -> str:
    """The report for scripts."""
    return json.dumps({"tunnel_dir": str(tunnel_dir), "running": sum(p.running for p in processes),
                       "processes": [p.as_json() for p in processes]}, indent=2)


def as_table(tunnel_dir: Path, processes: List[Process]) -> str:
    """The report for people: one line per process, its forwards under it."""
    if not processes:
        return f"tunnel {tunnel_dir}: nothing publishes a status here (no serve or requesting process runs)"
    rows = [["ROLE", "PID", "HOST", "UP SINCE (its clock)", "STATE", "LAST SIGN OF LIFE"]]
    for p in processes:
        rows.append([str(p.record.get("role")), str(p.record["pid"]), p.record["host"], _when(p.record.get("started")),
                     p.state, "-" if p.last_sign_of_life is None else f"{p.last_sign_of_life:.1f} s ago"])
    lines = [f"tunnel {tunnel_dir}"] + _columns(rows)
    for p in processes:
        lines += ["", f"{p.record.get('role')} pid {p.record['pid']} on {p.record['host']}: {p.state}, {p.how}"]
        if not p.record["forwards"]:
            continue
        forwards = [["  FORWARD", "OPEN", "CONNS", "FAILED", "SENT", "RECEIVED", "RATE OUT", "RATE IN"]]
        for f in p.record["forwards"]:
            forwards.append([f"  {f.get('name')}", str(f.get("open")), str(f.get("connections")), str(f.get("failed")),
                             _bytes(f.get("to_destination")), _bytes(f.get("from_destination")),
                             _bytes(f.get("rate_to")) + "/s", _bytes(f.get("rate_from")) + "/s"])
        lines += _columns(forwards)
    return "\n".join(lines)


def _columns(rows: List[List[str]]) -> List[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _when(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def _bytes(count: Any) -> str:
    if not isinstance(count, (int, float)):
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
