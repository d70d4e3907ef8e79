"""One direction of one connection on disk: the writer's side and the reader's side.

A direction is a stream of records (records.py) in chunk files with one writer
each. The writer appends at the position it keeps (no lock, no size asked of the
file server) and, on a shared filesystem, fsyncs each batch; the reader reads from
its own position (O_DIRECT on a shared filesystem) and never truncates or rewrites
anything. Flow control is the reader's ACK records, sent in the other direction:
the writer keeps at most `window` bytes beyond the last position acknowledged.
A stream longer than `segment_bytes` goes on in a new file (NEXT), and the reader
removes each segment it has finished, so a connection holds at most about two
segments on disk.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional, Tuple

from . import tunneldir
from .coherence import DataPath, ReadBuffer
from .errors import ProtocolError
from .files import TABLE, close_file, open_file, write_at
from .records import HEADER_SIZE, Kind, Problem, Record, StreamDecoder, header

log = logging.getLogger(__name__)

DAMAGE_GRACE = 5.0  # seconds a torn or partial record may take to heal (a write still arriving) before it is damage


class _Segments:
    """What both sides of a direction keep: the segment they are at, and its descriptor."""

    def __init__(self, first: Path, fd: int) -> None:
        self.first = first
        self.fd = fd
        self.segment = 0
        self._segment_start = 0  # stream position of the current segment's first byte
        self.pos = 0  # stream position of the next byte written (read)

    @property
    def path(self) -> Path:
        """The current segment."""
        return tunneldir.segment_path(self.first, self.segment)

    def _move_to_next(self, fd: int) -> None:
        close_file(self.fd, str(self.path))
        self.fd, self.segment, self._segment_start = fd, self.segment + 1, self.pos

    def close(self) -> None:
        """Close the descriptor (the files stay)."""
        if self.fd >= 0:
            close_file(self.fd, str(self.path))
            self.fd = -1


class OutStream(_Segments):
    """The writer's side of one direction."""

    def __init__(self, first: Path, fd: int, data_path: DataPath, segment_bytes: int) -> None:
        super().__init__(first, fd)
        self._sync = data_path.sync
        self._segment_bytes = segment_bytes
        self.seq = 0  # number of the next record
        self.acked = 0  # the reader has read up to here

    def paths(self) -> List[Path]:
        """Every segment this stream may still have on disk."""
        return [tunneldir.segment_path(self.first, n) for n in range(self.segment + 1)]

    def unacked(self) -> int:
        """Bytes written that the reader has not acknowledged."""
        return self.pos - self.acked

    def frame(self, kind: Kind, payload: bytes) -> List[bytes]:
        """The next record, as buffers for `write` (numbered in the order framed)."""
        head = header(kind, payload, self.seq)
        self.seq += 1
        return [head, payload] if payload else [head]

    def write(self, parts: List[bytes]) -> int:
        """Append framed records."""
        written = write_at(self.fd, parts, self.pos - self._segment_start, self._sync)
        self.pos += written
        return written

    def rotate_if_full(self) -> None:
        """Before framing a batch: once this segment is full, create the next one,
        then end this one with NEXT. The reader finds the new file by a name it has
        never looked up, so no cache can hide it."""
        if self.pos - self._segment_start < self._segment_bytes:
            return
        fd = open_file(tunneldir.segment_path(self.first, self.segment + 1), "create")
        try:
            self.pos += write_at(self.fd, self.frame(Kind.NEXT, b""), self.pos - self._segment_start, self._sync)
        except BaseException:
            close_file(fd, str(self.first))
            raise
        self._move_to_next(fd)


class InStream(_Segments):
    """The reader's side of one direction."""

    def __init__(self, first: Path, fd: int, data_path: DataPath) -> None:
        super().__init__(first, fd)
        self._direct = data_path.direct
        self.acked = 0  # the last position we acknowledged to the writer
        self._decoder = StreamDecoder()
        self._damaged_since: Optional[float] = None

    def read(self, buffer: ReadBuffer, limit: int) -> Tuple[List[Record], bool]:
        """The records that arrived, and whether a segment ended among them (then the
        writer should hear our position soon: it may not remove files itself).
        Payloads are views into `buffer`: use them before its next read.

        A record that is not whole and valid may still be arriving: ProtocolError
        only when it has not healed within DAMAGE_GRACE, or at once for a
        record that cannot be a write in progress (wrong number, other version)."""
        view = buffer.read(self.fd, self.pos - self._segment_start, limit)
        records, used, problem = self._decoder.decode(view)
        self.pos += used
        if problem is None and used < len(view):
            problem = Problem(ProtocolError(f"record {self._decoder.seq} incomplete"), fatal=False)
        if problem is None or records:
            self._damaged_since = None
        elif problem.fatal:
            raise problem.error
        elif self._damaged_since is None:
            self._damaged_since = time.monotonic()
        elif time.monotonic() - self._damaged_since > DAMAGE_GRACE:
            raise ProtocolError(f"{problem.error} at position {self.pos} (not healed in {DAMAGE_GRACE:g} s)")
        moved = bool(records) and records[-1].kind is Kind.NEXT
        if moved:
            self._next_segment()
        return records, moved

    def _next_segment(self) -> None:
        """The writer has moved on: remove the finished segment, open the next."""
        finished = self.path
        self._move_to_next(open_file(tunneldir.segment_path(self.first, self.segment + 1), "read", self._direct))
        TABLE.unlink(finished)

    def paths(self) -> List[Path]:
        """The segments the writer may still have on disk: ours, and the next one (a
        writer keeps at most a window beyond our position, less than a segment)."""
        return [self.path, tunneldir.segment_path(self.first, self.segment + 1)]

    @property
    def unsettled(self) -> bool:
        """Whether bytes that are not a whole record yet wait to heal (keep looking)."""
        return self._damaged_since is not None


def read_limit(window: int, chunk: int) -> int:
    """The most one look reads: all a writer may have written beyond our last ACK."""
    return window + 2 * chunk + 64 * HEADER_SIZE
