"""The RPC server: authenticates connections and runs the calls they send.

Every connection is a protocol core (``protocol.py``) moved by a driver: the asyncio
driver (``aio.py``) on the server's event loop for the tunnel and stdio, the sync
driver (``sync.py``) for TCP and Unix sockets, whose reading threads run small calls
of plain functions themselves. Plain functions run in threads (the pool, or a
socket's reading thread), at most ``workers`` at once; coroutine functions run on
the event loop; generators (plain or async) stream their items under the client's
credit.
A call whose client cancels it, times out or disconnects is cancelled here too.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import select
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import (Any, AsyncIterator, Awaitable, Callable, Coroutine, Dict, List, Mapping,
                    Optional, Set, Tuple, Union)

from fileforward.loops import call_soon_if_open

from . import execution
from .aio import AioDriver
from .auth import load_key
from .errors import (ConnectionLost, FunctionNotFoundError, ProtocolError, RPCError,
                     SerializationError)
from .execution import CallContext
from .frames import (DEFAULT_MAX_FRAME, Buffer, check_max_frame, describe_error, dumps, loads,
                     pack_error, pack_value)
from .protocol import (CallCancelled, CallReceived, CreditGranted, InfoRequested, Opened,
                       ServerProtocol, versions)
from .sync import SyncServerDriver, describe_socket
from .throttle import ThrottledLog
from .transports import (DEFAULT_LIVENESS_TIMEOUT, Listener, claim_stdio, connect_stdio, endpoint,
                         listen)

log = logging.getLogger(__name__)

Functions = Mapping[str, Callable[..., Any]]
WORKER_THREAD_PREFIX = "rpc-worker"
#: Calls whose arguments are larger go to the worker pool, even from a reading
#: thread: copying dwarfs a hand-off, and glibc trims the heap of a thread that
#: frees megabytes on every call (measured: +1 ms for a 1 MiB echo).
INLINE_LIMIT = 1 << 16
#: Connections that may be in their handshake at once; a newer one drops the oldest,
#: so that strangers who connect and say nothing cannot exhaust the server.
DEFAULT_MAX_PENDING_HANDSHAKES = 64


class RPCServer:
    """Serves ``functions`` to every client that proves it holds the key."""

    def __init__(self, functions: Functions, *, key: bytes, workers: int = 4,
                 max_frame: int = DEFAULT_MAX_FRAME, handshake_timeout: float = 10.0,
                 max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES) -> None:
        check_functions(functions)
        self.functions: Dict[str, Callable[..., Any]] = dict(functions)
        #: The functions that run in threads (asking inspect costs on every call).
        self._plain = {name: fn for name, fn in self.functions.items()
                       if not execution.runs_on_loop(fn)}
        self.workers = workers
        self.max_frame = check_max_frame(max_frame)
        self.handshake_timeout = handshake_timeout
        if max_pending_handshakes < 1:
            raise ValueError(f"max_pending_handshakes must be at least 1, "
                             f"got {max_pending_handshakes}")
        self.max_pending_handshakes = max_pending_handshakes
        #: Connections not authenticated yet, oldest first (a dict keeps the order).
        self._handshaking: Dict["_Connection", None] = {}
        self._evictions = ThrottledLog(
            log, f"dropped unauthenticated connections: more than {max_pending_handshakes} "
                 f"handshakes were pending (max_pending_handshakes)")
        self.calls_served = 0
        self.in_flight = 0
        self.listeners: List[Listener] = []
        self._key = key
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=WORKER_THREAD_PREFIX)
        #: Held by each plain function running (in the pool or in a socket's reading
        #: thread): no more than ``workers`` run at once.
        self._slots = threading.Semaphore(workers)
        self.hostname = socket.gethostname()
        #: Guards the books (calls, in_flight, calls_served): threads update them too.
        self._books = threading.Lock()
        self._connections: Set["_Connection"] = set()
        self._started = time.monotonic()
        self._closed: Optional[asyncio.Event] = None

    # -------------------------------------------------------------- lifecycle

    def connection(self) -> AioDriver:
        """A new connection over an asyncio transport (the tunnel, stdio, a socket
        without epoll): its driver, the transport's protocol; it is served by a task
        of its own (see :meth:`_accept`)."""
        return self._accept()[0]

    def _accept(self) -> Tuple[AioDriver, "asyncio.Task[None]"]:
        core = self._core("peer")  # the driver names the peer once its transport is there
        driver = AioDriver(core)
        return driver, asyncio.ensure_future(self._serve(_Connection(self, core, driver)))

    async def handle_socket(self, sock: socket.socket) -> None:
        """Serve one TCP or Unix socket connection until it ends."""
        if not hasattr(select, "epoll"):  # reading threads wait together in Linux's epoll
            await asyncio.get_running_loop().connect_accepted_socket(self.connection, sock)
            return
        core = self._core(describe_socket(sock))
        driver = SyncServerDriver(core, sock, f"{WORKER_THREAD_PREFIX} {core.peer}")
        await self._serve(_Connection(self, core, driver))

    def _core(self, peer: str) -> ServerProtocol:
        return ServerProtocol(self._key, max_frame=self.max_frame, hostname=self.hostname,
                              peer=peer)

    async def _serve(self, conn: "_Connection") -> None:
        self._connections.add(conn)
        if len(self._handshaking) >= self.max_pending_handshakes:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            oldest.evict()
            self._evictions.note(f"the oldest was from {oldest.peer}")
        self._handshaking[conn] = None
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # the server is closing; asyncio 3.11 logs a cancelled callback as an error
        finally:
            self._connections.discard(conn)

    @property
    def addresses(self) -> List[str]:
        """Where this server listens (``tcp://127.0.0.1:PORT``, ``unix:PATH``, ...)."""
        return [listener.address for listener in self.listeners]

    def is_serving(self) -> bool:
        """True until :meth:`close` is called."""
        return self._closed is None or not self._closed.is_set()

    def close(self) -> None:
        """Stop listening, drop every connection and cancel the calls in flight."""
        for listener in self.listeners:
            listener.close()
        for conn in list(self._connections):
            conn.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._event().set()

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has been called, the listeners are down and every
        connection is closed."""
        await self._event().wait()
        for listener in self.listeners:
            await listener.wait_closed()
        tasks = {conn.task for conn in self._connections if conn.task is not None}
        if tasks:
            await asyncio.wait(tasks)

    async def serve_forever(self) -> None:
        """Serve until :meth:`close` is called (or, for stdio, until the stream ends).

        Raises ``fileforward.EndpointFailedError`` (already logged at ERROR, with its
        cause) if a tunnel listener failed for good: the server then closes, rather
        than stay up unable to serve."""
        waits = [asyncio.ensure_future(self._event().wait())]
        waits += [asyncio.ensure_future(listener.wait_closed()) for listener in self.listeners]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        failure = next((listener.failure for listener in self.listeners if listener.failure), None)
        if failure is not None:
            self.close()
            raise failure

    async def __aenter__(self) -> "RPCServer":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()
        await self.wait_closed()

    def _event(self) -> asyncio.Event:
        if self._closed is None:  # created lazily: it must belong to the running loop
            self._closed = asyncio.Event()
        return self._closed

    # -------------------------------------------------------------- queries

    def lookup(self, name: str) -> Callable[..., Any]:
        """The function called ``name``, or an error that lists the available ones."""
        try:
            return self.functions[name]
        except KeyError:
            raise FunctionNotFoundError(
                f"no function {name!r} on this server; available: "
                f"{', '.join(sorted(self.functions)) or '(none)'}") from None

    def info(self) -> Dict[str, Any]:
        """What ``client.info()`` and ``rpc.status()`` report."""
        return {
            "alive": True, "pid": os.getpid(), "hostname": self.hostname,
            "functions": {name: _describe(fn) for name, fn in sorted(self.functions.items())},
            "calls_served": self.calls_served, "in_flight": self.in_flight,
            "connections": len(self._connections), "workers": self.workers,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "addresses": self.addresses, "versions": versions(),
        }


def check_functions(functions: Functions) -> None:
    """Raise TypeError naming the first entry that is not ``name (str) -> callable``."""
    for name, fn in functions.items():
        if not isinstance(name, str):
            raise TypeError(f"entry {name!r}: a function's name must be a str, "
                            f"not a {type(name).__name__}")
        if not callable(fn):
            raise TypeError(f"entry {name!r} is {fn!r} ({type(fn).__name__}), not a function")


def _describe(fn: Callable[..., Any]) -> Dict[str, str]:
    try:
        signature = str(inspect.signature(fn))
    except (TypeError, ValueError):
        signature = "(...)"
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return {"kind": execution.kind_of(fn), "signature": signature,
            "doc": doc[0] if doc else ""}


class _Call:
    """A call in progress on one connection."""

    def __init__(self, request_id: int, name: str, args: Optional[memoryview]) -> None:
        self.request_id = request_id
        self.context = CallContext(name)
        self.args = args  # pickled; dropped as soon as it is unpickled
        #: Set when the client grants credit to the call's stream (made on first use).
        self.credit_granted: Optional[asyncio.Event] = None
        self.task: Optional[asyncio.Task] = None  # on the loop: coroutines and streams
        self.job: Optional[Future] = None  # in the worker pool: plain functions
        #: Bytes of the call's frame its driver counts as held until it is over.
        self.held = 0

    def take_args(self) -> Tuple[tuple, dict]:
        """Unpickle the arguments, releasing the frame that held them."""
        data, self.args = self.args, None
        try:
            return loads(data)
        except Exception as exc:
            raise SerializationError(
                f"the server cannot unpickle the arguments of {self.context.name}(): "
                f"{describe_error(exc)}") from exc

    def cancel(self) -> bool:
        """Cancel wherever the call is; True if it never started (nothing will finish it)."""
        self.context.cancel()
        if self.task is not None:
            self.task.cancel()
            return False
        return self.job is not None and self.job.cancel()


class _Connection:
    """One client connection: its protocol core, its driver, and the calls it asked for.

    Over a stream (the asyncio driver) everything runs on the event loop, except
    plain functions, which run in worker threads and hand their outcome back to the
    loop. Over a socket (the sync driver) the reading threads act on calls of plain
    functions themselves (:meth:`take`) and pass everything else to the loop; a
    worker or reading thread writes its reply itself, and the loop has its own
    writes done by the connection's writer thread, never waiting for a socket. The
    books are kept under the server's lock.
    """

    def __init__(self, server: RPCServer, core: ServerProtocol,
                 driver: Union[AioDriver, SyncServerDriver]) -> None:
        self.server = server
        self.core = core
        self.driver = driver
        #: Threads write replies (sockets), or the loop does (streams).
        self.threads_write = isinstance(driver, SyncServerDriver)
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.calls: Dict[int, _Call] = {}
        self.task: Optional[asyncio.Task] = None  # the one running run()
        #: Dropped before authentication to make room for a newer connection.
        self.evicted = False
        #: The client's HELLO once it is authenticated, or why the handshake failed.
        self._opened: "asyncio.Future[Any]" = self.loop.create_future()
        #: Why the connection ended.
        self._ended: "asyncio.Future[BaseException]" = self.loop.create_future()
        self._writer: Optional[ThreadPoolExecutor] = None  # see _loop_writer()

    @property
    def peer(self) -> str:
        """Who is at the other end (for log messages)."""
        return self.core.peer

    async def run(self) -> None:
        self.task = asyncio.current_task()
        self.driver.start(self)
        try:
            try:
                hello = await asyncio.wait_for(asyncio.shield(self._opened),
                                               self.server.handshake_timeout)
            except asyncio.TimeoutError:
                log.warning("rejected connection from %s: no handshake within %g s",
                            self.peer, self.server.handshake_timeout)
                return
            finally:
                self.server._handshaking.pop(self, None)
            if isinstance(hello, BaseException):
                if isinstance(hello, RPCError):
                    log.warning("rejected connection from %s: %s", self.peer, hello)
                return
            log.info("client %s (%s) connected", self.peer, hello.get("hostname"))
            raise await asyncio.shield(self._ended)
        except ProtocolError as exc:
            log.warning("dropping connection from %s: %s", self.peer, exc)
        except ConnectionLost as exc:
            if _closed_by_client(exc):
                log.info("client %s disconnected", self.peer)
            else:
                log.warning("connection from client %s lost: %s", self.peer,
                            exc.__cause__ or exc)
        except asyncio.CancelledError:
            if not self.evicted:
                log.info("closing connection from %s", self.peer)
        finally:
            with self.server._books:
                calls = list(self.calls.values())
            for call in calls:
                self.cancel(call)
            await self.driver.aclose()
            if self._writer is not None:
                self._writer.shutdown(wait=False)

    # -------------------------------------------------------------- the driver's events

    def handle(self, events: List[Any]) -> None:
        """Act on what the client sent (loop thread)."""
        for event in events:
            kind = type(event)
            if kind is CallReceived:
                self.begin(_Call(event.request_id, event.name, event.args))
            elif kind is CallCancelled:
                call = self.calls.get(event.request_id)
                if call is not None:
                    log.debug("client %s cancelled call %d", self.peer, event.request_id)
                    self.cancel(call)
            elif kind is CreditGranted:
                call = self.calls.get(event.request_id)
                if call is not None and call.credit_granted is not None:
                    call.credit_granted.set()
            elif kind is InfoRequested:
                self.reply(event.request_id, True, dumps(self.server.info()), "info")
            elif kind is Opened:
                self._opened.set_result(event.hello)

    def take(self, event: Any, free: bool) -> Optional[Callable[[], None]]:
        """Reading thread (sockets): a small call of a plain function is this thread's
        to run, if it is ``free`` and a worker slot is too, else the pool's;
        everything else goes to the loop, in order."""
        if type(event) is not CallReceived:
            self.on_loop(self.handle, [event])
            return None
        call = _Call(event.request_id, event.name, event.args)
        fn = self.server._plain.get(event.name)
        if fn is None:  # a coroutine, or no such function
            self.on_loop(self.begin, call)
            return None
        self.register(call)
        if (free and len(event.args) <= INLINE_LIMIT
                and self.server._slots.acquire(blocking=False)):
            return functools.partial(execution.context_of(call.context).run,
                                     self.run_here, fn, call)
        self.submit(fn, call)
        return None

    def on_loop(self, action: Callable[..., None], *args: Any) -> None:
        """From a thread: ``action(*args)`` on the loop; a ProtocolError it raises ends
        the connection."""
        call_soon_if_open(self.loop, self._run_or_drop, action, *args)  # closed: the server has stopped

    def _run_or_drop(self, action: Callable[..., None], *args: Any) -> None:
        try:
            action(*args)
        except ProtocolError as exc:
            self.end(exc)

    def end(self, error: BaseException) -> None:
        """Loop thread: end the connection with ``error``."""
        if isinstance(self.driver, SyncServerDriver):
            self.driver.stop(error)  # its threads leave, then it calls fail()
        else:
            self.fail(error)

    def fail(self, error: BaseException) -> None:
        """The driver stopped reading: the connection is over."""
        if not self._opened.done():
            self._opened.set_result(error)
        if not self._ended.done():
            self._ended.set_result(error)

    # -------------------------------------------------------------- books

    def register(self, call: _Call) -> None:
        """Book a new call."""
        with self.server._books:
            if call.request_id in self.calls:  # cancelled, but still running
                raise ProtocolError(f"request id {call.request_id} is already in use")
            self.calls[call.request_id] = call
            self.server.in_flight += 1

    def finish(self, call: _Call) -> None:
        """Bookkeeping when a call is over (from any thread; counted once per call)."""
        with self.server._books:
            if self.calls.get(call.request_id) is not call:
                return
            del self.calls[call.request_id]
            self.server.in_flight -= 1
            self.server.calls_served += 1
        if call.held:  # the asyncio driver's: on the loop
            self.driver.hold(-call.held)  # type: ignore[union-attr]

    def cancel(self, call: _Call) -> None:
        """The client cancelled the call, or went away."""
        if call.cancel():
            self.finish(call)

    def abort(self) -> None:
        """Drop the connection (server shutdown): a socket's reading threads stop
        taking calls at once, whatever the task is doing."""
        if isinstance(self.driver, SyncServerDriver):
            self.driver.stop(ConnectionLost("the server is closing"))
        if self.task is not None:
            self.task.cancel()

    def evict(self) -> None:
        """Drop the connection, still unauthenticated, to make room for a newer one."""
        self.evicted = True
        self.abort()

    # -------------------------------------------------------------- running calls

    def begin(self, call: _Call) -> None:
        """Book and start a call. Plain functions go straight to the worker pool (no
        task), coroutine and async generator functions to a task."""
        self.register(call)
        try:
            fn = self.server.lookup(call.context.name)
        except FunctionNotFoundError as exc:
            self.finish(call)
            self.reply(call.request_id, False, pack_error(exc), call.context.name)
            return
        if call.context.name in self.server._plain:
            if not self.threads_write:  # a fast client cannot queue unbounded work
                call.held = len(call.args or b"")
                self.driver.hold(call.held)  # type: ignore[union-attr]
            self.submit(fn, call)
        else:
            self.run_task(call, self.run_on_loop(call, fn))

    def submit(self, fn: Callable[..., Any], call: _Call) -> None:
        """Any thread: queue a plain function's call for the worker pool."""
        try:
            call.job = self.server._pool.submit(execution.context_of(call.context).run,
                                                self.run_in_pool, fn, call)
        except RuntimeError:  # the pool is shut down: the server is closing
            self.finish(call)

    def run_in_pool(self, fn: Callable[..., Any], call: _Call) -> None:
        """Worker thread: wait for a slot, then run the call."""
        with self.server._slots:
            self.work(fn, call)

    def run_here(self, fn: Callable[..., Any], call: _Call) -> None:
        """Reading thread: run the call with the slot :meth:`take` got for it."""
        try:
            self.work(fn, call)
        finally:
            self.server._slots.release()

    def work(self, fn: Callable[..., Any], call: _Call) -> None:
        """Any thread: unpickle, call, pickle; then send the reply (sockets), or hand
        the outcome to the loop (streams, generators)."""
        outcome: Any = None  # a call cancelled before it started is not run
        if not call.context.cancelled:
            try:
                outcome = _run_and_pack(fn, call)
            except BaseException as exc:  # the function's own error, for the client
                outcome = _Packed(False, pack_error(exc))
        if self.threads_write and isinstance(outcome, _Packed) and not call.context.cancelled:
            self.finish(call)  # booked before the client can see the reply (and ask info())
            self.reply(call.request_id, outcome.ok, outcome.payload, call.context.name)
            return
        self.on_loop(self.complete, call, outcome)

    def complete(self, call: _Call, outcome: Any) -> None:
        """Loop thread: send a worker's outcome (or stream the generator it returned)."""
        if call.context.cancelled:
            self.finish(call)  # the client gave up: the result is discarded
        elif isinstance(outcome, _Packed):
            self.finish(call)  # booked before the client can see the reply (and ask info())
            self.reply(call.request_id, outcome.ok, outcome.payload, call.context.name)
        else:
            self.run_task(call, self.stream(call, outcome if inspect.isasyncgen(outcome) else
                                            execution.iterate_in_thread(
                                                outcome, self.server._pool, call.context)))

    async def run_on_loop(self, call: _Call, fn: Callable[..., Any]) -> None:
        """A coroutine function's result, or an async generator's stream."""
        execution.enter(call.context)  # this task's context: rpc.cancelled() works
        args, kwargs = call.take_args()
        outcome: Any = fn(*args, **kwargs)
        del args, kwargs
        if inspect.isasyncgen(outcome):
            await self.stream(call, outcome)
            return
        ok, payload = pack_value(await outcome, f"the result of {call.context.name}()")
        await self.send(self.core.reply, call.request_id, ok, payload)

    def run_task(self, call: _Call, work: Coroutine[Any, Any, None]) -> None:
        """Run a call's work as a task; finished however it ends, even if it is
        cancelled before its first step (when no ``finally`` in it would run)."""
        def done(_: "asyncio.Future[None]") -> None:
            work.close()  # no-op if it ran; else no "never awaited" warning
            self.finish(call)

        call.task = asyncio.ensure_future(self.guard(call, work))
        call.task.add_done_callback(done)

    async def guard(self, call: _Call, work: Awaitable[None]) -> None:
        """A call's task: its error goes to the client, its cancellation nowhere."""
        try:
            await work
        except asyncio.CancelledError:
            log.debug("call %d (%s) cancelled", call.request_id, call.context.name)
        except Exception as exc:
            await self.send(self.core.reply, call.request_id, False, pack_error(exc))

    def reply(self, request_id: int, ok: bool, payload: Buffer, name: str) -> None:
        """Any thread: answer request ``request_id`` (of function ``name``)."""
        if self.threads_write and threading.get_ident() == self._loop_thread:
            try:  # the loop never waits for a socket
                self.loop.run_in_executor(self._loop_writer(), self._reply_now, request_id,
                                          ok, payload, name)
            except RuntimeError:
                pass  # the connection is over
        else:
            self._reply_now(request_id, ok, payload, name)

    def _reply_now(self, request_id: int, ok: bool, payload: Buffer, name: str) -> None:
        """A connection that cannot carry even an error cut down to the client's frame
        limit is dropped."""
        try:
            self.driver.run(self.core.reply, request_id, ok, payload)
        except ProtocolError as exc:
            log.warning("dropping connection from %s: cannot answer %s(): %s",
                        self.peer, name, exc)
            self.on_loop(self.end, exc)
        except ConnectionLost:
            pass  # the reader notices too, and cancels what is left

    def _loop_writer(self) -> ThreadPoolExecutor:
        """The thread that writes for the loop on this socket (made on first use: most
        connections call only plain functions), in order. One per connection: a
        client that stops reading holds up its own connection only."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"rpc-writer {self.peer}")
        return self._writer

    async def send(self, op: Callable[..., Any], *args: Any) -> Any:
        """Loop thread: ``op(*args)`` on the core, and wait until what it sends is
        written (over a socket, by a thread: the loop never waits for a socket). A
        ProtocolError (nothing can be answered) ends the connection."""
        try:
            if self.threads_write:
                return await self.loop.run_in_executor(self._loop_writer(), self.driver.run,
                                                       op, *args)
            result = self.driver.run(op, *args)
            await self.driver.drained()  # type: ignore[union-attr]
            return result
        except ProtocolError as exc:
            log.warning("dropping connection from %s: %s", self.peer, exc)
            self.end(exc)
        except ConnectionLost:
            pass  # the reader notices too
        return None

    async def stream(self, call: _Call, items: AsyncIterator[Any]) -> None:
        """Send a generator's items, each only once the client has granted credit."""
        what = f"an item streamed by {call.context.name}()"
        rid = call.request_id
        try:
            if not await self.send(self.core.start_stream, rid):
                return  # cancelled meanwhile
            while True:
                while not self.core.credit(rid):
                    if call.credit_granted is None:
                        call.credit_granted = asyncio.Event()
                    call.credit_granted.clear()
                    await call.credit_granted.wait()
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    break
                ok, payload = pack_value(item, what)
                del item
                if not ok:
                    await self.send(self.core.reply, rid, False, payload)
                    return
                if not await self.send(self.core.send_item, rid, payload):
                    return  # cancelled, or too large (sent as an error instead)
            await self.send(self.core.end_stream, rid)
        finally:
            await items.aclose()  # type: ignore[attr-defined]


def _closed_by_client(exc: ConnectionLost) -> bool:
    """True if the client ended the stream between two frames (a normal end): the
    exact ConnectionLost of Framing.end_of_stream, not a truncated frame nor one
    raised from an OSError (a reset, a peer declared dead)."""
    return type(exc) is ConnectionLost and exc.__cause__ is None


class _Packed:
    """A result pickled in the worker thread, so that the loop only sends it."""

    __slots__ = ("ok", "payload")

    def __init__(self, ok: bool, payload: bytes) -> None:
        self.ok = ok
        self.payload = payload


def _run_and_pack(fn: Callable[..., Any], call: _Call) -> Any:
    """Worker-thread part of a plain call: unpickle, call, pickle (all off the loop).

    Generators (and async generators that a plain function happens to return) are
    handed back as they are, for the loop to stream.
    """
    args, kwargs = call.take_args()
    result = fn(*args, **kwargs)
    del args, kwargs
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        return result
    return _Packed(*pack_value(result, f"the result of {call.context.name}()"))


# ---------------------------------------------------------------- entry points

async def start_server(functions: Functions, *, tunnel_dir: Any = None, tcp: Any = None,
                       unix: Any = None, stdio: bool = False, workers: int = 4,
                       key_file: Any = None, force: bool = False,
                       max_frame: int = DEFAULT_MAX_FRAME,
                       liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT,
                       max_pending_handshakes: int = DEFAULT_MAX_PENDING_HANDSHAKES,
                       coherence: Optional[str] = None) -> RPCServer:
    """Start serving ``functions`` (name -> callable) on one transport.

    The transport is the tunnel directory (default: ``rpc.default_tunnel_dir()``),
    ``tcp="HOST:PORT"`` (host defaults to 127.0.0.1), ``unix=PATH`` (mode 0600) or
    ``stdio=True`` (one client on stdin/stdout; serving ends when it disconnects).
    The key file is created (0600) if missing: see ``rpc.default_key_path()``.
    At most ``max_pending_handshakes`` connections may be unauthenticated at once:
    a newer one drops the oldest. ``coherence`` (tunnel only: "auto", "locks" or
    "lock-free") overrides what the transport judges of the filesystem's locks.
    """
    server = RPCServer(functions, key=load_key(key_file, create=True), workers=workers,
                       max_frame=max_frame, max_pending_handshakes=max_pending_handshakes)
    ep = endpoint(tunnel_dir=tunnel_dir, tcp=tcp, unix=unix, stdio=stdio, coherence=coherence)
    if ep.kind == "stdio":
        driver, task = server._accept()
        task.add_done_callback(lambda _: server.close())
        await connect_stdio(driver, *claim_stdio())
    else:
        server.listeners.append(await listen(ep, server.connection, server.handle_socket,
                                             force=force, liveness_timeout=liveness_timeout))
    log.info("serving %d functions on %s (%s)", len(server.functions),
             ", ".join(server.addresses) or "stdio", ", ".join(sorted(server.functions)))
    return server


def serve(functions: Functions, **kwargs: Any) -> None:
    """Blocking :func:`start_server`: serve until Ctrl-C or SIGTERM (or stdio EOF).
    Raises ``fileforward.EndpointFailedError`` if its tunnel failed for good."""
    async def main() -> None:
        stop = asyncio.Event()
        try:  # before the server starts: a SIGTERM right after it is up must not be lost
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        except (ValueError, RuntimeError, NotImplementedError):
            pass  # not the main thread: Ctrl-C / close() still work
        async with await start_server(functions, **kwargs) as server:
            forever, stopping = asyncio.ensure_future(server.serve_forever()), asyncio.ensure_future(stop.wait())
            await asyncio.wait({forever, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if forever.done():
                forever.result()  # raises the failure of a tunnel listener, if one failed
            forever.cancel()

    restore_logging = _show_log_unless_configured()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log.info("interrupted; server stopped")
    finally:
        restore_logging()
    if threading.current_thread() is threading.main_thread():
        _leave_stuck_calls_behind(STUCK_CALL_GRACE)


def _show_log_unless_configured() -> Callable[[], None]:
    """serve() is often a script's main loop, run with no logging set up: then the
    rpc log's INFO lines (where it serves, which clients come and go) go to stderr
    while it serves. Returns what undoes that."""
    package = logging.getLogger("rpc")
    if logging.getLogger().handlers or package.handlers:
        return lambda: None
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(level or logging.INFO)

    def restore() -> None:
        package.removeHandler(handler)
        package.setLevel(level)
    return restore


STUCK_CALL_GRACE = 2.0


def _leave_stuck_calls_behind(grace: float) -> None:
    """Exit even if a function ignores its cancellation.

    Interpreter exit joins the worker pool's threads, so one call stuck in, say, a
    network read would keep a stopped server (and a SLURM job's cleanup) waiting
    forever. After `grace` seconds, leave without it: the process owns nothing else.
    """
    deadline = time.monotonic() + grace
    workers = [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX)]
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(worker.is_alive() for worker in workers)
    if stuck:
        log.warning("%d call(s) still running %.0f s after the server stopped; exiting without them",
                    stuck, grace)
        logging.shutdown()
        os._exit(0)
