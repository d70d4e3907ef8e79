"""Threads that take turns reading a server's socket: the one that reads a call runs it.

Over TCP and Unix sockets, a small call handed from the event loop to a pool
worker costs the server two thread wake-ups, more than all the rest of its work.
Here a few threads wait on the socket through one epoll instance, with the socket
registered EPOLLONESHOT: when bytes arrive the kernel wakes one of them, and no
other until that one re-arms the registration. The woken thread reads, decodes,
and acts on every frame it got; if one is a call it can run itself (a plain
function's, see ``Take``), it re-arms and runs it, then writes the reply, like
``multiprocessing.connection``'s single thread. Frames arriving meanwhile wake
another waiting thread. A small call costs one wake-up on each side, and nothing
is woken for nothing.

A thread whose work is done waits for its turn again; one that waits for
``IDLE_THREAD_LIFETIME`` seconds leaves, unless it is the last one waiting. The
threads of a connection number at most the calls it ran at once lately (bounded
by the server's worker slots), plus one.
"""
from __future__ import annotations

import logging
import select
import socket
import threading
from typing import Callable, Optional

from .errors import ConnectionLost
from .protocol import Frame
from .socketreader import SocketReader

log = logging.getLogger(__name__)

#: Called on the reading thread with each frame, in order, and whether this thread
#: is still free to run a call; returns the work this thread is to do, or None.
Take = Callable[[Frame, bool], Optional[Callable[[], None]]]

#: Threads must be able to wait on the socket together: Linux's epoll.
AVAILABLE = hasattr(select, "epoll") and hasattr(select, "EPOLLONESHOT")
#: A thread that waited this long for a turn leaves, unless no other one waits.
IDLE_THREAD_LIFETIME = 10.0


class TakingTurns:
    """Reads ``reader``'s socket from as many threads as there is work in progress.

    ``on_end(error)`` is called once, when the connection is over and no thread
    reads or waits on the socket any more (threads still running calls will not).
    """

    def __init__(self, reader: SocketReader, take: Take,
                 on_end: Callable[[BaseException], None], name: str) -> None:
        self._reader = reader
        self._take = take
        self._on_end = on_end
        self._name = name
        self._epoll = select.epoll()
        self._fd = reader.sock.fileno()
        self._epoll.register(self._fd, select.EPOLLIN | select.EPOLLONESHOT)
        self._state = threading.Lock()
        self._watching = 0  # threads waiting in epoll, or reading
        self._ended = False
        self._error: BaseException = ConnectionLost("the server closed the connection")
        self._reported = False

    def start(self) -> None:
        """Start the first thread: it acts at once on the frames decoded already."""
        if not self._spawn(holding_turn=bool(self._reader.frames)):
            self._end(ConnectionLost("no thread could be started to serve it"))
            self._leave()

    def stop(self) -> None:
        """End the connection (from any thread); ``on_end`` follows."""
        self._end(None)

    def _end(self, error: Optional[BaseException]) -> None:
        with self._state:
            if self._ended:
                return
            self._ended = True
            if error is not None:
                self._error = error
        try:  # readable for good from now on: waiting threads wake one after the other
            self._reader.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more

    def _spawn(self, holding_turn: bool = False) -> bool:
        try:
            threading.Thread(target=self._serve, args=(holding_turn,), name=self._name,
                             daemon=True).start()
            return True
        except RuntimeError as exc:  # no thread to be had: nobody reads until a call returns
            log.warning("cannot start a thread to read %s (%s); its frames wait until "
                        "the call in progress returns", self._reader.framing.peer, exc)
            return False

    def _serve(self, holding_turn: bool) -> None:
        while self._start_watching():
            if not holding_turn:
                while not self._epoll.poll(IDLE_THREAD_LIFETIME):
                    if self._ended:
                        break
                    if self._retire():
                        return
            holding_turn = False
            work = None if self._ended else self._read_work()
            self._rearm()  # the next frames (or the end) wake the next thread
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
        """Read and act on what has arrived; the work for this thread, if any."""
        reader = self._reader
        work: Optional[Callable[[], None]] = None
        try:
            while True:
                while reader.frames:
                    mine = self._take(reader.frames.popleft(), work is None)
                    work = work or mine
                if work is not None or not reader.read():
                    return work
        except BaseException as exc:  # the end of the stream, or garbage
            self._end(exc)
            return work

    def _rearm(self) -> None:
        try:
            self._epoll.modify(self._fd, select.EPOLLIN | select.EPOLLONESHOT)
        except (OSError, ValueError):
            pass  # the epoll is closed: the connection is over

    def _leave(self) -> None:
        """A thread leaves after the end; the last one out reports it."""
        with self._state:
            if self._reported or self._watching:
                return
            self._reported = True
            self._epoll.close()
        self._on_end(self._error)
