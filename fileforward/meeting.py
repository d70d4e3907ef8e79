"""How two probing processes find each other in a tunnel directory, and talk.

Two `fileforward doctor` processes, usually on two nodes, are started at about the
same time on one shared directory D. They must meet without trusting what the
shared filesystem is least reliable at (see the design notes): a directory listing
or a lookup of a name that was missing can lag for tens of seconds on NFS, and a
lock may not exclude the other node (that is what is being measured). So:

1. **Who is first** is decided by an exclusive create of the meeting file
   ``D/doctor.meet`` (O_CREAT|O_EXCL is decided by the file server, on NFSv3 and
   v4 alike). The winner ("first side") creates the session directory
   ``D/doctor-<random id>/`` (0700) and, inside it, every file both sides will use,
   empty; only then does it write one JSON line into the meeting file: the
   protocol version, the session id, its host and pid.
2. **The second side** got EEXIST. It opens the meeting file with O_CREAT but not
   O_EXCL: that open, too, is resolved by the server, even where this node still
   has the name cached as missing. It reads the session id (an empty file means
   "not written yet": it reads again), and from then on looks up only names it
   has never looked up before (``doctor-<id>/...``, created before the id was
   published), so no negative cache can hide them. It claims the session with an
   exclusive create of ``second.claim`` (a third doctor waits until the pair has
   started, then meets afresh) and says hello.
3. **Messages** are JSON lines appended to a file with one writer each
   (``first.say``, ``second.say``): the writer opens, writes, fsyncs and closes;
   the reader opens afresh and reads past what it has consumed, polling with a
   short backoff. This is NFS close-to-open consistency, the weakest promise a
   shared filesystem makes, so the control channel works before anything is known
   about locks or O_DIRECT. The same channel can run over the transport's own
   data path instead (`KeptOpen`: descriptors kept open, fsynced writes, O_DIRECT
   reads on a shared filesystem) to measure that path.
4. **Stale files.** After a hello, the first side removes the meeting file, so
   the next pair starts afresh. A meeting file left by a killed doctor is found
   out by its silence: no session directory, no content, no answer to the hello
   within the answer timeout, or a claimed session that no first side takes up
   within it. The side that finds out removes the meeting file and that session's
   directory, and tries again.
5. **The end.** The first side removes the session directory when the exchange
   is over, or when it is interrupted (it tells the other side first, and so
   does an interrupted second side). Every wait is bounded: the meeting by
   `Settings.wait`, each answer by `Settings.answer_timeout`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, TypeVar, Union

from .coherence import DataPath, ReadBuffer
from .files import close_file, open_file, pread_all, pwrite_all, write_at

log = logging.getLogger(__name__)

PROTOCOL = 2  # 2: the data path round trips (first.data, second.data) replace the measure under locks
MEET_FILE = "doctor.meet"
SESSION_PREFIX = "doctor-"
CLAIM_FILE = "second.claim"
POLL_MIN = 0.0005
POLL_MAX = 0.02
STILL_WAITING_EVERY = 10.0
DIRECT_READ_SIZE = 16384
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long the two sides wait for each other (seconds) and how much they measure."""

    wait: float = 60.0            # for the other side to start
    answer_timeout: float = 10.0  # for each answer once both run
    samples: int = 5              # per measured operation


class ProbeError(Exception):
    """The two sides could not complete the exchange; the message says why and what to do."""


class NoAnswer(ProbeError):
    """The other side did not answer in time."""


class Interrupted(ProbeError):
    """The user asked to stop."""


Stop = Callable[[], bool]


def poll(check: Callable[[], Optional[T]], timeout: float, stop: Stop, poll_max: float = POLL_MAX) -> Optional[T]:
    """Call `check` until it returns something other than None (returned), or until
    `timeout` seconds passed (None). The interval grows from POLL_MIN to `poll_max`."""
    deadline = time.monotonic() + timeout
    delay = POLL_MIN
    while True:
        if stop():
            raise Interrupted("interrupted")
        result = check()
        if result is not None or time.monotonic() >= deadline:
            return result
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, poll_max)


class CloseToOpen:
    """Bytes carried by close-to-open consistency: write, fsync, close; read after a fresh open."""

    def __init__(self, mine: Path, theirs: Path) -> None:
        self.mine, self.theirs = mine, theirs

    def write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.mine, os.O_WRONLY)
        try:
            pwrite_all(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, offset: int) -> bytes:
        fd = os.open(self.theirs, os.O_RDONLY)
        try:
            return pread_all(fd, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing is kept open."""


class KeptOpen:
    """Bytes carried as the transport carries them, with its own calls (files.py,
    coherence.py): descriptors kept open, no lock, no reopen; each write a pwrite,
    fsynced on a shared filesystem; each read through an aligned buffer, O_DIRECT
    there. OSError EINVAL if the filesystem refuses O_DIRECT."""

    def __init__(self, mine: Path, theirs: Path, path: DataPath) -> None:
        self._sync = path.sync
        self._mine = open_file(mine, "write")
        try:
            self._theirs = open_file(theirs, "read", path.direct)
        except OSError:
            close_file(self._mine, str(mine))
            raise
        self._buffer = ReadBuffer(DIRECT_READ_SIZE)

    def write(self, offset: int, data: bytes) -> None:
        write_at(self._mine, [data], offset, self._sync)

    def read(self, offset: int) -> bytes:
        """What the other side wrote from `offset`, up to DIRECT_READ_SIZE bytes (the
        channel reads on)."""
        return bytes(self._buffer.read(self._theirs, offset, DIRECT_READ_SIZE))

    def close(self) -> None:
        close_file(self._mine, "the doctor's data file")
        close_file(self._theirs, "the other side's data file")
        self._buffer.close()


def try_lock(fd: int) -> Optional[bool]:
    """A non-blocking exclusive lockf on the whole file: True if granted, None if
    another holds it; OSError if the filesystem refuses locks (ENOLCK, ENOSYS,
    EOPNOTSUPP)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise


class Channel:
    """JSON-line messages in strict turn: each side appends to its own file and reads
    the other's through a carrier (CloseToOpen or KeptOpen)."""

    def __init__(self, carrier: Union[CloseToOpen, KeptOpen], stop: Stop) -> None:
        self.carrier = carrier
        self._stop = stop
        self._written = 0
        self._read = 0
        self._partial = b""
        self._inbox: List[dict] = []

    def send(self, kind: str, **fields: object) -> None:
        """Append one message (visible to the other side when send returns)."""
        line = _encode({"kind": kind, **fields})
        self.carrier.write(self._written, line)
        self._written += len(line)

    def receive(self, kind: str, timeout: float, poll_max: float = POLL_MAX) -> dict:
        """The next message, which must be of `kind`; NoAnswer after `timeout` seconds,
        ProbeError if the other side aborted, left, or said something else."""
        message = poll(self._next, timeout, self._stop, poll_max)
        if message is None:
            raise NoAnswer(f"no {kind!r} from the other side within {timeout:g} s")
        if message["kind"] == "abort":
            raise ProbeError(f"the other side stopped: {message.get('reason', '?')}")
        if message["kind"] != kind:
            raise ProbeError(f"the other side said {message['kind']!r} where {kind!r} was expected")
        return message

    def _next(self) -> Optional[dict]:
        if not self._inbox:
            try:
                data = self.carrier.read(self._read)
            except FileNotFoundError:
                raise ProbeError("the other side's files are gone (it stopped and cleaned up)") from None
            self._read += len(data)
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            try:
                self._inbox = [json.loads(line) for line in lines if line]
            except ValueError:
                raise ProbeError("unreadable message from the other side") from None
        return self._inbox.pop(0) if self._inbox else None


@dataclasses.dataclass
class Meeting:
    """Two sides that found each other: which one this is, where they work, how they talk."""

    first: bool
    session: Path
    control: Channel

    def files(self, name: str) -> "tuple[Path, Path]":
        """(this side's, the other side's) file of a pair made by the first side."""
        mine, theirs = ("first", "second") if self.first else ("second", "first")
        return self.session / f"{mine}.{name}", self.session / f"{theirs}.{name}"


PAIRED_FILES = ("say", "data")  # first.say, second.say, first.data, second.data
SHARED_FILES = ("lock",)


def identity() -> Dict[str, object]:
    """What each side says about itself first."""
    return {"protocol": PROTOCOL, "host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def meet(tunnel_dir: Path, hello: Dict[str, object], settings: Settings, stop: Stop) -> Iterator[Meeting]:
    """Find the other side in `tunnel_dir` (see the module docstring) and yield the
    meeting; clean up on the way out, also when interrupted. `hello` (identity())
    is what this side says about itself. Raises NoAnswer if nobody came within
    settings.wait seconds."""
    deadline = time.monotonic() + settings.wait
    busy: Dict[str, float] = {}
    meeting = None
    while meeting is None:
        if time.monotonic() >= deadline:
            raise _nobody_came(tunnel_dir, settings)
        meeting = _as_first(tunnel_dir, hello, deadline, settings, stop)
        if meeting is None:
            meeting = _as_second(tunnel_dir, hello, settings, stop, busy)
        if meeting is None:
            poll(lambda: None, 0.05, stop)  # a pause that a stop request ends
    try:
        yield meeting
    except BaseException as exc:
        _say_abort(meeting.control, exc)
        raise
    finally:
        if meeting.first:
            _remove_session(meeting.session)


def _as_first(tunnel_dir: Path, hello: Dict[str, object], deadline: float, settings: Settings,
              stop: Stop) -> Optional[Meeting]:
    """Create the meeting file and wait for a hello; None if another side created it first."""
    meet_path = tunnel_dir / MEET_FILE
    try:
        fd = os.open(meet_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    session = tunnel_dir / (SESSION_PREFIX + secrets.token_hex(8))
    try:
        try:
            session.mkdir(mode=0o700)
            for name in [f"{side}.{kind}" for kind in PAIRED_FILES for side in ("first", "second")] + \
                    list(SHARED_FILES):
                os.close(os.open(session / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            pwrite_all(fd, _encode({**hello, "session": session.name}), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("waiting up to %.0f s for the other side: `fileforward doctor --tunnel-dir %s` on the other "
                 "node", deadline - time.monotonic(), tunnel_dir)
        control = Channel(CloseToOpen(session / "first.say", session / "second.say"), stop)
        peer = _wait_for_hello(control, tunnel_dir, deadline, settings)
    except BaseException:
        _remove_session(session)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meet_path)
    log.info("the other side arrived: host %s, pid %s", peer.get("host"), peer.get("pid"))
    control.send("welcome", **hello)
    return Meeting(first=True, session=session, control=control)


def _wait_for_hello(control: Channel, tunnel_dir: Path, deadline: float, settings: Settings) -> dict:
    while True:
        try:
            return control.receive("hello", min(STILL_WAITING_EVERY, max(deadline - time.monotonic(), 0.0)),
                                   poll_max=0.1)
        except NoAnswer:
            if time.monotonic() >= deadline:
                raise _nobody_came(tunnel_dir, settings) from None
            log.info("still waiting for the other side in %s (%.0f s left)", tunnel_dir,
                     deadline - time.monotonic())


def _as_second(tunnel_dir: Path, hello: Dict[str, object], settings: Settings, stop: Stop,
               busy: Dict[str, float]) -> Optional[Meeting]:
    """Join the session the meeting file names; None to try again (not written yet,
    stale, or taken by another pair: `busy` has when we first saw each such session)."""
    meet_path = tunnel_dir / MEET_FILE
    content = _read_meeting_file(meet_path, settings, stop)
    if content is None:
        return None
    if content.get("protocol") != PROTOCOL:
        raise ProbeError(f"the doctor waiting in {tunnel_dir} (host {content.get('host')}, pid "
                         f"{content.get('pid')}) speaks protocol {content.get('protocol')}, this one "
                         f"{PROTOCOL}: run the same fileforward version on both sides")
    session = tunnel_dir / str(content["session"])
    who = f"host {content.get('host')}, pid {content.get('pid')}"
    try:
        os.close(os.open(session / CLAIM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileNotFoundError:
        log.warning("removing %s: left by a doctor that is gone (%s); its session %s does not exist",
                    meet_path, who, session.name)
        _remove_meeting_file(meet_path, content)
        return None
    except FileExistsError:
        return _wait_for_other_pair(meet_path, content, who, settings, busy)
    control = Channel(CloseToOpen(session / "second.say", session / "first.say"), stop)
    control.send("hello", **hello)
    log.info("found the other side waiting in %s: %s", tunnel_dir, who)
    try:
        control.receive("welcome", settings.answer_timeout)
    except NoAnswer:
        log.warning("the doctor that created %s (%s) did not answer within %g s: removing its files",
                    meet_path, who, settings.answer_timeout)
        _remove_meeting_file(meet_path, content)
        _remove_session(session)
        return None
    except BaseException as exc:
        _say_abort(control, exc)
        raise
    return Meeting(first=False, session=session, control=control)


def _wait_for_other_pair(meet_path: Path, content: dict, who: str, settings: Settings,
                         busy: Dict[str, float]) -> None:
    """Another doctor claimed the session: its first side removes the meeting file on
    the hello, and we then meet as a new pair. A meeting file that outlives the answer
    timeout was left by two interrupted doctors: removed, with their session."""
    session = str(content["session"])
    if session not in busy:
        busy[session] = time.monotonic()
        log.info("another doctor is measuring %s with the one on %s; waiting for it to start",
                 meet_path.parent, who)
    if time.monotonic() - busy[session] < settings.answer_timeout:
        return None
    log.warning("removing %s and its session: claimed by another doctor, but not taken up within %g s "
                "(left by interrupted doctors; the first was on %s)", meet_path, settings.answer_timeout, who)
    _remove_meeting_file(meet_path, content)
    _remove_session(meet_path.parent / session)
    return None


def _read_meeting_file(meet_path: Path, settings: Settings, stop: Stop) -> Optional[dict]:
    """The first side's line, waiting up to the answer timeout for it to be written;
    None (after removing the file) if it stays incomplete, or if the file is gone."""
    def content() -> Optional[dict]:
        # O_CREAT without O_EXCL: the server resolves the name, whatever this node cached.
        fd = os.open(meet_path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            data = pread_all(fd, 0)
        finally:
            os.close(fd)
        line, newline, _ = data.partition(b"\n")
        if not newline:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise ProbeError(f"{meet_path} is not a doctor's meeting file; remove it") from None

    found = poll(content, settings.answer_timeout, stop)
    if found is None:
        log.warning("removing %s: it stayed incomplete for %g s (left by an interrupted doctor)",
                    meet_path, settings.answer_timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(meet_path)
    return found


def _remove_meeting_file(meet_path: Path, expected: dict) -> None:
    """Remove the meeting file if it still names the session we gave up on."""
    try:
        with open(meet_path, "rb") as f:
            if json.loads(f.readline() or b"null") == expected:
                os.unlink(meet_path)
    except (FileNotFoundError, ValueError):
        pass


def _remove_session(session: Path) -> None:
    def report(function, path, exc_info) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            log.warning("could not remove %s: %s", path, exc_info[1])

    shutil.rmtree(session, onerror=report)


def _say_abort(control: Channel, exc: BaseException) -> None:
    """Tell the other side why this side stops (best effort: the files may be gone)."""
    with contextlib.suppress(OSError):
        control.send("abort", reason=str(exc) or type(exc).__name__)


def _nobody_came(tunnel_dir: Path, settings: Settings) -> NoAnswer:
    return NoAnswer(f"no other `fileforward doctor` came to {tunnel_dir} within {settings.wait:g} s: start one "
                    f"on the other node at the same time (or use --peer); if one was running, writes made "
                    f"on one node never became visible on the other")


def _encode(fields: Dict[str, object]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"
