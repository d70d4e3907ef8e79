"""Worker threads write replies straight into the socket: one loop wake-up less.

A server's plain function runs in a worker thread. Handing its result back to the
event loop only to write it costs a wake-up of the loop thread (20-40 us on a
busy machine, more than the rest of a small call). When nothing is queued ahead of
it, the worker writes the reply itself, on a duplicate of the connection's socket
descriptor (non-blocking, like the original).

Every write of the connection goes through one lock, so frames never interleave
or reorder: the loop's own writes (:meth:`write_on_loop`) first flush whatever a
worker left behind, and a worker writes only while the transport and the channel
have nothing queued. A reply the socket does not take at once is finished by the
loop.
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import Callable, Optional

from .protocol import Buffer


class Shortcut:
    """Direct writes, from any thread, into the socket under an asyncio transport."""

    def __init__(self, writer: asyncio.StreamWriter, sock: socket.socket) -> None:
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._lock = threading.Lock()
        #: The rest of a frame a worker could not write; the loop writes it first.
        self._backlog: Optional[bytes] = None

    @classmethod
    def attach(cls, writer: asyncio.StreamWriter) -> Optional["Shortcut"]:
        """A shortcut for a TCP or Unix socket's writer; None for other transports."""
        raw = writer.get_extra_info("socket")
        if raw is None or raw.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            return None
        fd = os.dup(raw.fileno())
        return cls(writer, socket.socket(raw.family, raw.type, raw.proto, fileno=fd))

    @property
    def sock(self) -> socket.socket:
        """The duplicate descriptor: threads may read it too (see rpc.turns)."""
        return self._sock

    def write_on_loop(self, data: Buffer) -> None:
        """The loop's write: after what workers left behind, through the transport."""
        with self._lock:
            self._flush_backlog()
            self._writer.write(data)

    def write_from_thread(self, data: bytes, idle: Callable[[], bool]) -> bool:
        """Write a whole frame now if nothing is queued ahead of it (``idle()`` says
        whether the channel has queued frames); False: send it through the loop."""
        with self._lock:
            if (self._sock.fileno() < 0 or self._backlog is not None or not idle()
                    or self._writer.transport.get_write_buffer_size()
                    or self._writer.is_closing()):
                return False
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return False  # the loop's write reports the broken connection
            if sent < len(data):
                self._backlog = data[sent:]
                try:
                    self._loop.call_soon_threadsafe(self._flush)
                except RuntimeError:  # the loop is closed: the server has stopped
                    pass
            return True

    def _flush(self) -> None:
        with self._lock:
            self._flush_backlog()

    def _flush_backlog(self) -> None:
        if self._backlog is not None:
            self._writer.write(self._backlog)
            self._backlog = None

    def close(self) -> None:
        """Close the duplicate descriptor (under the lock: no worker is using it)."""
        with self._lock:
            self._sock.close()
