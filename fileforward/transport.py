"""An asyncio Transport over one tunneled connection.

The standard asyncio.StreamReader / StreamWriter sit on top of it (exactly as on a
TCP socket), so read, readexactly, readuntil, drain, write_eof, wait_closed... all
behave as code written for TCP expects. The transport lives on the event loop; the
endpoint's I/O thread moves the bytes and reports back with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .endpoint import Conn

DEFAULT_HIGH_WATER = 1024 * 1024


class FileTransport(asyncio.Transport):
    """Loop-side half of a connection: buffers writes, delivers what the I/O thread read."""

    def __init__(self, conn: "Conn", extra: Dict[str, Any]) -> None:
        super().__init__(extra)
        self._conn = conn
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._protocol: Optional[asyncio.BaseProtocol] = None
        self._early: List[Callable[[], None]] = []
        self._closing = False
        self._lost = False
        self._eof_written = False
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4

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

    # --- called on the loop by the I/O thread ----------------------------------------
    def deliver_data(self, payloads: List[memoryview]) -> None:
        """Data read from the tunnel."""
        def event() -> None:
            if self._closing:
                return
            for payload in payloads:
                self._protocol.data_received(payload)  # type: ignore[union-attr]
        self._event(event)

    def deliver_eof(self) -> None:
        """The peer wrote EOF (half-close) or closed."""
        def event() -> None:
            if not self._closing:
                self._protocol.eof_received()  # type: ignore[union-attr]
        self._event(event)

    def deliver_lost(self, exc: Optional[BaseException]) -> None:
        """The connection is over: closed cleanly (None) or failed (exc)."""
        def event() -> None:
            self._closing = True
            self._lost = True
            self._protocol.connection_lost(exc)  # type: ignore[union-attr]
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
        self._conn.set_reading(False)

    def resume_reading(self) -> None:
        self._conn.set_reading(True)

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
