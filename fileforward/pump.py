"""Splicing two connections (a TCP socket and a tunnel connection) at the protocol level.

Callers first speak with streams (a proxy's header, a request line), then hand both
stream pairs to `splice`: it swaps each transport's protocol for a `_Side`, passes
on what the StreamReaders had buffered, and from then on each side's
`data_received` writes straight to the other side's transport (no task, no
StreamReader copy, no drain per message). Flow control is the transports' own: a
destination that calls `pause_writing()` pauses reading on its source until it
calls `resume_writing()`, so a slow reader never makes the forwarder buffer more
than the destination's high-water mark.

A splice ends the way TCP would tell it: when both directions reached EOF, both
sides are closed (FIN on a socket, CLOSE on a tunnel connection); half-close works
both ways (an EOF is passed on at once, the other direction goes on). Any other end
(an error or a reset on either side, a damaged record, a lost peer, cancellation)
resets both (RST on a socket, RESET on a tunnel connection). A broken tunnel must
never look like a finished download to the program at the other end of a socket.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import struct
import time
from typing import Optional, Tuple

from .transport import FileTransport

log = logging.getLogger(__name__)

Streams = Tuple[asyncio.StreamReader, asyncio.StreamWriter]
_LINGER_ZERO = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN
CLOSE_TIMEOUT = 2.0  # how long a splice waits for its transports to report closed


@dataclasses.dataclass
class Spliced:
    """What a splice moved and how it ended, for the caller's per-connection log line."""

    forward: int = 0    # bytes from the first stream pair to the second (counted as they go)
    backward: int = 0   # bytes from the second to the first
    seconds: float = 0.0
    error: Optional[BaseException] = None  # why it was reset; None while open or after a clean end

    def describe(self) -> str:
        """How it ended, in words."""
        if self.error is None:
            return "closed"
        if isinstance(self.error, asyncio.CancelledError):
            return "reset (shutting down)"
        return f"reset ({type(self.error).__name__}: {self.error})"


def reset(writer: asyncio.StreamWriter, reason: str = "") -> None:
    """End a connection abnormally (see reset_transport)."""
    reset_transport(writer.transport, reason)


def reset_transport(transport: asyncio.BaseTransport, reason: str = "") -> None:
    """End a connection abnormally: RST on a TCP socket, RESET on a tunnel connection
    (carrying `reason` to the other side's application and log).

    asyncio's abort() alone closes a socket with FIN when no unread input is queued,
    which the peer cannot tell from a complete transfer.
    """
    if isinstance(transport, FileTransport):
        transport.reset(reason)
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    transport.abort()


class _Side(asyncio.Protocol):
    """One connection of a splice: what it reads goes to the other side's transport."""

    def __init__(self, splice: "_Splice", transport: asyncio.Transport, forward: bool) -> None:
        self.splice = splice
        self.transport = transport
        self.forward = forward         # its bytes count as Spliced.forward
        self.peer: "_Side" = self
        self.eof = False               # its input ended
        self.lost = False              # its transport is gone: it takes no more bytes
        self.holding_back = False      # it asked for a pause: its peer's reading is paused
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.splice.carry(self, data)

    def eof_received(self) -> bool:
        self.splice.ended(self)
        return True  # keep the socket open: the other direction may go on

    def pause_writing(self) -> None:
        self.holding_back = True
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.holding_back = False
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost = True
        if not self.closed.done():
            self.closed.set_result(None)
        self.splice.lost(self, exc)


class _Splice:
    """Both sides of one splice, and how it ends (`done`)."""

    def __init__(self, stats: Spliced) -> None:
        self.stats = stats
        self.done = asyncio.get_running_loop().create_future()
        self.sides: "list[_Side]" = []

    def take_over(self, streams: Streams, forward: bool) -> Tuple[_Side, bytes, bool]:
        """Drive this connection's transport from now on. Returns its side, the bytes
        its StreamReader held, and whether that reader had seen EOF: the caller
        passes both on, in that order."""
        reader, writer = streams
        transport = writer.transport
        side = _Side(self, transport, forward)
        transport.set_protocol(side)
        # StreamReader has no public "take what you hold without waiting": its buffer
        # and EOF flag are read directly, once, after its protocol stopped feeding it.
        buffered = bytes(reader._buffer)  # type: ignore[attr-defined]
        reader._buffer.clear()  # type: ignore[attr-defined]
        if transport.is_closing():  # its connection_lost went to the StreamReader
            side.lost = True
            side.closed.set_result(None)
        else:
            transport.resume_reading()  # the StreamReader may have paused it
        self.sides.append(side)
        return side, buffered, reader._eof  # type: ignore[attr-defined]

    def start(self, a: Streams, b: Streams) -> None:
        """Take both connections over, then pass on what their readers held and how
        they ended."""
        taken = [self.take_over(a, True), self.take_over(b, False)]
        side_a, side_b = self.sides
        side_a.peer, side_b.peer = side_b, side_a
        failure = a[0].exception() or b[0].exception()
        if failure is not None:
            self.fail(failure)
            return
        for side in self.sides:
            _, high = side.transport.get_write_buffer_limits()
            if side.transport.get_write_buffer_size() > high:  # its old protocol was paused
                side.pause_writing()
        for side, early, _ in taken:
            if early:
                self.carry(side, early)
        for side, _, eof in taken:
            if eof:
                self.ended(side)
        for side in self.sides:
            if side.lost:
                self.lost(side, None)

    def carry(self, source: _Side, data: bytes) -> None:
        destination = source.peer
        if self.done.done():
            return
        if destination.lost:  # like writing to a closed socket: the other end sees a reset
            self.fail(ConnectionResetError("Connection lost"))
            return
        destination.transport.write(data)
        if source.forward:
            self.stats.forward += len(data)
        else:
            self.stats.backward += len(data)

    def ended(self, source: _Side) -> None:
        """source's input ended: half-close its peer; both ended: close both."""
        source.eof = True
        destination = source.peer
        if not destination.lost and destination.transport.can_write_eof():
            destination.transport.write_eof()
        if destination.eof and not self.done.done():
            for side in self.sides:
                side.transport.close()
            self.done.set_result(None)

    def lost(self, side: _Side, exc: Optional[BaseException]) -> None:
        """side's transport is gone: an error, or (a tunnel peer's CLOSE after its
        EOF) a peer that reads no more, which fails only if bytes are still coming."""
        if self.done.done():
            return
        if exc is not None or not side.eof:
            self.fail(exc or ConnectionResetError("Connection lost"))
        elif side.holding_back:
            self.fail(ConnectionResetError("Connection lost with bytes still to write"))

    def fail(self, exc: BaseException) -> None:
        """Reset both sides; the splice ends with `exc`."""
        if self.done.done():
            return
        self.stats.error = exc
        for side in self.sides:
            reset_transport(side.transport)
        self.done.set_result(None)


async def splice(a: Streams, b: Streams, stats: Optional[Spliced] = None) -> Spliced:
    """Carry bytes both ways between two stream pairs until both directions ended
    (half-close preserved), then close; reset both sides on any other end. Bytes the
    StreamReaders hold go first. `stats` (filled in even if the splice is cancelled)
    lets the caller report a connection however it ended. The stream pairs must not
    be used again (the splice owns their transports); they are kept referenced here
    until it ends, as a StreamWriter closes its transport when collected."""
    stats = stats if stats is not None else Spliced()
    started = time.monotonic()
    spliced = _Splice(stats)
    try:
        spliced.start(a, b)
        await asyncio.shield(spliced.done)
    except BaseException as exc:  # cancelled: the connection is cut, not finished
        spliced.fail(exc)
        raise
    finally:
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.gather(*(side.closed for side in spliced.sides)), CLOSE_TIMEOUT)
        stats.seconds = time.monotonic() - started
    return stats
