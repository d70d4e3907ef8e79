"""What a shared directory gives the tunnel, measured, and the coherence mode that follows.

Two processes (two nodes, or one node with `fileforward doctor --peer`) run
`measure_between` on one directory at about the same time; they meet and talk as
fileforward/meeting.py explains (no directory listings, one writer per file, every
wait bounded), then measure together:

- **locks**: the first side takes a lockf lock on a shared file; the second side's
  non-blocking try must fail; after the release it must succeed. A filesystem may
  also refuse locks (ENOLCK, ENOSYS, EOPNOTSUPP);
- **visibility after fsync+close**: round trips of small messages written, fsynced
  and closed by one side, read after a fresh open by the other (close-to-open),
  timed on the first side's clock (clocks of two nodes are never compared);
- **visibility under locks**: the first side writes under an exclusive lock and
  says so over the close-to-open channel; the second side's *first* read under its
  shared lock must see the write (NFS revalidates its cache when a lock is
  granted; the transport's locks mode relies on it). A write seen only later is
  timed until seen. Descriptors stay open, nothing is fsynced. Only measured where
  locks exclude: elsewhere a lock orders nothing;
- **per-operation latency** on each side: open, write+fsync, read, lockf, rename, stat.

`local_facts` adds what one side can read alone: the mount (type and options from
/proc/self/mountinfo), the directory's owner and mode, free space. `choose_mode`
turns the findings into the mode the transport can use, or the one measured
reason why none can. Today there is one mode, "locks": lockf locks for exclusion
and NFS cache coherence, correct only where a lock held on one node excludes the
other node.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .errors import UnsafeTunnelDirError
from .coherence import Mount, mount_of
from .meeting import Channel, Meeting, NoAnswer, Settings, Stop, UnderLock, identity, meet, poll, try_lock
from .tunneldir import check_safe

LOCKS = "locks"
REFUSING = {errno.ENOLCK: "ENOLCK", errno.ENOSYS: "ENOSYS", errno.EOPNOTSUPP: "EOPNOTSUPP"}
OPERATIONS = ("open", "write+fsync", "read", "lockf", "rename", "stat")
BLOCK = 4096
PING_POLL_MAX = 0.005


@dataclasses.dataclass
class Local:
    """What one side reads about the directory on its own."""

    directory: Path
    mount: Optional[Mount]
    owner_uid: int
    mode: int
    unsafe: Optional[str]  # why the transport would refuse the directory, with the fix; None if fine
    free_bytes: int
    total_bytes: int
    free_inodes: int


def local_facts(directory: Path) -> Local:
    """The mount, owner, mode and free space of an existing directory."""
    info = os.stat(directory)
    try:
        check_safe(directory)
        unsafe = None
    except UnsafeTunnelDirError as exc:
        unsafe = str(exc)
    space = os.statvfs(directory)
    return Local(directory=directory, mount=mount_of(directory), owner_uid=info.st_uid,
                 mode=info.st_mode & 0o7777, unsafe=unsafe, free_bytes=space.f_bavail * space.f_frsize,
                 total_bytes=space.f_blocks * space.f_frsize, free_inodes=space.f_favail)


def time_operations(directory: Path, name: str, samples: int) -> Dict[str, Optional[float]]:
    """Median seconds of each of OPERATIONS on a file `name` of our own in `directory`
    (removed after); None for lockf where the filesystem refuses locks."""
    path, renamed = directory / name, directory / (name + ".renamed")
    block = os.urandom(BLOCK)
    times: Dict[str, List[float]] = {op: [] for op in OPERATIONS}

    def timed(op: str, call):
        started = time.perf_counter()
        result = call()
        times[op].append(time.perf_counter() - started)
        return result

    def write_and_fsync(fd: int) -> None:
        os.pwrite(fd, block, 0)
        os.fsync(fd)

    for _ in range(samples):
        fd = timed("open", lambda: os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            timed("write+fsync", lambda: write_and_fsync(fd))
            timed("read", lambda: os.pread(fd, BLOCK, 0))
            try:
                timed("lockf", lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))
                fcntl.lockf(fd, fcntl.LOCK_UN)
            except OSError as exc:
                if exc.errno not in REFUSING:
                    raise
        finally:
            os.close(fd)
        timed("rename", lambda: os.rename(path, renamed))
        os.rename(renamed, path)
        timed("stat", lambda: os.stat(path))
    os.unlink(path)
    return {op: statistics.median(values) if values else None for op, values in times.items()}


@dataclasses.dataclass
class SideFacts:
    """Who one side is and what it measured alone."""

    host: str
    pid: int
    mount: str                              # str(Mount), or "unknown"
    latency: Dict[str, Optional[float]]     # time_operations

    def __str__(self) -> str:
        return f"host {self.host} (pid {self.pid})"


@dataclasses.dataclass
class LockResult:
    """The lock test: the first side holds a lock, the second side tries it."""

    holder_refused: Optional[str] = None    # errno name if the holder's lockf was refused
    tester_refused: Optional[str] = None    # errno name if the tester's lockf was refused
    excluded: Optional[bool] = None         # the tester's try failed while the lock was held
    retaken_after: Optional[float] = None   # seconds until the tester got the lock after its release
    retake_waited: Optional[float] = None   # seconds the tester tried in vain after the release

    @property
    def refused(self) -> Optional[str]:
        """The error with which a side's lockf was refused, if any."""
        return self.holder_refused or self.tester_refused


@dataclasses.dataclass
class Visibility:
    """Round trips of writes between the sides, seconds on the first side's clock."""

    round_trips: List[float] = dataclasses.field(default_factory=list)
    late: Optional[float] = None            # under locks: a write the first read missed, seen this much later
    not_seen_after: Optional[float] = None  # seconds a write stayed invisible before we gave up
    skipped: Optional[str] = None           # why it was not measured

    @property
    def visible(self) -> Optional[bool]:
        """True if every write was seen when expected, False if not, None if not measured."""
        if self.skipped:
            return None
        return self.late is None and self.not_seen_after is None and bool(self.round_trips)


@dataclasses.dataclass
class Between:
    """What the two sides measured together."""

    first: bool              # this side created the session and held the lock in the lock test
    this: SideFacts
    peer: SideFacts
    locks: LockResult
    close_to_open: Visibility
    under_lock: Visibility

    @property
    def first_side(self) -> SideFacts:
        """The side that created the session: it held the lock, and wrote under it."""
        return self.this if self.first else self.peer

    @property
    def second_side(self) -> SideFacts:
        """The side that joined: it tried the held lock, and read under it."""
        return self.peer if self.first else self.this


@dataclasses.dataclass
class Findings:
    """Everything the probe found about one directory, from one side."""

    local: Local
    between: Between


def measure_between(directory: Path, local: Local, settings: Settings = Settings(),
                    stop: Stop = lambda: False) -> Between:
    """Meet the other side in `directory` and measure together (see the module
    docstring). Raises meeting.ProbeError if the exchange cannot be completed."""
    hello = identity()
    with meet(directory, hello, settings, stop) as meeting:
        control, timeout = meeting.control, settings.answer_timeout
        latency = time_operations(meeting.session, "first.ops" if meeting.first else "second.ops",
                                  settings.samples)
        this = SideFacts(host=str(hello["host"]), pid=int(hello["pid"]), latency=latency,
                         mount=str(local.mount) if local.mount else "unknown")
        control.send("facts", **dataclasses.asdict(this))
        peer = _fields(SideFacts, control.receive("facts", timeout))
        locks = _test_locks(meeting, settings, stop)
        close_to_open = _round_trips(control, meeting.first, settings)  # the control channel: it must work
        if locks.refused:
            under_lock = Visibility(skipped="lockf is refused")
        elif locks.excluded and locks.retaken_after is not None:
            under_lock = _under_lock(meeting, settings, stop)
        else:
            under_lock = Visibility(skipped="locks do not exclude, so a lock orders no write before a read")
        if meeting.first:
            control.send("results", close_to_open=dataclasses.asdict(close_to_open),
                         under_lock=dataclasses.asdict(under_lock))
            control.receive("done", timeout)
        else:
            results = control.receive("results", timeout)
            close_to_open = _fields(Visibility, results["close_to_open"])
            under_lock = _fields(Visibility, results["under_lock"])
            control.send("done")
    return Between(first=meeting.first, this=this, peer=peer, locks=locks, close_to_open=close_to_open,
                   under_lock=under_lock)


def _test_locks(meeting: Meeting, settings: Settings, stop: Stop) -> LockResult:
    """Hold (first side) or try (second side) the lock; both return the tester's result."""
    control, timeout = meeting.control, settings.answer_timeout
    fd = os.open(meeting.session / "lock", os.O_RDWR)
    try:
        if meeting.first:
            held, refused = _try(fd)
            control.send("held", refused=refused)
            control.receive("tried", timeout)
            if held:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            control.send("released")
            return _fields(LockResult, control.receive("locks", timeout))
        result = LockResult(holder_refused=control.receive("held", timeout)["refused"])
        granted, result.tester_refused = _try(fd)
        if granted:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        if result.refused is None:
            result.excluded = not granted
        control.send("tried")
        control.receive("released", timeout)
        if result.excluded:
            started = time.monotonic()
            if poll(lambda: try_lock(fd), timeout, stop):
                result.retaken_after = time.monotonic() - started
                fcntl.lockf(fd, fcntl.LOCK_UN)
            else:
                result.retake_waited = timeout
        control.send("locks", **dataclasses.asdict(result))
        return result
    finally:
        os.close(fd)


def _try(fd: int) -> Tuple[bool, Optional[str]]:
    """(granted, errno name if the filesystem refused the lock)."""
    try:
        return bool(try_lock(fd)), None
    except OSError as exc:
        if exc.errno in REFUSING:
            return False, REFUSING[exc.errno]
        raise


def _round_trips(channel: Channel, first: bool, settings: Settings) -> Visibility:
    """settings.samples pings from the first side, each answered by the second side;
    NoAnswer if one does not arrive within the answer timeout."""
    result = Visibility()
    for n in range(settings.samples):
        if first:
            started = time.monotonic()
            channel.send("ping", n=n)
            channel.receive("pong", settings.answer_timeout, PING_POLL_MAX)
            result.round_trips.append(time.monotonic() - started)
        else:
            channel.receive("ping", settings.answer_timeout, PING_POLL_MAX)
            channel.send("pong", n=n)
    return result


def _under_lock(meeting: Meeting, settings: Settings, stop: Stop) -> Visibility:
    """Writes under a lock, announced over the control channel, read under a lock
    (see the module docstring); the first side's result counts. A write that is late
    or never seen is a finding, not an error: the control channel carries on."""
    control, timeout = meeting.control, settings.answer_timeout
    result = Visibility()
    carrier = UnderLock(*meeting.files("locked"), timeout, stop)
    data = Channel(carrier, stop)
    try:
        for n in range(settings.samples):
            if meeting.first:
                started = time.monotonic()
                data.send("token", n=n)
                control.send("written", n=n)
                seen = control.receive("read", timeout)
                result.round_trips.append(time.monotonic() - started)
                if seen["after"] is None:
                    result.not_seen_after = timeout
                elif not seen["at_once"]:
                    result.late = seen["after"]
                if not seen["at_once"]:
                    break  # the mode is ruled out: no need to wait for more
            else:
                control.receive("written", timeout)
                at_once, after = _read_once_then_wait(data, timeout)
                control.send("read", at_once=at_once, after=after)
                if not at_once:
                    break
    finally:
        carrier.close()
    return result


def _read_once_then_wait(data: Channel, timeout: float) -> Tuple[bool, Optional[float]]:
    """(whether one read saw the token, seconds until it was seen or None if never)."""
    started = time.monotonic()
    for attempt_timeout in (0.0, timeout):
        try:
            data.receive("token", attempt_timeout)
            return attempt_timeout == 0.0, time.monotonic() - started
        except NoAnswer:
            continue
    return False, None


def _fields(cls, message: dict):
    """A dataclass from a message's fields (the message kind left out)."""
    return cls(**{f.name: message[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Choice:
    """The coherence mode the findings allow, or what rules every mode out."""

    mode: Optional[str]
    problem: Optional[str] = None   # what was measured, naming both sides; None if a mode was chosen
    cause: Optional[str] = None     # "locks refused", "locks local" or "not visible", for the fix


def choose_mode(findings: Findings) -> Choice:
    """The mode the transport uses in this directory: "locks" when a lock held on one
    side excludes the other and writes become visible both ways; else None, with the
    first problem measured. (Writes visible after fsync+close and a fresh open are
    a precondition of the measurement itself: the two sides talk that way.)"""
    between = findings.between
    locks, holder, tester = between.locks, between.first_side, between.second_side
    if locks.holder_refused or locks.tester_refused:
        where = holder if locks.holder_refused else tester
        return Choice(None, f"lockf locks are refused ({locks.refused} on {where})", "locks refused")
    if not locks.excluded:
        return Choice(None, f"a lockf lock held on {holder} did not exclude {tester} (its try-lock was "
                            f"granted while the lock was held)", "locks local")
    if locks.retaken_after is None:
        return Choice(None, f"after {holder} released its lockf lock, {tester} could not take it within "
                            f"{locks.retake_waited:g} s", "locks local")
    under_lock = between.under_lock
    if under_lock.late is not None:
        return Choice(None, f"a write made under a lockf lock on {holder} was missed by the first read under "
                            f"the lock on {tester} (seen {under_lock.late:.2f} s later): a granted lock does "
                            f"not refresh the cache there", "not visible")
    if not under_lock.visible:
        return Choice(None, f"a write made under a lockf lock on {holder} did not become visible to {tester} "
                            f"under the lock within {under_lock.not_seen_after:g} s", "not visible")
    return Choice(LOCKS)
