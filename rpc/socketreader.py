"""Frames read from a socket by threads, with no event loop in between.

Shared by the client's socket driver (:mod:`rpc.socketlink`) and the server's
reading threads (:mod:`rpc.turns`). One thread at a time reads: whoever uses it
holds a lock of its own around :meth:`wait` and :meth:`read`.
"""
from __future__ import annotations

import collections
import select
import socket
from typing import Deque, Optional

from .framing import READ_SIZE, Framing
from .errors import ConnectionLost
from .protocol import Frame


class SocketReader:
    """Decodes what one socket receives into :attr:`frames`, one ``recv`` at a time."""

    def __init__(self, sock: socket.socket, framing: Framing) -> None:
        self.sock = sock
        self.framing = framing
        #: Decoded frames not taken yet, oldest first.
        self.frames: Deque[Frame] = collections.deque()
        #: recv_into() this one buffer: a fresh 256 KiB one per read would be mapped
        #: and unmapped by malloc every time (see transports.SOCKET_READ_SIZE).
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def wait(self, timeout: Optional[float]) -> bool:
        """Block until there is something to read (bytes, or the end): True, or until
        ``timeout`` seconds pass (None: no limit): False."""
        return bool(self._poller.poll(None if timeout is None else max(timeout, 0) * 1000))

    def read(self) -> int:
        """One ``recv``: add the frames it completes; returns the bytes read (0: none
        were waiting, on a non-blocking socket). Raises ConnectionLost at the end of
        the stream (TruncatedFrameError in the middle of a frame), ProtocolError on
        garbage."""
        try:
            size = self.sock.recv_into(self._buffer)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise ConnectionLost(f"connection to {self.framing.peer} lost: {exc}") from exc
        if not size:
            raise self.framing.end_of_stream()
        self.framing.saw_activity()
        self.frames.extend(self.framing.decoder.feed(self._buffer[:size]))
        return size

    def next_frame(self) -> Frame:
        """The next frame, waiting as long as it takes."""
        while not self.frames:
            self.wait(None)
            self.read()
        return self.frames.popleft()
