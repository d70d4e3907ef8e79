"""The asyncio driver: one protocol core over one asyncio transport, as its protocol.

Works over any transport: the tunnel (``fileforward.create_connection`` /
``create_server``), a subprocess's pipes and stdio (:class:`rpc.transports.Pipes`),
TCP and Unix sockets where the sync driver cannot serve them. It is the server's
driver for the tunnel and stdio, and the client's for the tunnel and ``command=``
servers. Everything happens on the transport's event loop:

- reading: the transport calls :meth:`AioDriver.data_received`, which feeds the core
  and hands its events to the :class:`Receiver` at once (no buffer of ours between
  the transport and the core); the receiver may ask for reading back-pressure with
  :meth:`AioDriver.hold` (the transport's reading pauses while it holds too much);
- writing: :meth:`AioDriver.flush` queues what the core has to send and writes it to
  the transport in order, large payloads in slices of at most ``WRITE_SLICE`` bytes;
  while the transport has paused our writing (``pause_writing``) the rest waits for
  ``resume_writing`` (a 256 MiB payload never sits twice in a transport buffer, and
  smaller frames queue behind it);
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

#: Large payloads are written in slices of this size; the next waits while the
#: transport has paused our writing.
WRITE_SLICE = 1 << 20
#: Reading pauses while the receiver holds more received bytes than this (see
#: :meth:`AioDriver.hold`), and resumes once it holds half as much.
HOLD_LIMIT = 64 << 20


class Receiver(Protocol):
    """What a driver serves: the client or server connection acting on the events."""

    def handle(self, events: List[Any]) -> None:
        """Act on events of the core; raise RPCError to end the connection."""

    def fail(self, error: BaseException) -> None:
        """The connection is over (``error`` says why); called once."""


class AioDriver(asyncio.Protocol):
    """Moves the bytes of ``core`` over the transport it is the protocol of; loop
    thread only, except :meth:`run`."""

    def __init__(self, core: _Protocol) -> None:
        self.core = core
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.transport: Optional[asyncio.Transport] = None
        #: When the peer last showed life (monotonic clock): bytes received, or a
        #: slice of a large frame taken off our hands.
        self.last_activity = time.monotonic()
        self._receiver: Optional[Receiver] = None
        self._queue: Deque[Buffer] = collections.deque()  # to write, in order
        self._writing_paused = False
        self._drain_waiters: List["asyncio.Future[None]"] = []
        self._held = 0
        self._reading_paused = False
        #: Why the connection ended (set once; delivered once a receiver is there).
        self._error: Optional[BaseException] = None
        self._lost: "asyncio.Future[None]" = self.loop.create_future()

    def start(self, receiver: Receiver) -> None:
        """Deliver events to ``receiver`` (those of bytes that came first too), and,
        once, its end (loop thread). What the core has to send already (a client's
        HELLO) goes out."""
        self._receiver = receiver
        if self._error is None:
            self.data_received(b"")
        else:
            receiver.fail(self._error)

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

    # ------------------------------------------------------------ reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.core.peer = describe_peer(transport)
        self._write_queued()  # what was flushed before the transport was there

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return  # the connection is over: what still comes is dropped
        self.last_activity = time.monotonic()
        try:
            self.core.receive_data(data)
            self._deliver()
        except RPCError as exc:
            self._end(exc)
        except Exception as exc:  # a bug: never leave anyone waiting
            log.exception("reading from %s failed", self.core.peer)
            self._end(ConnectionLost(f"reading from {self.core.peer} failed: {exc!r}"))
        finally:
            self.flush()  # the core's own replies (PONG, CREDIT, a REJECT), the receiver's

    def _deliver(self) -> None:
        if self._receiver is not None:
            self._receiver.handle(self.core.events_received())

    def eof_received(self) -> None:
        self._receive_end()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if exc is None:
            self._receive_end()
        else:
            error = ConnectionLost(f"connection to {self.core.peer} lost: {exc}")
            error.__cause__ = exc
            self._end(error)
        self._queue.clear()
        self._wake_drain_waiters()
        if not self._lost.done():
            self._lost.set_result(None)

    def _receive_end(self) -> None:
        """The peer ended the stream: the core says what that means (raises)."""
        if self._error is not None:
            return
        try:
            self.core.receive_eof()
        except RPCError as exc:
            self._end(exc)

    def _end(self, error: BaseException) -> None:
        """Reading is over, for ``error``: the receiver hears it, once."""
        if self._error is not None:
            return
        self._error = error
        self.core.close()
        if self._receiver is not None:
            self._receiver.fail(error)

    def hold(self, size: int) -> None:
        """Loop thread: the receiver keeps ``size`` more bytes of what it received
        for later (negative: it let them go). Reading pauses above ``HOLD_LIMIT``, so
        that a fast peer cannot pile up unbounded work, and resumes below half."""
        self._held += size
        if self.transport is None or self.transport.is_closing():
            return
        if not self._reading_paused and self._held > HOLD_LIMIT:
            self._reading_paused = True
            self.transport.pause_reading()
            log.debug("holding %d bytes from %s: reading paused", self._held, self.core.peer)
        elif self._reading_paused and self._held <= HOLD_LIMIT // 2:
            self._reading_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------ writing

    def flush(self) -> None:
        """Write what the core has to send (loop thread), in order."""
        out = self.core.data_to_send()
        if out and (self.transport is None or not self.transport.is_closing()):
            self._queue.extend(out)  # closing: the reading side sees the end
            self._write_queued()

    def _write_queued(self) -> None:
        """Hand the queue to the transport until it pauses our writing; a payload
        larger than ``WRITE_SLICE`` goes in slices, each a sign of the peer's life
        (the transport took the last one)."""
        transport = self.transport
        if transport is None:
            return
        queue = self._queue
        while queue and not self._writing_paused:
            buffer = queue[0]
            if len(buffer) <= WRITE_SLICE:
                queue.popleft()
                transport.write(buffer)
                continue
            view = memoryview(buffer).cast("B")
            queue[0] = view[WRITE_SLICE:]
            transport.write(view[:WRITE_SLICE])
            self.last_activity = time.monotonic()
        if not queue and not self._writing_paused:
            self._wake_drain_waiters()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._write_queued()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drained(self) -> None:
        """Wait until everything flushed so far is handed to the transport and its
        buffer is low again (a stream's producer waits here before the next item),
        or the connection is lost."""
        waiter = self._drain_waiter()
        if waiter is not None:
            await waiter

    def _drain_waiter(self) -> "Optional[asyncio.Future[None]]":
        if not (self._queue or self._writing_paused) or self._lost.done():
            return None
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        return waiter

    # ------------------------------------------------------------ closing

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop reading, let what is queued go out (a REJECT), close the transport;
        never raises (the peer may already be gone)."""
        self._end(ConnectionLost("the connection was closed by this side"))
        if self.transport is None:
            return
        waiter = self._drain_waiter()
        if waiter is not None:
            await asyncio.wait({waiter}, timeout=grace)
        self.transport.close()
        await asyncio.wait({self._lost}, timeout=grace)


def describe_peer(transport: asyncio.BaseTransport) -> str:
    """A short name for log messages: the peer address, or the transport kind."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        return ":".join(map(str, peer[:2]))
    if peer:
        return str(peer)
    sockname = transport.get_extra_info("sockname")
    if sockname:
        return f"peer on {sockname}"
    return "pipe peer" if transport.get_extra_info("pipe") is not None else "peer"
