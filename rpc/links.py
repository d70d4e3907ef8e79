"""How a client connection's frames move: two thin drivers of the same client core.

:class:`LoopLink` runs on an asyncio event loop and works over any stream (the
file transport, a subprocess's pipes). :class:`SocketLink` serves TCP and Unix
sockets without an event loop on the path of a call: the calling thread writes
its request straight to the socket, and a reader thread blocked in ``recv`` hands
each reply to the waiting caller. Over loopback that saves about half of a small
call's round trip (two thread hand-offs and several loop iterations).

Both deliver to a :class:`Receiver` (the client connection): ``receive(frame)``
for each frame, ``tick()`` every ``interval`` seconds (False: the peer is presumed
dead, stop reading), and ``fail(error)`` once, when reading ends.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Protocol

from .channel import READ_SIZE, Channel, Framing
from .errors import ConnectionLost, RPCError
from .protocol import Flag, Frame, Kind, Payload, encode_frame, encode_header, payload_size

log = logging.getLogger(__name__)

#: Frames up to this size are joined and sent with one system call; larger ones are
#: sent part by part, so that a large argument is never copied.
JOIN_LIMIT = 1 << 16


class Receiver(Protocol):
    """What a link drives (implemented by the client connection)."""

    def receive(self, frame: Frame) -> None:
        """Act on one frame; raise RPCError to end the connection."""

    def tick(self) -> bool:
        """Periodic liveness check; False once the peer is presumed dead."""

    def fail(self, error: RPCError) -> None:
        """Reading has ended with ``error``; fail whatever still waits."""


class LoopLink:
    """Frames over an asyncio :class:`Channel`; everything runs on its loop."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks: List[asyncio.Task] = []

    def check_size(self, size: int, what: str) -> None:
        """Raise ProtocolError if the peer would refuse a payload of ``size`` bytes."""
        self.channel.check_size(size, what)

    def send(self, kind: Kind, request_id: int = 0, payload: Payload = b"",
             flags: Flag = Flag.NONE) -> None:
        """Queue one frame (loop thread only: use :meth:`soon` from elsewhere)."""
        self.channel.send(kind, request_id, payload, flags)

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (directly if already on it)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: the connection is gone already
            pass

    def start(self, receiver: Receiver, interval: float) -> None:
        """Start reading frames and ticking (loop thread)."""
        self._tasks = [asyncio.ensure_future(self._read(receiver)),
                       asyncio.ensure_future(self._beat(receiver, interval))]

    async def _read(self, receiver: Receiver) -> None:
        try:
            while True:
                receiver.receive(await self.channel.recv())
        except asyncio.CancelledError:
            error: RPCError = ConnectionLost("the connection was closed by this client")
        except Exception as exc:
            error = _reading_error(exc)
        receiver.fail(error)
        await self.channel.aclose()

    async def _beat(self, receiver: Receiver, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not receiver.tick():
                self._tasks[0].cancel()
                return

    async def aclose(self) -> None:
        """Stop reading and close the stream."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SocketLink(Framing):
    """Frames over a blocking socket: any thread sends, one reader thread receives.

    Before :meth:`start` (during the handshake) frames are read with :meth:`recv`,
    a coroutine, like a :class:`Channel`'s.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(_describe(sock))
        self.sock = sock
        self._write_lock = threading.Lock()
        self._frames: Deque[Frame] = collections.deque()
        #: recv_into() this one buffer: a fresh 256 KiB one per read would be mapped
        #: and unmapped by malloc every time (see transports.SOCKET_READ_SIZE).
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._reader: Optional[threading.Thread] = None
        self._closing = False

    def send(self, kind: Kind, request_id: int = 0, payload: Payload = b"",
             flags: Flag = Flag.NONE) -> None:
        """Write one frame from any thread; frames never interleave.

        A large frame holds the socket until it is written: calls sent meanwhile
        from other threads wait for it.
        """
        size = payload_size(payload)
        self.check_size(size, f"a {kind.name} message")
        if size <= JOIN_LIMIT:
            parts: tuple = (encode_frame(kind, request_id, payload, flags),)
        else:
            parts = (encode_header(kind, request_id, size, flags),) + (
                payload if isinstance(payload, tuple) else (payload,))
        with self._write_lock:
            try:
                for part in parts:
                    self.sock.sendall(part)
            except OSError as exc:
                raise ConnectionLost(f"connection to {self.peer} lost: {exc}") from exc
            except BaseException:  # e.g. Ctrl-C: part of a frame may have gone out,
                self._shutdown()   # and the stream cannot be resynchronised
                raise

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` now: sending is thread-safe, there is no loop to go to."""
        fn(*args)

    async def recv(self) -> Frame:
        """The next frame, during the handshake (the loop does not block meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._next_frame)

    def _next_frame(self) -> Frame:
        while not self._frames:
            self._frames.extend(self.decoder.feed(self._recv()))
        return self._frames.popleft()

    def _recv(self) -> memoryview:
        """The bytes of one read (valid until the next; the decoder copies them)."""
        try:
            size = self.sock.recv_into(self._buffer)
        except OSError as exc:
            raise ConnectionLost(f"connection to {self.peer} lost: {exc}") from exc
        if not size:
            raise self.end_of_stream()
        return self._buffer[:size]

    def start(self, receiver: Receiver, interval: float) -> None:
        """Start the reader thread (after the handshake)."""
        self._reader = threading.Thread(target=self._read, args=(receiver, interval),
                                        name=f"rpc-client-reader {self.peer}", daemon=True)
        self._reader.start()

    def _read(self, receiver: Receiver, interval: float) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        next_tick = time.monotonic() + interval
        try:
            while True:
                while self._frames:
                    receiver.receive(self._frames.popleft())
                wait = next_tick - time.monotonic()
                if wait <= 0:
                    next_tick = time.monotonic() + interval
                    if not receiver.tick():
                        return
                elif poller.poll(wait * 1000):
                    self._frames.extend(self.decoder.feed(self._recv()))
        except Exception as exc:
            receiver.fail(ConnectionLost("the connection was closed by this client")
                          if self._closing else _reading_error(exc))
        finally:
            self._shutdown()
            with self._write_lock:  # no sender holds the descriptor: it cannot be reused
                self.sock.close()

    def _shutdown(self) -> None:
        """Wake the reader and any blocked sender; both then see the connection end."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more, or already closed

    async def aclose(self) -> None:
        """Close the socket and wait for the reader thread to finish."""
        self._closing = True
        self._shutdown()
        if self._reader is None:  # the handshake failed: there is no reader to do it
            self.sock.close()
            return
        await asyncio.get_running_loop().run_in_executor(None, self._reader.join, 5.0)


def _reading_error(exc: Exception) -> RPCError:
    """Why reading ended, as the error the waiting calls get; call in ``except``."""
    if isinstance(exc, RPCError):
        return exc
    log.exception("RPC client reader failed")  # a bug: never leave callers waiting
    return ConnectionLost(f"the RPC client failed: {exc!r}")


def _describe(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "peer"
    return ":".join(map(str, peer[:2])) if isinstance(peer, tuple) else str(peer or "peer")
