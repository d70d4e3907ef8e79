"""The sync driver: one protocol core over one blocking TCP or Unix socket, moved by
threads, with no event loop on the path of a call (both sides of a socket).

- Writing (:meth:`SyncDriver.run`, any thread): under the core lock, an operation
  changes the core and its output joins the outgoing queue; then the thread that
  holds the write lock sends the queue (``sendall``; large frames in slices). A
  thread that finds the write lock taken leaves its bytes to the holder, which
  sends them before it lets go, and goes on (it waits for the holder only if more
  than ``JOIN_LIMIT`` bytes are queued, and a reader never does): frames never
  interleave, go out in the core's order, and a reader never blocks behind a
  large write.
- Reading (:meth:`SyncDriver.read_once`): ``recv_into`` one buffer, fed to the core
  under the core lock, by whichever thread holds the turn. On the client
  (:class:`SyncClientDriver`, leader/follower) a thread waiting for its reply reads
  itself if nobody does, and delivers every event it reads, so the replies of
  other threads reach them too; when it has its own, it hands the turn to the
  first thread in line. A background thread reads when nobody else does and
  something still waits (a future from ``submit()``, ``acall``, a stream), and
  checks liveness while idle. On the server (:class:`SyncServerDriver`) the event
  loop reads the handshake, then reading threads take turns through epoll.
- Waking: a waiting client thread (follower, background) waits on its own
  ``threading.Event``, set by its reply's arrival or to hand it the turn; a
  server's reading threads wait in epoll, which wakes one of them.

Like ``multiprocessing.connection``, a small call costs one thread wake-up per side.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Deque, List, Optional, Protocol

from fileforward.loops import call_soon_if_open

from .aio import Receiver
from .errors import ConnectionLost, RPCError
from .frames import Buffer
from .protocol import JOIN_LIMIT, ClientProtocol, State, _Protocol

log = logging.getLogger(__name__)

#: Bytes asked of one ``recv``; one buffer, reused (a fresh large one per read would
#: be mapped and unmapped by malloc every time).
READ_SIZE = 1 << 18
#: The loop writes the handshake's few small frames with this timeout (seconds).
HANDSHAKE_SEND_TIMEOUT = 1.0
#: A server's reading thread that waited this long for a turn leaves, unless no other
#: one waits.
IDLE_THREAD_LIFETIME = 10.0
#: A large frame is sent in slices of this size; each slice the peer takes is a sign
#: of life (a live server may be busy reading a large argument for a long time).
SEND_SLICE = 1 << 20


class TickingReceiver(Receiver, Protocol):
    """What the sync driver serves (the client connection): a receiver that also
    checks liveness, which only the reading thread can do between its reads."""

    def tick(self) -> bool:
        """Periodic liveness check; False once the peer is presumed dead."""


class SyncDriver:
    """Moves the bytes of ``core`` over the blocking socket ``sock``, from any thread:
    the one way to write (:meth:`run`) and the one way to read (:meth:`read_once`)."""

    def __init__(self, core: _Protocol, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        #: When the peer last showed life (monotonic clock).
        self.last_activity = time.monotonic()
        #: Guards the core and the outgoing queue. Reentrant: a finalizer run by the
        #: garbage collector inside an operation (a dropped stream) may run another.
        self._core_lock = threading.RLock()
        self._outgoing: Deque[Buffer] = collections.deque()
        self._nesting = 0  # operations on the core in progress (in this one thread)
        self._write_lock = threading.Lock()
        self._writer: Optional[int] = None  # the thread holding _write_lock
        #: The thread reading now (one at a time: the subclasses see to it).
        self._reader: Optional[int] = None
        self._buffer = memoryview(bytearray(READ_SIZE))
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    # ------------------------------------------------------------ writing

    def run(self, op: Callable[..., Any], *args: Any) -> Any:
        """``op(*args)`` on the core, then send what it made the core send; returns
        what ``op`` returned. Raises ConnectionLost if the socket is broken."""
        try:
            with self._core_lock:
                self._nesting += 1
                try:
                    return op(*args)
                finally:
                    self._nesting -= 1
                    self._outgoing.extend(self.core.data_to_send())
                    if not self._nesting:  # else the outer operation sends it all
                        # the reading thread never waits for a writer: that writer may
                        # wait for the peer, which may wait for us to read
                        self._send_queued(wait=threading.get_ident() != self._reader)
        finally:
            self._sent()

    def _sent(self) -> None:
        """After an operation: what the reading side may need to do about it."""

    def _send_queued(self, wait: bool) -> None:
        """Send the outgoing queue, unless another thread holds the write lock: that one
        sends the queue before letting go, and this one waits for it only if it may
        (``wait``) and more than JOIN_LIMIT bytes are queued (back-pressure: a small
        reply or request is left to the holder, and its thread goes on at once).
        Called holding the core lock, which it releases around each ``sendall`` (and
        which the caller holds again on return)."""
        if not self._outgoing:  # (what this thread queued is never in another's hands)
            return
        me = threading.get_ident()
        if self._writer == me or not self._write_lock.acquire(False):
            if (not wait or self._writer == me
                    or sum(map(len, self._outgoing)) <= JOIN_LIMIT):
                return
            with _released(self._core_lock):  # never block on a writer holding the core
                self._write_lock.acquire()
        self._writer = me
        try:
            while self._outgoing:
                out = list(self._outgoing)
                self._outgoing.clear()
                with _released(self._core_lock):
                    self._sendall(out)
        finally:
            self._writer = None
            self._write_lock.release()

    def _sendall(self, out: List[Buffer]) -> None:
        try:
            if sum(map(len, out)) <= JOIN_LIMIT:
                self.sock.sendall(b"".join(out))
                return
            for buffer in out:
                view = memoryview(buffer).cast("B")
                for start in range(0, len(view), SEND_SLICE):
                    self.sock.sendall(view[start:start + SEND_SLICE])
                    self.last_activity = time.monotonic()
        except OSError as exc:  # what the peer never got: its requests fail
            log.warning("writing to %s failed, closing the connection: %s", self.core.peer, exc)
            self._shutdown()
            raise ConnectionLost(f"connection to {self.core.peer} lost: {exc}") from exc
        except BaseException:  # e.g. Ctrl-C: part of a frame may have gone out,
            self._shutdown()   # and the stream cannot be resynchronised
            raise

    # ------------------------------------------------------------ reading

    def read_once(self, wait: Optional[float]) -> Optional[List[Any]]:
        """As the reading thread: wait up to ``wait`` s for bytes, feed them to the core,
        send what it answers; returns its events, or None if nothing arrived. Raises
        RPCError at the end of the stream, or on garbage."""
        if wait != 0 and not self._poller.poll(None if wait is None else max(wait, 0) * 1000):
            return None
        try:  # not waiting (or told it is readable): no poll first, one system call
            size = self.sock.recv_into(self._buffer, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise ConnectionLost(f"connection to {self.core.peer} lost: {exc}") from exc
        with self._core_lock:
            self._nesting += 1
            try:
                if not size:
                    self.core.receive_eof()  # raises
                self.last_activity = time.monotonic()
                self.core.receive_data(self._buffer[:size])
            finally:
                self._nesting -= 1
                self._outgoing.extend(self.core.data_to_send())
                self._send_queued(wait=False)
            return self.core.events_received()

    def _shutdown(self) -> None:
        """Wake a blocked reader and any blocked sender; both see the end."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more, or already closed


class SyncClientDriver(SyncDriver):
    """The client's side: the threads waiting for replies read, one at a time
    (leader/follower), and a background thread reads for futures nobody waits on."""

    core: ClientProtocol

    def __init__(self, core: ClientProtocol, sock: socket.socket) -> None:
        super().__init__(core, sock)
        #: Held by the one thread that reads the socket.
        self._reading = threading.Lock()
        self._line: Deque[threading.Event] = collections.deque()  # followers, first first
        self._line_lock = threading.Lock()
        self._callers = 0  # threads inside attending(): they read for themselves
        self._background_wake = threading.Event()
        self._background: Optional[threading.Thread] = None
        self._receiver: Optional[TickingReceiver] = None
        self._interval = 1.0
        self._next_tick = 0.0
        self._closing = False
        self._ended = False

    def _sent(self) -> None:
        if self._callers == 0:  # no caller will read the reply: the background must
            self._pass_reading()

    def handshake(self, timeout: float) -> List[Any]:
        """Send the core's first frames and read until the handshake is over (the
        calling thread, before :meth:`start`); returns the events. Raises
        ``socket.timeout`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        events: List[Any] = []
        self.run(lambda: None)
        while self.core.state is State.HANDSHAKE:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"no handshake within {timeout:g} s")
            events += self.read_once(remaining) or []
        return events

    def start(self, receiver: TickingReceiver, interval: float) -> None:
        """After the handshake: deliver events to ``receiver``, tick every ``interval``."""
        self._receiver = receiver
        self._interval = interval
        self._next_tick = time.monotonic() + interval
        self._background = threading.Thread(target=self._serve_background,
                                            name=f"rpc-client-reader {self.core.peer}",
                                            daemon=True)
        self._background.start()

    def attending(self) -> "_Attendance":
        """Around a blocking call (request and :meth:`wait`): the caller reads for
        itself, so the background thread need not."""
        return _Attendance(self)

    def wait(self, future: cf.Future, timeout: Optional[float]) -> Any:
        """``future.result(timeout)``, reading the socket meanwhile if nobody else does.

        Call inside :meth:`attending`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        woken: Optional[threading.Event] = None
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if self._take_reading():
                    try:
                        if self._read_until(future.done, remaining):
                            break
                    finally:
                        self._leave_reading()
                elif future.done():
                    break
                elif woken is None:  # get in line, then look again at the reading
                    woken = threading.Event()
                    future.add_done_callback(lambda _: woken.set())  # type: ignore[union-attr]
                    with self._line_lock:
                        self._line.append(woken)
                else:
                    woken.wait(remaining)
                    woken.clear()  # whatever woke it is checked by the loop
                if deadline is not None and time.monotonic() >= deadline and not future.done():
                    raise cf.TimeoutError()
        finally:
            if woken is not None:
                with self._line_lock:
                    self._line.remove(woken)
                self._pass_reading()  # in case it was handed the reading as it left
        return future.result(0)

    def _take_reading(self) -> bool:
        """Become the reading thread, if no other is."""
        if not self._reading.acquire(blocking=False):
            return False
        self._reader = threading.get_ident()
        return True

    def _leave_reading(self) -> None:
        self._reader = None
        self._reading.release()
        self._pass_reading()

    def _pass_reading(self) -> None:
        """Wake the first thread in line to take over the reading, if it is free; with
        nobody in line, the background thread, if something still waits."""
        if self._reading.locked():
            return
        with self._line_lock:
            if self._line:
                self._line[0].set()
                return
        if self._callers == 0 and self.core.busy:
            self._background_wake.set()

    def _read_until(self, done: Callable[[], bool], timeout: Optional[float]) -> bool:
        """Holding the reading: deliver events until ``done()`` (then True), the
        timeout, or the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        assert self._receiver is not None
        while not self._ended:
            if done():
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            try:
                if now >= self._next_tick:
                    self._next_tick = now + self._interval
                    if not self._receiver.tick():
                        self._end(ConnectionLost("the server is presumed dead"))
                        return done()
                until = self._next_tick if deadline is None else min(self._next_tick, deadline)
                self._receiver.handle(self.read_once(until - now) or [])
            except Exception as exc:
                self._end(ConnectionLost("the connection was closed by this client")
                          if self._closing else _reading_error(exc))
        return done()

    def notice_end(self) -> None:
        """If nobody is reading, take in what has arrived, without waiting: a server
        that closed the connection (say, to restart) is noticed before the next call
        is sent into it, and can be reconnected to."""
        if self._ended or self._receiver is None or not self._take_reading():
            return
        try:
            self._receiver.handle(self.read_once(0) or [])
        except Exception as exc:
            self._end(_reading_error(exc))
        finally:
            self._leave_reading()

    def _serve_background(self) -> None:
        """Read while something waits that no caller reads for; tick while idle."""
        while not (self._ended or self._closing):
            self._background_wake.wait(max(self._next_tick - time.monotonic(), 0))
            self._background_wake.clear()
            if not self._take_reading():
                continue
            try:
                if self._callers == 0 and self.core.busy:
                    self._read_until(lambda: self._callers > 0 or not self.core.busy,
                                     self._interval)
                elif time.monotonic() >= self._next_tick:  # nobody reads for a reply
                    self._next_tick = time.monotonic() + self._interval
                    assert self._receiver is not None
                    if not self._receiver.tick():
                        self._end(ConnectionLost("the server is presumed dead"))
            finally:
                self._leave_reading()
        self._end(ConnectionLost("the connection was closed by this client"))
        with self._reading, self._write_lock:  # nobody uses the descriptor any more
            self.sock.close()

    def _end(self, error: RPCError) -> None:
        """The connection is over: fail what waits, wake every thread."""
        with self._line_lock:
            if self._ended:
                return
            self._ended = True
            line = list(self._line)
        with self._core_lock:
            self.core.close()
        assert self._receiver is not None
        self._receiver.fail(error)
        self._shutdown()
        self._background_wake.set()
        for woken in line:
            woken.set()

    def close(self) -> None:
        """Close the socket and wait for the background thread to finish."""
        self._closing = True
        self._shutdown()
        if self._background is None:  # the handshake failed: nothing else uses it
            self.sock.close()
            return
        self._background_wake.set()
        if self._background is not threading.current_thread():
            self._background.join(5.0)


class ServerReceiver(Receiver, Protocol):
    """What the sync driver serves on the server (the server's connection)."""

    def take(self, event: Any, free: bool) -> Optional[Callable[[], None]]:
        """Reading thread: act on one event; return the work this thread is to do
        (only if it is ``free``: one piece of work per turn), or None."""


class SyncServerDriver(SyncDriver):
    """The server's side. The handshake is read on the event loop (``add_reader``:
    no thread waits for a stranger). Then a few threads take turns reading through
    one epoll instance, with the socket registered EPOLLONESHOT: when bytes arrive
    the kernel wakes one of them, and no other until that one re-arms. The woken
    thread feeds the core and hands each event to the receiver's ``take``; if one is
    a call it can run itself, it re-arms, runs it and writes the reply, like
    ``multiprocessing.connection``'s single thread, while bytes arriving meanwhile
    wake another thread. A small call costs one wake-up, and nothing is woken for
    nothing. A thread that waits ``IDLE_THREAD_LIFETIME`` seconds for a turn leaves,
    unless it is the last one waiting.

    The receiver's ``handle`` and ``fail`` run on the event loop; ``fail`` once, when
    no thread reads or waits on the socket any more.
    """

    def __init__(self, core: _Protocol, sock: socket.socket, thread_name: str) -> None:
        super().__init__(core, sock)
        self.loop = asyncio.get_running_loop()
        self._thread_name = thread_name
        self._receiver: Optional[ServerReceiver] = None
        self._epoll: Optional[Any] = None  # made once authenticated
        self._state = threading.Lock()
        self._watching = 0  # threads waiting in epoll, or reading
        self._ended = False
        self._error: BaseException = ConnectionLost("the server closed the connection")
        self._reported = False
        self._left: "asyncio.Future[None]" = self.loop.create_future()
        sock.settimeout(HANDSHAKE_SEND_TIMEOUT)  # the loop writes the handshake

    def start(self, receiver: ServerReceiver) -> None:
        """Read the handshake on the loop (loop thread)."""
        self._receiver = receiver
        self.loop.add_reader(self.sock.fileno(), self._handshake_readable)

    def _handshake_readable(self) -> None:
        assert self._receiver is not None
        try:
            events = self.read_once(0)
            if events is None:
                return
            opened = self.core.state is State.OPEN
            if opened:
                self.loop.remove_reader(self.sock.fileno())
                self.sock.settimeout(None)
            self._receiver.handle(events)
        except Exception as exc:
            self._stop_handshake()
            self._report(exc)
            return
        if opened:
            self._start_threads()

    def _stop_handshake(self) -> None:
        if self._epoll is None and not self._reported:
            self.loop.remove_reader(self.sock.fileno())

    def _start_threads(self) -> None:
        self._epoll = select.epoll()
        self._epoll.register(self.sock.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
        if not self._spawn():
            self.stop(ConnectionLost("no thread could be started to serve it"))
            self._leave()

    def stop(self, error: Optional[BaseException] = None) -> None:
        """End the connection (from any thread); ``fail`` follows, once."""
        with self._state:
            if self._ended:
                return
            self._ended = True
            if error is not None:
                self._error = error
        self._shutdown()  # readable for good: waiting threads wake one after the other

    def _spawn(self) -> bool:
        try:
            threading.Thread(target=self._serve, name=self._thread_name, daemon=True).start()
            return True
        except RuntimeError as exc:  # no thread to be had: nobody reads until a call returns
            log.warning("cannot start a thread to read %s (%s); its frames wait until "
                        "the call in progress returns", self.core.peer, exc)
            return False

    def _serve(self) -> None:
        assert self._epoll is not None
        while self._start_watching():
            while not self._epoll.poll(IDLE_THREAD_LIFETIME):
                if self._ended:
                    break
                if self._retire():
                    return
            work = None if self._ended else self._read_work()
            self._rearm()  # the next bytes (or the end) wake the next thread
            alone = self._stop_watching()
            if work is not None:  # even after the end: it releases what it holds
                if alone and not self._ended:
                    self._spawn()
                work()
        self._leave()

    def _start_watching(self) -> bool:
        with self._state:
            if self._ended:
                return False
            self._watching += 1
            return True

    def _stop_watching(self) -> bool:
        """True if no other thread watches now."""
        with self._state:
            self._watching -= 1
            return self._watching == 0

    def _retire(self) -> bool:
        """After a long wait: leave (True) if another thread watches."""
        with self._state:
            if self._watching > 1 and not self._ended:
                self._watching -= 1
                return True
            return False

    def _read_work(self) -> Optional[Callable[[], None]]:
        """Read and hand over what has arrived; the work for this thread, if any."""
        assert self._receiver is not None
        work: Optional[Callable[[], None]] = None
        self._reader = threading.get_ident()
        try:
            while work is None:
                events = self.read_once(0)
                if events is None:
                    break
                for event in events:
                    mine = self._receiver.take(event, work is None)
                    work = work or mine
        except BaseException as exc:  # the end of the stream, or garbage
            self.stop(exc)
        finally:
            self._reader = None
        return work

    def _rearm(self) -> None:
        try:
            self._epoll.modify(self.sock.fileno(),  # type: ignore[union-attr]
                               select.EPOLLIN | select.EPOLLONESHOT)
        except (OSError, ValueError):
            pass  # the epoll is closed: the connection is over

    def _leave(self) -> None:
        """A thread leaves after the end; the last one out reports it."""
        with self._state:
            if self._reported or self._watching:
                return
            self._epoll.close()  # type: ignore[union-attr]
        call_soon_if_open(self.loop, self._report, self._error)  # closed: the server has stopped

    def _report(self, error: BaseException) -> None:
        """Loop thread: tell the receiver, once, that the connection is over."""
        if self._reported:
            return
        self._reported = True
        with self._core_lock:
            self.core.close()
        assert self._receiver is not None
        self._receiver.fail(error)
        self._left.set_result(None)

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop reading, wait for the reading threads to leave, close the socket."""
        if self._epoll is None:  # still in the handshake
            self._stop_handshake()
            if not self._reported:
                self._report(ConnectionLost("the connection was closed by this side"))
        else:
            self.stop()
            await asyncio.wait({self._left}, timeout=grace)
        with self._write_lock:  # no thread is writing to it any more
            self.sock.close()


class _Attendance:
    """``with driver.attending():`` (a class: cheaper than a generator, per call)."""

    __slots__ = ("_driver",)

    def __init__(self, driver: SyncClientDriver) -> None:
        self._driver = driver

    def __enter__(self) -> None:
        with self._driver._line_lock:
            self._driver._callers += 1

    def __exit__(self, *exc_info: Any) -> None:
        driver = self._driver
        with driver._line_lock:
            driver._callers -= 1
        driver._pass_reading()  # the background thread is needed if something waits


class _released:
    """``with _released(lock):`` let go of a held lock for a while."""

    __slots__ = ("_lock",)

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.release()

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.acquire()


def describe_socket(sock: socket.socket) -> str:
    """A short name for log messages: the peer address, or where it connected."""
    try:
        peer = sock.getpeername()
        if isinstance(peer, tuple):
            return ":".join(map(str, peer[:2]))
        return str(peer) if peer else f"peer on {sock.getsockname()}"
    except OSError:
        return "peer"


def _reading_error(exc: Exception) -> RPCError:
    """Why reading ended, as the error the waiting calls get; call in ``except``."""
    if isinstance(exc, RPCError):
        return exc
    log.exception("RPC client reader failed")  # a bug: never leave callers waiting
    return ConnectionLost(f"the RPC client failed: {exc!r}")
