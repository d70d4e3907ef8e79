"""The client core: one authenticated connection, usable from any thread.

Frames move through a link (``links.py``): on the connection's event loop, or,
for sockets, straight from the calling thread and a reader thread. Requests may
start from any thread; each outcome arrives through a
``concurrent.futures.Future``, so the blocking front-end and ``acall`` share this
one implementation.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import itertools
import logging
import threading
import time
from typing import Any, Callable, ContextManager, Deque, Dict, Optional, Tuple, Union

from .auth import load_key
from .channel import Channel
from .errors import (ConnectionLost, ProtocolError, RPCError, SerializationError,
                     ServerNotRunningError)
from .handshake import client_handshake
from .protocol import (Buffer, Flag, Frame, Kind, Payload, encode_credit, loads,
                       payload_size, unpack_error)
from .links import LoopLink
from .socketlink import SocketLink
from .transports import SOCKET_KINDS, Endpoint, connect_socket, open_streams

log = logging.getLogger(__name__)


class ClientConnection:
    """Requests, replies and streams of one connection to a server."""

    def __init__(self, link: Union[LoopLink, SocketLink], hello: Dict[str, Any], *,
                 liveness_timeout: float, stream_window: int,
                 process: Optional[asyncio.subprocess.Process] = None) -> None:
        self.link = link
        self.server_hello = hello
        self.liveness_timeout = liveness_timeout
        self.stream_window = max(2, stream_window)
        self._process = process
        self._lock = threading.Lock()
        self._pending: Dict[int, cf.Future] = {}
        self._streams: Dict[int, "RemoteStream"] = {}
        self._ids = itertools.count(1)
        self._error: Optional[RPCError] = None
        #: Until when nothing waited for the server: silence before it proves nothing.
        self._idle_until = time.monotonic()
        link.start(self, liveness_timeout / 4)

    @classmethod
    async def open(cls, ep: Endpoint, *, key_file: Any, connect_timeout: float,
                   liveness_timeout: float, max_frame: int,
                   stream_window: int) -> "ClientConnection":
        """Connect to ``ep`` and authenticate; runs on the connection's loop."""
        process = None
        channel: Union[Channel, SocketLink]
        if ep.kind in SOCKET_KINDS:
            channel = SocketLink(await connect_socket(ep, connect_timeout))
        else:
            reader, writer, process = await open_streams(ep, connect_timeout,
                                                         liveness_timeout)
            channel = Channel(reader, writer)
        try:
            hello = await asyncio.wait_for(
                client_handshake(channel, lambda: load_key(key_file), max_frame),
                connect_timeout)
        except BaseException as exc:
            await channel.aclose()
            if process is not None:
                await _reap(process, 1.0)
            if isinstance(exc, asyncio.TimeoutError):
                raise ServerNotRunningError(
                    f"{ep} accepted the connection but did not complete the handshake "
                    f"within {connect_timeout:g} s") from None
            if isinstance(exc, ConnectionLost) and not isinstance(exc, ProtocolError):
                detail = f" (exit code {process.returncode})" if process else ""
                raise ServerNotRunningError(
                    f"{ep} closed the connection during the handshake{detail}") from exc
            raise
        link = channel if isinstance(channel, SocketLink) else LoopLink(channel)
        return cls(link, hello, liveness_timeout=liveness_timeout,
                   stream_window=stream_window, process=process)

    # ------------------------------------------------------------ any thread

    @property
    def error(self) -> Optional[RPCError]:
        """Why the connection is unusable, or None while it works (a server that
        closed the connection is noticed here)."""
        if self._error is None:
            self.link.notice_end()
        return self._error

    def request(self, kind: Kind, payload: Payload, what: str) -> cf.Future:
        """Send a CALL or INFO; the future gets the value, a stream or the error.

        Cancelling the future cancels the call on the server.
        """
        self.link.check_size(payload_size(payload), what)
        with self._lock:
            if self._error is not None:
                raise _fresh(self._error)
            request_id = next(self._ids)
            future = self._pending[request_id] = _Request(self, request_id)
        self.soon(self._send_request, kind, request_id, payload)
        return future

    def attending(self) -> ContextManager[None]:
        """Around a blocking call: its thread may read its reply itself (sockets)."""
        return self.link.attending()

    def wait(self, future: cf.Future, timeout: Optional[float]) -> Any:
        """``future.result(timeout)`` of a request made inside :meth:`attending`."""
        return self.link.wait(future, timeout)

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` where the link sends frames (the loop, or right here)."""
        self.link.soon(fn, *args)

    # ------------------------------------------------------------ where the link sends

    def _send_request(self, kind: Kind, request_id: int, payload: Payload) -> None:
        try:
            self.link.send(kind, request_id, payload)
        except RPCError as exc:
            future = self._pending.pop(request_id, None)
            if future is not None:
                _settle(future, error=exc)

    def _cancel(self, request_id: int) -> None:
        had = self._pending.pop(request_id, None) or self._streams.pop(request_id, None)
        if had is not None and self._error is None:
            try:
                self.link.send(Kind.CANCEL, request_id)
            except RPCError:
                pass

    def grant(self, request_id: int, count: int) -> None:
        """Let the server send ``count`` more items of a stream (see :meth:`soon`)."""
        if request_id in self._streams and self._error is None:
            try:
                self.link.send(Kind.CREDIT, request_id, encode_credit(count))
            except RPCError:
                pass

    # ------------------------------------------------------------ the link's reader

    def receive(self, frame: Frame) -> None:
        """Deliver a reply, stream item or error to whoever waits for it."""
        kind, request_id = frame.kind, frame.request_id
        if kind is Kind.RESULT or kind is Kind.ERROR:
            future = self._pending.pop(request_id, None)
            if future is not None:
                self._settle_reply(future, frame)
                return
        if kind in (Kind.STREAM_ITEM, Kind.STREAM_END, Kind.ERROR):
            stream = (self._streams.get(request_id) if kind is Kind.STREAM_ITEM
                      else self._streams.pop(request_id, None))
            if stream is not None:
                stream.push(kind, frame.payload)
            return  # otherwise: a late reply to a call cancelled here; drop it
        if kind not in (Kind.PONG, Kind.RESULT):
            raise ProtocolError(f"unexpected {kind.name} message from the server")

    def _settle_reply(self, future: cf.Future, frame: Frame) -> None:
        if frame.kind is Kind.RESULT and frame.flags & Flag.STREAM:
            stream = RemoteStream(self, frame.request_id)
            self._streams[frame.request_id] = stream
            if future.cancelled():  # while the reply was on its way (reader thread)
                self._cancel(frame.request_id)
                return
            self.grant(frame.request_id, self.stream_window)
            _settle(future, value=stream)
            return
        try:
            if frame.kind is Kind.ERROR:
                _settle(future, error=_decode(unpack_error, frame.payload, "an error"))
            else:
                _settle(future, value=_decode(loads, frame.payload, "the result"))
        except SerializationError as exc:
            _settle(future, error=exc)

    def tick(self) -> bool:
        """While calls wait, ping the server; False once it stayed silent too long."""
        now = time.monotonic()
        if not (self._pending or self._streams):
            self._idle_until = now
        elif now - max(self._idle_until, self.link.last_activity) > self.liveness_timeout:
            self.fail(ConnectionLost(
                f"the server sent nothing for {self.liveness_timeout:g} s, not even "
                f"an answer to a ping; it is presumed dead"))
            return False
        else:
            self.soon(self._ping)
        return True

    def busy(self) -> bool:
        """True while calls or streams wait for frames."""
        return bool(self._pending or self._streams)

    def _ping(self) -> None:
        try:
            self.link.ping()
        except RPCError:
            pass

    def fail(self, error: RPCError) -> None:
        """Mark the connection dead and fail every request and stream in flight."""
        with self._lock:
            if self._error is not None:
                return
            self._error = error
            pending, self._pending = self._pending, {}
            streams, self._streams = self._streams, {}
        for future in pending.values():
            _settle(future, error=_fresh(error))
        for stream in streams.values():
            stream.push(None, _fresh(error))
        if pending or streams:
            log.warning("RPC connection lost with %d calls in flight: %s",
                        len(pending) + len(streams), error)

    async def aclose(self) -> None:
        """Close the connection; calls still in flight fail with ConnectionLost."""
        await self.link.aclose()
        if self._process is not None:
            await _reap(self._process, 5.0)


class RemoteStream:
    """The items of a remote generator, as they arrive: iterate it, sync or async.

    The server sends at most ``stream_window`` items ahead of what this side has
    consumed. Closing the stream (or dropping it) cancels the generator remotely.
    """

    def __init__(self, conn: ClientConnection, request_id: int,
                 timeout: Optional[float] = None) -> None:
        self._conn = conn
        self._request_id = request_id
        #: Seconds to wait for each item (None: no limit); set by the caller.
        self.timeout = timeout
        self._lock = threading.Lock()
        self._items: Deque[Tuple[Optional[Kind], Any]] = collections.deque()
        self._waiter: Optional[cf.Future] = None
        self._consumed = 0
        self._finished = False

    def push(self, kind: Optional[Kind], payload: Any) -> None:
        """Deliver a frame (or, with kind None, a connection error); loop thread."""
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
        kind, payload = self._items.popleft()
        if kind is Kind.STREAM_ITEM:
            self._consumed += 1
            if self._consumed * 2 >= self._conn.stream_window:
                self._conn.soon(self._conn.grant, self._request_id, self._consumed)
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
            self._conn.soon(self._conn._cancel, self._request_id)

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

    def __init__(self, conn: ClientConnection, request_id: int) -> None:
        super().__init__()
        self._conn = conn
        self._request_id = request_id

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self._conn.soon(self._conn._cancel, self._request_id)
        return True


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


async def _reap(process: asyncio.subprocess.Process, grace: float) -> None:
    """Let a ``command=`` server exit after its stdin closes; kill it if it lingers."""
    if process.stdin is not None:
        process.stdin.close()
    try:
        await asyncio.wait_for(process.wait(), grace)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
