"""The client's socket driver: a call's own thread writes the request and reads the reply.

Over TCP and Unix sockets no event loop sits on the path of a call. The calling
thread writes its request frame (under a lock, so frames never interleave), then,
if no other thread is reading, becomes the reader itself until its reply is in:
like ``multiprocessing.connection``, a call costs the server's work plus two
thread wake-ups, not four. Every frame it reads is delivered, so replies to other
threads reach them too; when it leaves, a waiting caller takes over the reading.

A background thread reads only when nobody else does and something waits (a
future from ``submit()``, ``acall``, a stream), and checks liveness while idle.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import socket
import threading
import time
from typing import Any, Callable, ContextManager, Deque, List, Optional, Tuple

from .framing import Framing
from .errors import ConnectionLost, RPCError
from .links import Receiver, reading_error
from .protocol import Flag, Frame, Kind, Payload, encode_frame, encode_header, payload_size
from .socketreader import SocketReader

#: Frames up to this size are joined and sent with one system call; larger ones are
#: sent part by part, so that a large argument is never copied.
JOIN_LIMIT = 1 << 16
#: A large frame is sent in slices of this size; each slice the peer takes is a sign
#: of life (a live server may be busy reading a large argument for a long time).
SEND_SLICE = 1 << 20


class SocketLink(Framing):
    """Frames over a blocking socket, sent and read by the threads that wait for them.

    Before :meth:`start` (during the handshake) frames are read with :meth:`recv`,
    a coroutine, like a :class:`~rpc.channel.Channel`'s.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(_describe(sock))
        self.sock = sock
        self._write_lock = threading.Lock()
        self._writer: Optional[int] = None  # the thread holding _write_lock
        self._deferred: List[Tuple[Callable[..., None], tuple]] = []
        self._input = SocketReader(sock, self)
        #: Held by the one thread that reads the socket.
        self._reading = threading.Lock()
        #: Where the background reader waits until it is needed. Reentrant: a
        #: finalizer run by the garbage collector under it may send (and notify).
        self._turn = threading.Condition()
        #: Callers waiting for their reply while another thread reads, first in line
        #: first; each is woken alone: by its reply, or to take over the reading.
        self._followers: Deque[threading.Event] = collections.deque()
        self._callers = 0  # threads inside attending(): they read for themselves
        self._receiver: Optional[Receiver] = None
        self._interval = 1.0
        self._next_tick = 0.0
        self._background: Optional[threading.Thread] = None
        self._closing = False
        self._ended = False
        self._attendance = _Attendance(self)

    # ------------------------------------------------------------ sending

    def send(self, kind: Kind, request_id: int = 0, payload: Payload = b"",
             flags: Flag = Flag.NONE, wait: bool = True) -> None:
        """Write one frame from any thread; frames never interleave.

        A large frame holds the socket until it is written: calls sent meanwhile
        from other threads wait for it (with ``wait=False``, the frame is dropped).
        """
        size = payload_size(payload)
        self.check_size(size, f"a {kind.name} message")
        if size <= JOIN_LIMIT:
            parts: tuple = (encode_frame(kind, request_id, payload, flags),)
        else:
            parts = (encode_header(kind, request_id, size, flags),) + (
                payload if isinstance(payload, tuple) else (payload,))
        if not self._write_lock.acquire(wait):
            return
        try:
            self._writer = threading.get_ident()
            try:
                if size <= JOIN_LIMIT:
                    self.sock.sendall(parts[0])
                else:
                    self._send_slices(parts)
            except OSError as exc:
                raise ConnectionLost(f"connection to {self.peer} lost: {exc}") from exc
            except BaseException:  # e.g. Ctrl-C: part of a frame may have gone out,
                self._shutdown()   # and the stream cannot be resynchronised
                raise
            finally:
                self._writer = None
                self._write_lock.release()
        finally:
            while self._deferred:
                fn, args = self._deferred.pop(0)
                fn(*args)
        if self._callers == 0:  # no caller will read the reply: the background must
            self._notify()

    def _send_slices(self, parts: Tuple[Payload, ...]) -> None:
        """A large frame, slice by slice: each slice sent is a sign of life."""
        for part in parts:
            view = memoryview(part).cast("B")
            for start in range(0, len(view), SEND_SLICE):
                self.sock.sendall(view[start:start + SEND_SLICE])
                self.saw_activity()

    def ping(self) -> None:
        """Send a PING, unless a frame is being written (the PING would wait behind it:
        liveness then rests on that frame's progress)."""
        self.send(Kind.PING, wait=False)

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` now (sending is thread-safe, there is no loop to go to);
        if this thread is in the middle of writing a frame (a finalizer, such as a
        dropped stream's, run by the garbage collector), right after that frame."""
        if self._writer == threading.get_ident():
            self._deferred.append((fn, args))
            return
        fn(*args)

    # ------------------------------------------------------------ handshake

    async def recv(self) -> Frame:
        """The next frame, during the handshake (the loop does not block meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._input.next_frame)

    # ------------------------------------------------------------ reading

    def start(self, receiver: Receiver, interval: float) -> None:
        """After the handshake: deliver frames to ``receiver``, tick every ``interval``."""
        self._receiver = receiver
        self._interval = interval
        self._next_tick = time.monotonic() + interval
        self._background = threading.Thread(target=self._serve_background,
                                            name=f"rpc-client-reader {self.peer}",
                                            daemon=True)
        self._background.start()

    def attending(self) -> ContextManager[None]:
        """Around a blocking call (request and :meth:`wait`): the caller reads for
        itself, so the background reader must not take the socket meanwhile."""
        return self._attendance

    def _arrive(self) -> None:
        with self._turn:
            self._callers += 1

    def _leave(self) -> None:
        with self._turn:
            self._callers -= 1
            if self._callers == 0 and self._receiver is not None and self._receiver.busy():
                self._turn.notify_all()  # the background reader is needed now

    def wait(self, future: cf.Future, timeout: Optional[float]) -> Any:
        """``future.result(timeout)``, reading the socket meanwhile if nobody else does.

        Call inside :meth:`attending`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        woken: Optional[threading.Event] = None
        try:
            while not future.done():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise cf.TimeoutError()
                if self._reading.acquire(blocking=False):
                    try:
                        self._read_until(future.done, remaining)
                    finally:
                        self._reading.release()
                        self._pass_reading()
                elif woken is None:  # get in line, then look again at the reading
                    woken = threading.Event()
                    future.add_done_callback(lambda _: woken.set())  # type: ignore[union-attr]
                    with self._turn:
                        self._followers.append(woken)
                else:
                    woken.wait(remaining)
                    woken.clear()  # whatever woke it is checked by the loop
        finally:
            if woken is not None:
                with self._turn:
                    self._followers.remove(woken)
                self._pass_reading()  # in case it was handed the reading as it left
        return future.result(0)

    def _pass_reading(self) -> None:
        """Wake the first caller in line to take over the reading, if it is free."""
        if self._followers and not self._reading.locked():
            with self._turn:
                if self._followers:
                    self._followers[0].set()

    def _read_until(self, done: Callable[[], bool], timeout: Optional[float]) -> None:
        """Read and deliver frames until ``done()``, the timeout, or the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        assert self._receiver is not None
        while not (done() or self._ended):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            try:
                if now >= self._next_tick:
                    self._next_tick = now + self._interval
                    if not self._receiver.tick():
                        self._end(ConnectionLost("the server is presumed dead"))
                        return
                self._read_once(self._next_tick - now if deadline is None else min(
                    self._next_tick, deadline) - now)
            except Exception as exc:
                self._reading_failed(exc)
                return

    def _read_once(self, wait: float) -> None:
        """Holding the reading: wait up to ``wait`` s for bytes, then deliver the frames."""
        assert self._receiver is not None
        if self._input.wait(wait):
            self._input.read()
        while self._input.frames:
            self._receiver.receive(self._input.frames.popleft())

    def _reading_failed(self, exc: Exception) -> None:
        """Call in ``except``: reading ended with ``exc``."""
        self._end(ConnectionLost("the connection was closed by this client")
                  if self._closing else reading_error(exc))

    def notice_end(self) -> None:
        """If nobody is reading, take in what has arrived now, without waiting: a
        server that closed the connection (say, to restart) is noticed before the
        next call is sent into it, and can be reconnected to."""
        if self._ended or self._receiver is None or not self._reading.acquire(blocking=False):
            return
        try:
            self._read_once(0)
        except Exception as exc:
            self._reading_failed(exc)
        finally:
            self._reading.release()
            self._pass_reading()

    def _serve_background(self) -> None:
        """Read while something waits that no caller reads for; tick while idle."""
        assert self._receiver is not None
        receiver = self._receiver

        def needed() -> bool:
            return self._ended or self._closing or (
                self._callers == 0 and receiver.busy() and not self._reading.locked())

        while not (self._ended or self._closing):
            with self._turn:
                self._turn.wait_for(needed, max(self._next_tick - time.monotonic(), 0))
            if self._reading.acquire(blocking=False):
                try:
                    if self._callers == 0 and receiver.busy():
                        self._read_until(lambda: self._callers > 0 or not receiver.busy(),
                                         self._interval)
                    elif time.monotonic() >= self._next_tick:  # nobody reads for a reply
                        self._next_tick = time.monotonic() + self._interval
                        if not receiver.tick():  # wakes a caller blocked sending, too
                            self._end(ConnectionLost("the server is presumed dead"))
                finally:
                    self._reading.release()
                    self._pass_reading()
        self._end(ConnectionLost("the connection was closed by this client"))
        with self._reading, self._write_lock:  # nobody uses the descriptor any more
            self.sock.close()

    def _end(self, error: RPCError) -> None:
        """The connection is over: fail what waits, wake every thread."""
        with self._turn:
            if self._ended:
                return
            self._ended = True
        assert self._receiver is not None
        self._receiver.fail(error)
        self._shutdown()
        self._notify()

    def _notify(self) -> None:
        with self._turn:
            self._turn.notify_all()

    def _shutdown(self) -> None:
        """Wake a blocked reader and any blocked sender; both see the end."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more, or already closed

    async def aclose(self) -> None:
        """Close the socket and wait for the background reader to finish."""
        self._closing = True
        self._shutdown()
        if self._background is None:  # the handshake failed: nothing else uses it
            self.sock.close()
            return
        self._notify()
        await asyncio.get_running_loop().run_in_executor(None, self._background.join, 5.0)


class _Attendance:
    """``with link.attending():`` (a class: cheaper than a generator, per call)."""

    __slots__ = ("_link",)

    def __init__(self, link: SocketLink) -> None:
        self._link = link

    def __enter__(self) -> None:
        self._link._arrive()

    def __exit__(self, *exc_info: Any) -> None:
        self._link._leave()


def _describe(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "peer"
    return ":".join(map(str, peer[:2])) if isinstance(peer, tuple) else str(peer or "peer")
