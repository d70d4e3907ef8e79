"""What a shared directory gives the tunnel, measured, and the coherence mode that follows.

Two processes (two nodes, or one node with `fileforward doctor --peer`) run
`measure_between` on one directory at about the same time; they meet and talk as
fileforward/meeting.py explains (no directory listings, one writer per file, every
wait bounded), then measure together:

- **locks**: the first side takes a lockf lock on a shared file; the second side's
  non-blocking try must fail; after the release it must succeed. A filesystem may
  also refuse locks (ENOLCK, ENOSYS, EOPNOTSUPP);
- **the data path** (coherence.DataPath, as the transport uses it): round trips of
  small messages, each written with pwrite (and fsync, on a shared filesystem) on
  a descriptor kept open, and read by the other side through a descriptor of its
  own (O_DIRECT, aligned, on a shared filesystem), timed on the first side's clock
  (clocks of two nodes are never compared). A filesystem may refuse O_DIRECT
  (EINVAL at open); a write never seen within the answer timeout is a finding;
- **per-operation latency** on each side: open, write+fsync, read (O_DIRECT where
  the transport reads so), lockf, rename, stat.

`local_facts` adds what one side can read alone: the mount (type and options from
/proc/self/mountinfo), the directory's owner and mode, free space. `choose_mode`
turns the findings into the coherence mode the transport picks with
`--coherence auto`, or the one measured reason why no mode can work: data
coherence never depends on locks, so only the data path can rule the tunnel out.
Locks decide between the modes: "locks" where a lock held on one side excludes
the other (a dead peer's freed lock is then proof of its death), "lock-free"
(heartbeats only) where locks are node-local or refused.
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
from .coherence import LOCK_FREE, LOCKS, DataPath, Mount
from .meeting import Channel, KeptOpen, Meeting, NoAnswer, Settings, Stop, identity, meet, poll, try_lock
from .tunneldir import check_safe

REFUSING = {errno.ENOLCK: "ENOLCK", errno.ENOSYS: "ENOSYS", errno.EOPNOTSUPP: "EOPNOTSUPP"}
OPERATIONS = ("open", "write+fsync", "read", "lockf", "rename", "stat")
BLOCK = 4096
PING_POLL_MAX = 0.005
# The causes a Choice names, for the fix.
LOCKS_REFUSED, LOCKS_LOCAL, NOT_VISIBLE, DIRECT_REFUSED = \
    "locks refused", "locks local", "not visible", "O_DIRECT refused"
FIRST, SECOND = "first", "second"  # the two sides' roles in the measurements


@dataclasses.dataclass
class Local:
    """What one side reads about the directory on its own."""

    directory: Path
    data_path: DataPath
    owner_uid: int
    mode: int
    unsafe: Optional[str]  # why the transport would refuse the directory, with the fix; None if fine
    free_bytes: int
    total_bytes: int
    free_inodes: int

    @property
    def mount(self) -> Optional[Mount]:
        """The mount the directory is on, None where unknown."""
        return self.data_path.mount


def local_facts(directory: Path) -> Local:
    """The mount, data path, owner, mode and free space of an existing directory."""
    info = os.stat(directory)
    try:
        check_safe(directory)
        unsafe = None
    except UnsafeTunnelDirError as exc:
        unsafe = str(exc)
    space = os.statvfs(directory)
    return Local(directory=directory, data_path=DataPath.for_directory(directory), owner_uid=info.st_uid,
                 mode=info.st_mode & 0o7777, unsafe=unsafe, free_bytes=space.f_bavail * space.f_frsize,
                 total_bytes=space.f_blocks * space.f_frsize, free_inodes=space.f_favail)


def time_operations(directory: Path, name: str, samples: int, data_path: DataPath) -> Dict[str, Optional[float]]:
    """Median seconds of each of OPERATIONS on a file `name` of our own in `directory`
    (removed after), "read" as the transport reads (`data_path`); None for lockf
    where the filesystem refuses locks, for read where it refuses O_DIRECT."""
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

    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    reader = _kept_open(path, path, data_path)
    try:
        for _ in range(samples):
            fd = timed("open", lambda: os.open(path, os.O_RDWR))
            try:
                timed("write+fsync", lambda: write_and_fsync(fd))
                if reader is not None:
                    timed("read", lambda: reader.read(0))
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
    finally:
        if reader is not None:
            reader.close()
        os.unlink(path)
    return {op: statistics.median(values) if values else None for op, values in times.items()}


def _kept_open(mine: Path, theirs: Path, data_path: DataPath) -> Optional[KeptOpen]:
    """A KeptOpen carrier writing `mine` and reading `theirs`, None if the
    filesystem refuses O_DIRECT."""
    try:
        return KeptOpen(mine, theirs, data_path)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return None


@dataclasses.dataclass
class SideFacts:
    """Who one side is and what it measured alone."""

    host: str
    pid: int
    mount: str                              # str(Mount), or "unknown"
    direct: bool                            # reads with O_DIRECT (and fsyncs its writes): a shared filesystem
    latency: Dict[str, Optional[float]]     # time_operations

    def __str__(self) -> str:
        return f"host {self.host} (pid {self.pid})"

    @property
    def reads(self) -> str:
        """How this side reads the other side's writes, for the report."""
        return "O_DIRECT read" if self.direct else "read"

    @property
    def writes(self) -> str:
        """How this side writes for the other side, for the report."""
        return "pwrite+fsync" if self.direct else "pwrite"


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
    """Round trips over the data path (first side writes, second side answers),
    seconds on the first side's clock, or why they stopped."""

    round_trips: List[float] = dataclasses.field(default_factory=list)
    refused_by: Optional[str] = None        # FIRST or SECOND: the side whose O_DIRECT open was refused (EINVAL)
    unseen_from: Optional[str] = None       # FIRST or SECOND: the side one of whose writes the other never saw
    not_seen_after: Optional[float] = None  # seconds that write stayed invisible before we gave up


@dataclasses.dataclass
class Between:
    """What the two sides measured together."""

    first: bool              # this side created the session and held the lock in the lock test
    this: SideFacts
    peer: SideFacts
    locks: LockResult
    data: Visibility

    @property
    def first_side(self) -> SideFacts:
        """The side that created the session: it held the lock, and wrote first."""
        return self.this if self.first else self.peer

    @property
    def second_side(self) -> SideFacts:
        """The side that joined: it tried the held lock, and answered."""
        return self.peer if self.first else self.this

    def side(self, role: str) -> SideFacts:
        """The side of a role (FIRST or SECOND)."""
        return self.first_side if role == FIRST else self.second_side

    def other(self, role: str) -> SideFacts:
        """The side that does not have `role`."""
        return self.second_side if role == FIRST else self.first_side


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
                                  settings.samples, local.data_path)
        this = SideFacts(host=str(hello["host"]), pid=int(hello["pid"]), direct=local.data_path.direct,
                         latency=latency, mount=str(local.mount) if local.mount else "unknown")
        control.send("facts", **dataclasses.asdict(this))
        peer = _fields(SideFacts, control.receive("facts", timeout))
        locks = _test_locks(meeting, settings, stop)
        data = _data_round_trips(meeting, local.data_path, settings, stop)
        # The first side removes the session on leaving: only once the second has read all.
        if meeting.first:
            control.receive("done", timeout)
        else:
            control.send("done")
    return Between(first=meeting.first, this=this, peer=peer, locks=locks, data=data)


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


def _data_round_trips(meeting: Meeting, data_path: DataPath, settings: Settings, stop: Stop) -> Visibility:
    """settings.samples pings over the data path from the first side, each answered
    by the second side; both return the first side's result. A refused O_DIRECT or
    a write never seen is a finding, not an error: the control channel carries on."""
    control, timeout = meeting.control, settings.answer_timeout
    carrier = _kept_open(*meeting.files("data"), data_path)
    control.send("data open", refused=carrier is None)
    peer_refused = control.receive("data open", timeout)["refused"]
    try:
        if carrier is None or peer_refused:
            first_refused = carrier is None if meeting.first else peer_refused
            return Visibility(refused_by=FIRST if first_refused else SECOND)
        data = Channel(carrier, stop)
        if not meeting.first:
            control.send("pings seen", seen=_answer_pings(data, settings))
            return _fields(Visibility, control.receive("data", timeout))
        result = Visibility()
        for n in range(settings.samples):
            started = time.monotonic()
            data.send("ping", n=n)
            try:
                data.receive("pong", timeout, PING_POLL_MAX)
            except NoAnswer:
                seen = control.receive("pings seen", timeout)["seen"]
                result.unseen_from = FIRST if seen == n else SECOND
                result.not_seen_after = timeout
                break
            result.round_trips.append(time.monotonic() - started)
        else:
            control.receive("pings seen", timeout)
        control.send("data", **dataclasses.asdict(result))
        return result
    finally:
        if carrier is not None:
            carrier.close()


def _answer_pings(data: Channel, settings: Settings) -> int:
    """The second side's part: answer each ping; how many were seen."""
    for n in range(settings.samples):
        try:
            data.receive("ping", settings.answer_timeout, PING_POLL_MAX)
        except NoAnswer:
            return n
        data.send("pong", n=n)
    return settings.samples


def _fields(cls, message: dict):
    """A dataclass from a message's fields (the message kind left out)."""
    return cls(**{f.name: message[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Choice:
    """The coherence mode `--coherence auto` picks, or what rules every mode out."""

    mode: Optional[str]   # LOCKS, LOCK_FREE, or None: the tunnel cannot work there
    measured: str         # what was measured that decided, naming the sides
    cause: Optional[str] = None  # LOCKS_REFUSED, LOCKS_LOCAL (lock-free), NOT_VISIBLE, DIRECT_REFUSED (none)


def choose_mode(findings: Findings) -> Choice:
    """The mode the transport uses in this directory. No mode if the data path
    fails (O_DIRECT refused, or a write never seen by the other side); else
    "locks" when a lock held on one side excludes the other and is free to it
    once released, "lock-free" when locks are node-local or refused."""
    between = findings.between
    data, locks, holder, tester = between.data, between.locks, between.first_side, between.second_side
    if data.refused_by is not None:
        return Choice(None, f"O_DIRECT reads are refused on {between.side(data.refused_by)} (EINVAL at open) on a "
                            f"shared filesystem, where the transport reads with O_DIRECT", DIRECT_REFUSED)
    if data.unseen_from is not None:
        writer, reader = between.side(data.unseen_from), between.other(data.unseen_from)
        return Choice(None, f"a write ({writer.writes}, descriptor kept open) on {writer} never became visible "
                            f"to the {reader.reads} on {reader} (waited {data.not_seen_after:g} s; "
                            f"{len(data.round_trips)} earlier round trips were seen)", NOT_VISIBLE)
    if locks.refused:
        where = holder if locks.holder_refused else tester
        return Choice(LOCK_FREE, f"lockf locks are refused ({locks.refused} on {where})", LOCKS_REFUSED)
    if not locks.excluded:
        return Choice(LOCK_FREE, f"a lockf lock held on {holder} did not exclude {tester} (its try-lock "
                                 f"was granted while the lock was held)", LOCKS_LOCAL)
    if locks.retaken_after is None:
        return Choice(LOCK_FREE, f"after {holder} released its lockf lock, {tester} could not take it "
                                 f"within {locks.retake_waited:g} s", LOCKS_LOCAL)
    return Choice(LOCKS, f"a lockf lock held on {holder} excluded {tester}")
