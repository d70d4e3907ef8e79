"""The client: one authenticated connection, usable from any thread.

The rules (request ids, which replies are expected, credit) are the protocol
core's (:class:`~rpc.protocol.ClientProtocol`); the core is touched only through
its driver, under the driver's lock (sockets: :mod:`rpc.sync`) or on the driver's
event loop (the tunnel and pipes: :mod:`rpc.aio`, on a loop thread of its own), so
the client's shared state is safe on free-threaded Python. Each request's outcome
arrives through a ``concurrent.futures.Future``, so the blocking front-end and
``acall`` share this one implementation.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import contextlib
import logging
import socket
import threading
import time
from typing import (Any, Callable, ContextManager, Coroutine, Deque, List, NoReturn, Optional,
                    Tuple, Union)

from .aio import AioDriver
from .auth import load_key
from .errors import ConnectionLost, ProtocolError, RPCError, SerializationError, ServerNotRunningError
from .frames import Buffer, Kind, Payload, loads, payload_size, unpack_error
from .protocol import ClientProtocol, Opened, Replied, StreamEnded, StreamItem, StreamOpened
from .sync import SyncClientDriver, describe_socket
from .transports import SOCKET_KINDS, Child, Endpoint, connect_socket, open_transport

log = logging.getLogger(__name__)

Driver = Union[AioDriver, SyncClientDriver]


class ClientConnection:
    """Requests, replies and streams of one connection to a server."""

    def __init__(self, driver: Driver, *, liveness_timeout: float,
                 loop_thread: Optional["LoopThread"] = None,
                 process: Optional[Child] = None) -> None:
        self.driver = driver
        self.core: ClientProtocol = driver.core  # type: ignore[assignment]
        self.liveness_timeout = liveness_timeout
        self._loop_thread = loop_thread
        self._process = process
        self._opened: cf.Future = cf.Future()
        self._error: Optional[RPCError] = None
        self._error_lock = threading.Lock()
        #: Until when nothing waited for the server: silence before it proves nothing.
        self._idle_until = time.monotonic()
        self._beat: Optional[asyncio.Task] = None

    @classmethod
    def open(cls, ep: Endpoint, *, key_file: Any, connect_timeout: float,
             liveness_timeout: float, max_frame: int, stream_window: int) -> "ClientConnection":
        """Connect to ``ep`` and authenticate (blocking)."""
        log.debug("connecting to %s", ep)
        core = ClientProtocol(lambda: load_key(key_file), max_frame=max_frame,
                              stream_window=stream_window, hostname=socket.gethostname())
        if ep.kind not in SOCKET_KINDS:
            loop_thread = LoopThread()
            try:
                return loop_thread.run(cls._open_aio(
                    ep, core, loop_thread, connect_timeout, liveness_timeout))
            except BaseException:
                loop_thread.stop()
                raise
        sock = connect_socket(ep, connect_timeout)
        core.peer = describe_socket(sock)
        driver = SyncClientDriver(core, sock)
        conn = cls(driver, liveness_timeout=liveness_timeout)
        try:
            conn.handle(driver.handshake(connect_timeout))
        except BaseException as exc:
            driver.close()
            _raise_handshake_error(exc, ep, connect_timeout, None)
        driver.start(conn, liveness_timeout / 4)
        return conn

    @classmethod
    async def _open_aio(cls, ep: Endpoint, core: ClientProtocol, loop_thread: "LoopThread",
                        connect_timeout: float, liveness_timeout: float) -> "ClientConnection":
        driver = AioDriver(core)
        process = await open_transport(ep, lambda: driver, connect_timeout, liveness_timeout)
        conn = cls(driver, liveness_timeout=liveness_timeout, loop_thread=loop_thread,
                   process=process)
        driver.start(conn)
        try:
            await asyncio.wait_for(asyncio.wrap_future(conn._opened), connect_timeout)
        except BaseException as exc:
            await driver.aclose(1.0)
            if process is not None:
                await process.reap(1.0)
            _raise_handshake_error(exc, ep, connect_timeout, process)
        if ep.kind != "tunnel":  # the tunnel watches the server's endpoint itself: see below
            conn._beat = asyncio.ensure_future(conn._beat_on_loop(liveness_timeout / 4))
        return conn

    # ------------------------------------------------------------ any thread

    @property
    def error(self) -> Optional[RPCError]:
        """Why the connection is unusable, or None while it works (a server that
        closed the connection is noticed here)."""
        if self._error is None and isinstance(self.driver, SyncClientDriver):
            self.driver.notice_end()
        return self._error

    def request(self, kind: Kind, payload: Payload, what: str) -> cf.Future:
        """Send a CALL or INFO; the future gets the value, a stream or the error.

        Cancelling the future cancels the call on the server.
        """
        self.core.check_size(payload_size(payload), what)
        if self._error is not None:
            raise _fresh(self._error)
        future = _Request(self)
        try:
            self.driver.run(self._send_request, future, kind, payload, what)
        except RPCError as exc:  # the socket broke: the reader fails the rest
            _settle(future, error=exc)
        return future

    def attending(self) -> ContextManager[None]:
        """Around a blocking call: its thread may read its reply itself (sockets)."""
        if isinstance(self.driver, SyncClientDriver):
            return self.driver.attending()
        return contextlib.nullcontext()

    def wait(self, future: cf.Future, timeout: Optional[float]) -> Any:
        """``future.result(timeout)`` of a request made inside :meth:`attending`."""
        if isinstance(self.driver, SyncClientDriver):
            return self.driver.wait(future, timeout)
        return future.result(timeout)

    def cancel(self, request: "_Request") -> None:
        """Give up on a request (or its stream): CANCEL, unless it is over already."""
        try:
            self.driver.run(self._cancel, request)
        except RPCError:
            pass  # the connection is gone: nothing runs on the server any more

    def grant(self, request: "_Request", count: int) -> None:
        """The application consumed ``count`` items: the server may send more."""
        try:
            self.driver.run(self._grant, request, count)
        except RPCError:
            pass

    # ------------------------------------------------------------ where the driver runs

    def _send_request(self, future: "_Request", kind: Kind, payload: Payload,
                      what: str) -> None:
        if future.cancelled():
            return
        try:
            if kind is Kind.CALL:
                future.request_id = self.core.call(payload, future, what)
            else:
                future.request_id = self.core.info(future)
        except RPCError as exc:
            _settle(future, error=exc)

    def _cancel(self, request: "_Request") -> None:
        if request.request_id is not None:
            self.core.cancel(request.request_id)

    def _grant(self, request: "_Request", count: int) -> None:
        if request.request_id is not None:
            self.core.grant(request.request_id, count)

    # ------------------------------------------------------------ the driver's reader

    def handle(self, events: List[Any]) -> None:
        """Deliver replies, stream items and errors to whoever waits for them."""
        for event in events:
            kind = type(event)
            if kind is Replied:
                self._settle_reply(event)
            elif kind is StreamItem:
                event.token.stream.push(Kind.STREAM_ITEM, event.payload)
            elif kind is StreamEnded:
                if event.error is None:
                    event.token.stream.push(Kind.STREAM_END, b"")
                else:
                    event.token.stream.push(Kind.ERROR, event.error)
            elif kind is StreamOpened:
                request = event.token
                request.stream = RemoteStream(self, request)
                if request.cancelled():  # while the reply was on its way
                    self.driver.run(self.core.cancel, event.request_id)
                else:
                    _settle(request, value=request.stream)
            elif kind is Opened:
                _settle(self._opened, value=event.hello)

    def _settle_reply(self, event: Replied) -> None:
        try:
            if event.ok:
                _settle(event.token, value=_decode(loads, event.payload, "the result"))
            else:
                _settle(event.token, error=_decode(unpack_error, event.payload, "an error"))
        except SerializationError as exc:
            _settle(event.token, error=exc)

    def tick(self) -> bool:
        """While calls wait, ping the server; False once it stayed silent too long.

        Not over the tunnel: its endpoints prove to each other that they live
        (``fileforward.peers``) and reset the connections of one that stops, within the
        same ``liveness_timeout``. A ping there would only cost the file server a
        message each way every ``liveness_timeout / 4``, and make both sides poll
        that connection for a while after it: the idle cost of a pool's workers,
        whose ``take`` always waits."""
        now = time.monotonic()
        if not self.core.busy:
            self._idle_until = now
        elif now - max(self._idle_until, self.driver.last_activity) > self.liveness_timeout:
            self.fail(ConnectionLost(
                f"the server sent nothing for {self.liveness_timeout:g} s, not even "
                f"an answer to a ping; it is presumed dead"))
            return False
        else:
            try:
                self.driver.run(self.core.ping)
            except RPCError:
                pass  # the reader sees the end too
        return True

    async def _beat_on_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not self.tick():
                await self.driver.aclose()  # type: ignore[union-attr]
                return

    def fail(self, error: BaseException) -> None:
        """Mark the connection dead and fail every request and stream in flight."""
        if not isinstance(error, RPCError):
            error = ConnectionLost(f"the connection failed: {error!r}")
        with self._error_lock:
            if self._error is not None:
                return
            self._error = error
        _settle(self._opened, error=error)
        waiting = self.driver.run(self.core.abandon) or []
        for request in waiting:
            if request.stream is not None:
                request.stream.push(None, _fresh(error))
            else:
                _settle(request, error=_fresh(error))
        if waiting:
            log.warning("RPC connection lost with %d calls in flight: %s", len(waiting), error)

    def close(self) -> None:
        """Close the connection; calls still in flight fail with ConnectionLost."""
        if isinstance(self.driver, SyncClientDriver):
            self.driver.close()
            return
        assert self._loop_thread is not None
        try:
            self._loop_thread.run(self._aclose(), timeout=10.0)
        finally:
            self._loop_thread.stop()

    async def _aclose(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        await self.driver.aclose()  # type: ignore[union-attr]
        if self._process is not None:
            await self._process.reap(5.0)


class RemoteStream:
    """The items of a remote generator, as they arrive: iterate it, sync or async.

    The server sends at most ``stream_window`` items ahead of what this side has
    consumed. Closing the stream (or dropping it) cancels the generator remotely.
    """

    def __init__(self, conn: ClientConnection, request: "_Request",
                 timeout: Optional[float] = None) -> None:
        self._conn = conn
        self._request = request
        #: Seconds to wait for each item (None: no limit); set by the caller.
        self.timeout = timeout
        self._lock = threading.Lock()
        self._items: Deque[Tuple[Optional[Kind], Any]] = collections.deque()
        self._waiter: Optional[cf.Future] = None
        self._consumed = 0
        self._finished = False

    def push(self, kind: Optional[Kind], payload: Any) -> None:
        """Deliver a frame (or, with kind None, a connection error); reading thread."""
        with self._lock:
            self._items.append((kind, payload))
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _settle(waiter, value=None)

    def _arrival(self) -> Optional[cf.Future]:
        """None if an item is ready, else a future that is set when one arrives."""
        with self._lock:
            if self._items:
                return None
            self._waiter = cf.Future()
            return self._waiter

    def _next_item(self, end: type) -> Any:
        with self._lock:
            kind, payload = self._items.popleft()
        if kind is Kind.STREAM_ITEM:
            self._consumed += 1
            if self._consumed * 2 >= self._conn.core.stream_window:  # half the window
                self._conn.grant(self._request, self._consumed)
                self._consumed = 0
            return _decode(loads, payload, "a streamed item")
        self._finished = True
        if kind is Kind.STREAM_END:
            raise end
        raise payload if kind is None else _decode(unpack_error, payload, "an error")

    def _timed_out(self) -> TimeoutError:
        self.close()
        return TimeoutError(f"no streamed item arrived within {self.timeout:g} s; "
                            f"the generator was cancelled on the server")

    def __iter__(self) -> "RemoteStream":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        arrival = self._arrival()
        if arrival is not None:
            try:
                arrival.result(self.timeout)
            except cf.TimeoutError:
                raise self._timed_out() from None
            except BaseException:  # KeyboardInterrupt: stop the generator remotely
                self.close()
                raise
        return self._next_item(StopIteration)

    def __aiter__(self) -> "RemoteStream":
        return self

    async def __anext__(self) -> Any:
        if self._finished:
            raise StopAsyncIteration
        arrival = self._arrival()
        if arrival is not None:
            waiting = asyncio.wrap_future(arrival)
            try:
                done, _ = await asyncio.wait({waiting}, timeout=self.timeout)
            except asyncio.CancelledError:
                self.close()
                raise
            if not done:
                raise self._timed_out()
        return self._next_item(StopAsyncIteration)

    def close(self) -> None:
        """Stop consuming; the generator is cancelled on the server."""
        if not self._finished:
            self._finished = True
            self._conn.cancel(self._request)

    async def aclose(self) -> None:
        """Same as :meth:`close` (for ``async for`` users and contextlib.aclosing)."""
        self.close()

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class _Request(cf.Future):
    """The future of one request: cancelling it cancels the call on the server."""

    def __init__(self, conn: ClientConnection) -> None:
        super().__init__()
        self._conn = conn
        #: Set where the driver runs, when the request is sent.
        self.request_id: Optional[int] = None
        #: Set when the reply says the result is a stream.
        self.stream: Optional[RemoteStream] = None

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._conn.cancel(self)
        return True


class LoopThread:
    """An event loop running in a daemon thread, owned by one client connection over
    the tunnel or a pipe, so that the blocking API works in plain scripts, from many
    threads, and inside Jupyter (whose own loop already runs in the calling thread)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever,
                                        name="rpc-client-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: Optional[float] = None) -> Any:
        """Run ``coro`` on the loop and wait for its result in this thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Cancel what still runs on the loop (e.g. a connect interrupted by Ctrl-C:
        it must end, not be destroyed pending), then stop the loop and its thread."""
        if threading.current_thread() is not self._thread:
            try:
                self.run(_cancel_other_tasks(), timeout=5.0)
            except (cf.TimeoutError, RuntimeError):
                pass  # a task that ignores cancellation is left behind
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
            if not self.loop.is_running():
                self.loop.close()


async def _cancel_other_tasks() -> None:
    others = asyncio.all_tasks() - {asyncio.current_task()}
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def _raise_handshake_error(exc: BaseException, ep: Endpoint, connect_timeout: float,
                           process: Optional[Child]) -> NoReturn:
    """Raise what a failed handshake means to the user (call in ``except``)."""
    if isinstance(exc, (asyncio.TimeoutError, socket.timeout)):
        raise ServerNotRunningError(
            f"{ep} accepted the connection but did not complete the handshake "
            f"within {connect_timeout:g} s") from None
    if isinstance(exc, ConnectionLost) and not isinstance(exc, ProtocolError):
        detail = f" (exit code {process.returncode})" if process else ""
        raise ServerNotRunningError(
            f"{ep} closed the connection during the handshake{detail}") from exc
    raise exc


def _settle(future: cf.Future, *, value: Any = None, error: Optional[BaseException] = None
            ) -> None:
    """Complete a future unless the caller cancelled it meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except cf.InvalidStateError:
        pass


def _decode(fn: Callable[[Buffer], Any], payload: Buffer, what: str) -> Any:
    try:
        return fn(payload)
    except Exception as exc:
        raise SerializationError(f"cannot unpickle {what} sent by the server: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _fresh(error: RPCError) -> RPCError:
    """A new exception like ``error``, so that many callers do not share tracebacks."""
    clone = type(error)(str(error))
    clone.__cause__ = error.__cause__
    return clone
