"""Copying bytes between two stream pairs (a TCP socket and a tunnel connection).

A splice ends the way TCP would tell it: when both directions reached EOF, both
sides are closed (FIN on a socket, CLOSE on a tunnel connection); any other end
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

CHUNK = 256 * 1024
Streams = Tuple[asyncio.StreamReader, asyncio.StreamWriter]
_LINGER_ZERO = struct.pack("ii", 1, 0)  # close() then sends RST instead of FIN


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
    """End a connection abnormally: RST on a TCP socket, RESET on a tunnel connection
    (carrying `reason` to the other side's application and log).

    asyncio's abort() alone closes a socket with FIN when no unread input is queued,
    which the peer cannot tell from a complete transfer.
    """
    if isinstance(writer.transport, FileTransport):
        writer.transport.reset(reason)
        return
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Spliced, forward: bool) -> None:
    """Copy until EOF, counting into stats as the bytes go (live, for status reports),
    then half-close `writer` so the far side sees the EOF too."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        if forward:
            stats.forward += len(data)
        else:
            stats.backward += len(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def splice(a: Streams, b: Streams, stats: Optional[Spliced] = None) -> Spliced:
    """Copy both ways until both directions ended (half-close preserved), then close;
    reset both sides on any other end. `stats` (filled in even if the splice is
    cancelled) lets the caller report a connection however it ended."""
    stats = stats if stats is not None else Spliced()
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_pipe(a_reader, b_writer, stats, True)),
             asyncio.ensure_future(_pipe(b_reader, a_writer, stats, False))]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failures = [t.exception() for t in done if t.exception() is not None]
        if failures:
            stats.error = failures[0]
    except BaseException as exc:  # cancelled: the connection is cut, not finished
        stats.error = exc
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none left unretrieved
        for writer in (a_writer, b_writer):
            if stats.error is None:
                writer.close()
            else:
                reset(writer)
        for writer in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
        stats.seconds = time.monotonic() - started
    return stats
