"""Frames over one asyncio reader/writer pair (TCP, Unix, pipes or the file transport).

The only place where RPC bytes meet a stream: it feeds what it reads to the
sans-I/O decoder and writes encoded frames, large ones in chunks so that a 256 MiB
payload never sits twice in a transport buffer and never blocks smaller frames
from being queued behind it.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Deque, Optional, Tuple

from .errors import ConnectionLost
from .framing import READ_SIZE, Framing
from .protocol import (Buffer, Flag, Frame, Kind, Payload, encode_frame, encode_header,
                       payload_size)
from .shortcut import Shortcut
from .socketreader import SocketReader

log = logging.getLogger(__name__)

#: Large payloads are written in slices of this size, each followed by a drain.
WRITE_CHUNK = 1 << 20
#: Frames up to this size may be written by a worker thread (see shortcut.py).
SHORTCUT_LIMIT = 1 << 16


class Channel(Framing):
    """Send and receive frames; all methods run on the event loop of the streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(describe_peer(writer))
        self.reader = reader
        self.writer = writer
        self._frames: Deque[Frame] = collections.deque()
        self._queue: Deque[Tuple[Buffer, ...]] = collections.deque()
        self._flusher: Optional[asyncio.Task] = None
        self._drain_lock = asyncio.Lock()
        #: Made once the peer is authenticated (see :meth:`attach_shortcut`).
        self._shortcut: Optional[Shortcut] = None

    def attach_shortcut(self) -> None:
        """For a TCP or Unix socket: let threads write (and read) it directly. Only
        after authentication: it duplicates the descriptor, and a stranger's
        connections must cost the server no more than one descriptor each."""
        self._shortcut = Shortcut.attach(self.writer)

    async def recv(self) -> Frame:
        """The next frame. Raises ConnectionLost at EOF, ProtocolError on garbage."""
        while not self._frames:
            try:
                data = await self.reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise ConnectionLost(f"connection to {self.peer} lost: {exc}") from exc
            if not data:
                raise self.end_of_stream()
            self.saw_activity()
            self._frames.extend(self.decoder.feed(data))
        return self._frames.popleft()

    def take_over_reading(self) -> Optional[SocketReader]:
        """For a TCP or Unix socket: the event loop stops reading it, and threads read
        it from the returned reader (frames already decoded come first). None for
        other streams, which the loop keeps reading through :meth:`recv`.

        Call it right after :meth:`recv` returned, with no ``await`` in between:
        then every byte the loop read is in the decoder, none in the stream reader;
        and after :meth:`attach_shortcut`.
        """
        if self._shortcut is None:
            return None
        self.writer.transport.pause_reading()
        reader = SocketReader(self._shortcut.sock, self)
        reader.frames.extend(self._frames)
        self._frames.clear()
        return reader

    def send(self, kind: Kind, request_id: int = 0, payload: Payload = b"",
             flags: Flag = Flag.NONE) -> None:
        """Queue one frame; frames go out in the order of the calls."""
        size = payload_size(payload)
        self.check_size(size, f"a {kind.name} message")
        if self.writer.is_closing():
            raise ConnectionLost(f"connection to {self.peer} is closed")
        if self._flusher is None and size <= WRITE_CHUNK:
            self._write(encode_frame(kind, request_id, payload, flags))
            return
        parts = payload if isinstance(payload, tuple) else (payload,)
        self._queue.append((encode_header(kind, request_id, size, flags),) + parts)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue:
                for part in self._queue.popleft():
                    view = memoryview(part)
                    for start in range(0, len(view), WRITE_CHUNK):
                        self._write(view[start:start + WRITE_CHUNK])
                        await self._drain()
                        self.saw_activity()
                del part, view  # let a large payload go as soon as it is written
        except ConnectionError as exc:  # what the peer never got: its calls fail
            log.warning("writing to %s failed, closing the connection: %s", self.peer, exc)
            self._queue.clear()
            self.writer.close()
        finally:
            self._flusher = None

    def send_from_thread(self, kind: Kind, request_id: int, payload: bytes) -> bool:
        """From any thread: write a small frame now if nothing is queued ahead of it.

        False if it was not written (not a socket, too large, or frames queued):
        then :meth:`send` it on the loop.
        """
        if (self._shortcut is None
                or len(payload) > min(SHORTCUT_LIMIT, self.peer_max_frame)):
            return False
        return self._shortcut.write_from_thread(encode_frame(kind, request_id, payload),
                                                self._idle)

    def _idle(self) -> bool:
        return self._flusher is None and not self._queue

    def _write(self, data: Buffer) -> None:
        if self._shortcut is None:
            self.writer.write(data)
        else:
            self._shortcut.write_on_loop(data)

    async def _drain(self) -> None:
        # Python 3.9's StreamWriter.drain() may not be awaited by two tasks at once.
        async with self._drain_lock:
            await self.writer.drain()

    async def drain(self) -> None:
        """Wait until queued frames are handed to the transport and its buffer is low."""
        if self._flusher is not None:
            await asyncio.wait({self._flusher})
        try:
            await self._drain()
        except ConnectionError as exc:
            raise ConnectionLost(f"connection to {self.peer} lost: {exc}") from exc

    async def aclose(self) -> None:
        """Close the stream; never raises (the peer may already be gone)."""
        if self._flusher is not None:
            self._flusher.cancel()
        self.writer.close()
        if self._shortcut is not None:
            self._shortcut.close()  # the peer sees the end once no descriptor is left
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)
        except (asyncio.TimeoutError, OSError, RuntimeError):
            pass


def describe_peer(writer: asyncio.StreamWriter) -> str:
    """A short name for log messages: the peer address, or the transport kind."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple):
        return ":".join(map(str, peer[:2]))
    if peer:
        return str(peer)
    sockname = writer.get_extra_info("sockname")
    if sockname:
        return f"peer on {sockname}"
    return "pipe peer" if writer.get_extra_info("pipe") is not None else "peer"
