"""One tunneled connection: its state, and the asyncio Transport on top of it.

The standard asyncio.StreamReader / StreamWriter sit on the transport (exactly as
on a TCP socket), so read, readexactly, readuntil, drain, write_eof, wait_closed...
all behave as code written for TCP expects. The transport lives on the event loop;
`Conn` is what the loop and the endpoint's I/O thread share (guarded by its lock):
the bytes the application wrote and not yet on disk, and how each direction ends.
The I/O thread moves the bytes (chunks.py) and reports back with
call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional

from .records import Kind

DEFAULT_HIGH_WATER = 1024 * 1024
Frame = Callable[[Kind, bytes], List[bytes]]  # a record as buffers: header, payload


def _unchanging(data: Any) -> memoryview:
    """`data` as it is now, for the I/O thread to write later: bytes, and contiguous
    views of bytes, cannot change and are kept as they are; anything else (a
    bytearray the caller may reuse once write() returns) is copied."""
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) and data.c_contiguous:
        return data.cast("B")
    return memoryview(bytes(data))  # no copy for bytes itself


class Conn:
    """One connection's state, shared by the event loop (the application's side) and
    the I/O thread. Fields the loop writes are guarded by `lock`; `wake` tells the I/O
    thread there is something to do."""

    def __init__(self, cid: str, wake: Callable[[], None], extra: Dict[str, Any]) -> None:
        self.cid = cid
        self.wake = wake
        self.peer: Optional[str] = None
        self.transport = FileTransport(self, extra)
        self.lock = threading.Lock()
        self._out: Deque[memoryview] = collections.deque()  # written by the application, not yet on disk
        self._out_size = 0
        self.want_eof = False
        self.want_close = False
        self.app_closed = False
        self.reset_reason: Optional[str] = None
        self.eof_written = False
        self.out_done = False
        self.lost_after_write = False
        self.writer_paused = False
        self.resume_below = 0
        self.resume_writer = False  # set by build_batch when the paused writer may go on
        self.in_eof = False
        self.in_done = False
        self.reading = True  # the protocol takes data (not paused): see FileTransport.pause_reading
        #: The in position whose data the protocol has been given (set on the loop). The
        #: I/O thread reads on while the protocol pauses, for the ACKs of our own
        #: direction, but acknowledges no more than this: a paused reader holds at most
        #: a window.
        self.delivered = 0
        self.hot = True
        self.last_seen = self.looked = time.monotonic()  # last fruitful read / start of the last look
        self.last_write = float("-inf")  # when the last append began
        self.in_next = 0.0  # no look at the in file before then (see Endpoint._poll_in)

    def name(self, cid: str) -> None:
        """Take connection id `cid` (a waiting connection offered to a new server gets a new one)."""
        self.cid = cid
        self.transport.name(cid)

    # --- called on the loop --------------------------------------------------------------
    def push(self, data: bytes, high: int, low: int) -> bool:
        """Buffer data for the I/O thread. True if the writer must now pause: the
        buffer passed `high`; the I/O thread resumes it once it is down to `low`."""
        with self.lock:
            if not self.out_done:
                self._out.append(_unchanging(data))
                self._out_size += len(data)
            pause = not self.writer_paused and self._out_size > high
            if pause:
                self.writer_paused, self.resume_below = True, low
        self.hot, self.last_seen = True, time.monotonic()  # an answer is likely: look without waiting for the bell
        self.wake()
        return pause

    def buffered(self) -> int:
        """Bytes written by the application and not yet on disk."""
        with self.lock:
            return self._out_size

    def request_end(self, close: bool) -> bool:
        """write_eof (close=False) or close (close=True), after the buffered data.

        Returns True if our direction was already over (nothing left to do).
        """
        with self.lock:
            if self.out_done:
                return True
            self.want_eof = True
            if close:
                self.want_close = self.app_closed = True
        self.wake()
        return False

    def request_reset(self, reason: str) -> None:
        """Abort: drop buffered data and tell the peer (`reason` empty for a plain abort).

        Once the RESET is written we read no more; the peer, reading it, removes its files.
        """
        with self.lock:
            self._drop_output()
            self.app_closed = True
            if self.reset_reason is None and not self.out_done:
                self.reset_reason = reason
        self.wake()

    # --- called on the I/O thread ------------------------------------------------------
    def has_output(self) -> bool:
        """Whether there is data or an end record waiting to be written."""
        with self.lock:
            return not self.out_done and (
                bool(self._out) or self.reset_reason is not None or self.want_close
                or (self.want_eof and not self.eof_written))

    def build_batch(self, room: int, chunk: int, frame: Frame) -> List[bytes]:
        """Records for up to `room` bytes of buffered data, then any end record due.

        Payloads are views of the application's buffers: nothing is copied. End
        records are tiny and may overshoot the window slightly; data never does.
        """
        parts: List[bytes] = []
        with self.lock:
            self._resume_writer_if_drained()  # also after a reset or the peer's CLOSE emptied it
            if self.out_done:
                return parts
            if self.reset_reason is not None:
                self._drop_output()
                self.out_done = True
                return frame(Kind.RESET, self.reset_reason.encode("utf-8", "replace"))
            while self._out and room > 0:
                head = self._out[0]
                payload = head[:min(chunk, room)]
                if len(payload) == len(head):
                    self._out.popleft()
                else:
                    self._out[0] = head[len(payload):]
                self._out_size -= len(payload)
                room -= len(payload)
                parts += frame(Kind.DATA, payload)
            self._resume_writer_if_drained()
            if not self._out:
                if self.want_close:
                    parts += frame(Kind.CLOSE, b"")
                    self.eof_written = self.out_done = True
                    self.lost_after_write = self.app_closed
                elif self.want_eof and not self.eof_written:
                    parts += frame(Kind.EOF, b"")
                    self.eof_written = True
        return parts

    def _drop_output(self) -> None:
        self._out.clear()
        self._out_size = 0

    def _resume_writer_if_drained(self) -> None:
        if self.writer_paused and self._out_size <= self.resume_below:
            self.writer_paused, self.resume_writer = False, True

    def peer_closed(self) -> None:
        """The peer reads no more: drop what we still have and close our direction."""
        with self.lock:
            if not self.out_done:
                self._drop_output()
                self.want_eof = self.want_close = True

    def end_output(self) -> bool:
        """Mark our direction over without writing (peer gone). True if it was open."""
        with self.lock:
            was_open = not self.out_done
            self.out_done = True
            self._drop_output()
            return was_open


class FileTransport(asyncio.Transport):
    """Loop-side half of a connection: buffers writes, delivers what the I/O thread read."""

    def __init__(self, conn: Conn, extra: Dict[str, Any]) -> None:
        super().__init__(extra)
        self._conn = conn
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._protocol: Optional[asyncio.BaseProtocol] = None
        self._early: List[Callable[[], None]] = []
        #: Data and ends that came while the protocol paused reading, in order.
        self._held: Deque[Callable[[], None]] = collections.deque()
        self._closing = False
        self._lost = False
        self._eof_written = False
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4

    def name(self, cid: str) -> None:
        """Show connection id `cid` in get_extra_info (peername, sockname, connection_id)."""
        self._extra.update(peername=("fileforward", cid), sockname=("fileforward", cid), connection_id=cid)

    # --- wiring -------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol) -> None:
        """Bind to the protocol (on the loop), then replay anything that arrived first."""
        self._loop = loop
        self._protocol = protocol
        protocol.connection_made(self)
        early, self._early = self._early, []
        for event in early:
            event()

    def _event(self, event: Callable[[], None]) -> None:
        if self._protocol is None:
            self._early.append(event)
        elif not self._lost:
            event()

    def _in_order(self, event: Callable[[], None]) -> None:
        """What comes from the peer's stream (data, EOF, a clean end) reaches the
        protocol in order, and not while it paused reading."""
        if self._held or not self._conn.reading:
            self._held.append(event)
        else:
            self._event(event)

    def _release_held(self) -> None:
        while self._held and self._conn.reading:
            self._event(self._held.popleft())
        self._conn.wake()  # what the protocol now has may be acknowledged (Conn.delivered)

    # --- called on the loop by the I/O thread ----------------------------------------
    def deliver_data(self, payloads: List[bytes], upto: int) -> None:
        """Data read from the tunnel, up to in position `upto`."""
        def event() -> None:
            if self._closing:
                return
            for payload in payloads:
                self._protocol.data_received(payload)  # type: ignore[union-attr]
            self._conn.delivered = upto
        self._in_order(event)

    def deliver_eof(self) -> None:
        """The peer wrote EOF (half-close) or closed."""
        def event() -> None:
            if not self._closing:
                self._protocol.eof_received()  # type: ignore[union-attr]
        self._in_order(event)

    def deliver_lost(self, exc: Optional[BaseException]) -> None:
        """The connection is over: closed cleanly (None: after what came before it) or
        failed (exc: at once; data not yet taken is dropped, as TCP drops it on a reset)."""
        def event() -> None:
            self._closing = True
            self._lost = True
            self._protocol.connection_lost(exc)  # type: ignore[union-attr]
        if exc is None:
            self._in_order(event)
        else:
            self._held.clear()
            self._event(event)

    def writer_drained(self) -> None:
        """The I/O thread moved the buffer below the low-water mark: the writer may go on."""
        def event() -> None:
            self._protocol.resume_writing()  # type: ignore[union-attr]
        self._event(event)

    # --- asyncio.Transport API ------------------------------------------------------
    def write(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return
        if self._conn.push(data, self._high, self._low):
            self._protocol.pause_writing()  # type: ignore[union-attr]

    def write_eof(self) -> None:
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        self._conn.request_end(close=False)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._conn.request_end(close=True) and self._loop is not None:
            self._lost = True
            self._loop.call_soon(self._protocol.connection_lost, None)  # type: ignore[union-attr]

    def abort(self) -> None:
        self.reset("")

    def reset(self, reason: str) -> None:
        """Abort, telling the other side why: its application gets a ConnectionResetError
        carrying `reason`, and its endpoint logs it as a WARNING. abort() is reset("")."""
        if self._lost:
            return
        self._closing = True
        self._conn.request_reset(reason)
        self._lost = True
        if self._loop is not None and self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._conn.reading = False  # the I/O thread reads on: see Conn.delivered

    def resume_reading(self) -> None:
        self._conn.reading = True
        if self._held and self._loop is not None:  # later, as a socket's data would come
            self._loop.call_soon(self._release_held)

    def is_reading(self) -> bool:
        return self._conn.reading and not self._closing

    def set_write_buffer_limits(self, high: Optional[int] = None, low: Optional[int] = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_limits(self) -> "tuple[int, int]":
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._conn.buffered()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]
