"""The asyncio driver: one protocol core over one (StreamReader, StreamWriter) pair.

Works over any stream: the tunnel, TCP, Unix sockets, a subprocess's pipes. It is
the server's driver for every connection, and the client's for the tunnel and
``command=`` servers. Everything happens on the streams' event loop:

- reading: one task reads the stream and feeds the core, then hands its events to
  the :class:`Receiver`;
- writing: :meth:`AioDriver.flush` writes what the core has to send to the stream
  writer, in order: at once when nothing is queued ahead and it is small, else
  through one writer task, which writes in slices of at most ``WRITE_SLICE`` bytes
  and waits for the transport to drain after each (a 256 MiB payload never sits
  twice in a transport buffer, and smaller frames queue behind it);
- waking: another thread reaches the loop with ``call_soon_threadsafe``
  (:meth:`AioDriver.run`), and nothing else.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Protocol

from .errors import ConnectionLost, RPCError
from .frames import Buffer
from .protocol import _Protocol

log = logging.getLogger(__name__)

#: Bytes asked of one read of the stream.
READ_SIZE = 1 << 18
#: Large payloads are written in slices of this size, each followed by a drain.
WRITE_SLICE = 1 << 20


class Receiver(Protocol):
    """What a driver serves: the client or server connection acting on the events."""

    def handle(self, events: List[Any]) -> None:
        """Act on events of the core; raise RPCError to end the connection."""

    def fail(self, error: BaseException) -> None:
        """The connection is over (``error`` says why); called once."""


class AioDriver:
    """Moves the bytes of ``core`` over ``reader``/``writer``; loop thread only, except
    :meth:`run`."""

    def __init__(self, core: _Protocol, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.core = core
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        #: When the peer last showed life (monotonic clock): bytes received, or a
        #: slice of a large frame taken off our hands.
        self.last_activity = time.monotonic()
        self._queue: Deque[Buffer] = collections.deque()
        self._writer_task: Optional[asyncio.Task] = None
        self._reader_task: Optional[asyncio.Task] = None

    def start(self, receiver: Receiver) -> None:
        """Start reading: events go to ``receiver``, and once, its end (loop thread).
        What the core has to send already (a client's HELLO) goes out."""
        self.flush()
        self._reader_task = asyncio.ensure_future(self._read(receiver))

    def run(self, op: Callable[..., Any], *args: Any) -> Any:
        """From any thread: ``op(*args)`` on the loop (the core is touched only there),
        then send what it made the core send. On the loop thread it runs at once and
        returns what ``op`` returned; from another, later (None). Dropped once the
        loop is closed."""
        if threading.get_ident() == self._loop_thread:
            return self._run(op, args)
        try:
            self.loop.call_soon_threadsafe(self._run, op, args)
        except RuntimeError:  # the loop is closed: the connection is gone already
            pass
        return None

    def _run(self, op: Callable[..., Any], args: tuple) -> Any:
        try:
            return op(*args)
        finally:
            self.flush()

    def flush(self) -> None:
        """Write what the core has to send (loop thread): at once if nothing is queued
        ahead of it and it is small, else through the writer task, in order."""
        out = self.core.data_to_send()
        if not out or self.writer.is_closing():  # closing: the reader sees the end
            return
        if self._writer_task is None and all(len(buffer) <= WRITE_SLICE for buffer in out):
            for buffer in out:
                self.writer.write(buffer)
            return
        self._queue.extend(out)
        if self._writer_task is None:
            self._writer_task = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        """The writer task: the queue in slices, each followed by a drain; then a drain."""
        try:
            while self._queue:
                view = memoryview(self._queue.popleft()).cast("B")
                for start in range(0, len(view), WRITE_SLICE):
                    self.writer.write(view[start:start + WRITE_SLICE])
                    await self.writer.drain()
                    if len(view) > WRITE_SLICE:
                        self.last_activity = time.monotonic()
                del view  # let a large payload go as soon as it is written
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:  # what the peer never got: its calls fail
            log.warning("writing to %s failed, closing the connection: %s", self.core.peer, exc)
            self._queue.clear()
            self.writer.close()
        finally:
            self._writer_task = None

    async def drained(self) -> None:
        """Wait until everything flushed so far is written and the transport's buffer
        is low again (a stream's producer waits here before the next item)."""
        if self._writer_task is None:
            self._writer_task = asyncio.ensure_future(self._write())  # just the drain
        await asyncio.wait({self._writer_task})

    async def _read(self, receiver: Receiver) -> None:
        error: BaseException
        try:
            while True:
                try:
                    data = await self.reader.read(READ_SIZE)
                except (ConnectionError, OSError) as exc:
                    raise ConnectionLost(f"connection to {self.core.peer} lost: {exc}") from exc
                if not data:
                    self.core.receive_eof()  # raises
                self.last_activity = time.monotonic()
                try:
                    self.core.receive_data(data)
                    receiver.handle(self.core.events_received())
                finally:
                    self.flush()  # the core's own replies (PONG, CREDIT, a REJECT), the receiver's
        except asyncio.CancelledError:
            error = ConnectionLost("the connection was closed by this side")
        except RPCError as exc:
            error = exc
        except Exception as exc:  # a bug: never leave anyone waiting
            log.exception("reading from %s failed", self.core.peer)
            error = ConnectionLost(f"reading from {self.core.peer} failed: {exc!r}")
        self.core.close()
        receiver.fail(error)

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop reading, let what is queued go out (a REJECT), close the stream; never
        raises (the peer may already be gone)."""
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            await asyncio.wait({self._reader_task})
        if self._writer_task is not None:
            await asyncio.wait({self._writer_task}, timeout=grace)
            self._writer_task.cancel()
        self.writer.close()
        closing = asyncio.ensure_future(self.writer.wait_closed())
        try:
            await asyncio.wait({closing}, timeout=grace)  # raises only our own cancellation
        finally:
            if closing.done() and not closing.cancelled():
                closing.exception()  # whatever it is (the peer may be gone), it is no news
            closing.cancel()


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
