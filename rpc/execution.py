"""Running served functions: in worker threads or on the loop, and cancelling them.

A function running in a worker thread cannot be interrupted; it can ask
:func:`cancelled` (or wait on :func:`current_call`) and stop early, and whatever it
returns after a cancellation is discarded.
"""
from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Callable, Iterator, List, Optional

_current: contextvars.ContextVar[Optional["CallContext"]] = contextvars.ContextVar(
    "rpc_current_call", default=None)


class CallContext:
    """One call being served: its name, and whether the client gave up on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cancelled = False
        #: Made by the first wait (most calls are never waited on), under the lock.
        self._event: Optional[threading.Event] = None
        self._lock = threading.Lock()
        self._on_cancel: List[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        """True once the client cancelled the call, timed out, or disconnected."""
        return self._cancelled

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until cancelled (True) or until ``timeout`` passes (False)."""
        with self._lock:
            if self._event is None:
                self._event = threading.Event()
        if self._cancelled:  # set before the event existed
            self._event.set()
        return self._event.wait(timeout)

    def cancel(self) -> None:
        """Mark the call cancelled and wake whatever waits on it (thread-safe)."""
        self._cancelled = True
        with self._lock:
            event = self._event
        if event is not None:
            event.set()
        for callback in self._on_cancel:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the call is cancelled (at once if it already was)."""
        self._on_cancel.append(callback)
        if self.cancelled:
            callback()


def current_call() -> Optional[CallContext]:
    """The call being served by this thread or task, or None outside of a call."""
    return _current.get()


def cancelled() -> bool:
    """Inside a served function: has the caller cancelled this call (or gone away)?"""
    call = _current.get()
    return call is not None and call.cancelled


def runs_on_loop(fn: Callable[..., Any]) -> bool:
    """Coroutine and async generator functions run on the event loop, others in threads."""
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def kind_of(fn: Callable[..., Any]) -> str:
    """How a function is served, for ``info()``."""
    if inspect.isasyncgenfunction(fn):
        return "async generator"
    if inspect.iscoroutinefunction(fn):
        return "coroutine"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "function"


def enter(call: CallContext) -> None:
    """Make ``call`` the current call of the running task or thread context."""
    _current.set(call)


def context_of(call: CallContext) -> contextvars.Context:
    """A context in which :func:`current_call` is ``call`` (for the thread running it)."""
    context = contextvars.copy_context()
    context.run(enter, call)
    return context


async def iterate_in_thread(items: Iterator[Any], pool: Executor, call: CallContext,
                            lookahead: int = 8) -> AsyncIterator[Any]:
    """Drive a plain generator in a worker thread, at most ``lookahead`` items ahead.

    A worker runs the generator while there is room ahead of the consumer, then goes
    back to the pool: a stream whose client stops reading holds no thread (one per
    stream would soon starve every other call). The consumer making room starts it
    again. The generator is closed in a worker when the stream ends, fails or is
    cancelled.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    producer = _Producer(items, call, lookahead,
                         lambda *entry: loop.call_soon_threadsafe(queue.put_nowait, entry))

    def resume() -> None:  # on the loop
        try:
            pool.submit(context_of(call).run, producer.run)
        except RuntimeError as exc:  # the pool is shut down: the server is closing
            producer.close()
            queue.put_nowait((_Producer.DONE, exc))

    def wake() -> None:  # any thread: the call was cancelled
        if producer.make_room():
            try:
                loop.call_soon_threadsafe(resume)
            except RuntimeError:
                pass  # the loop is closed: the server has stopped

    call.on_cancel(wake)
    resume()
    try:
        while True:
            item, error = await queue.get()
            if item is _Producer.DONE:
                if error is not None:
                    raise error
                return
            if producer.make_room():
                resume()
            yield item
    finally:
        if not producer.finished:
            call.cancel()


class _Producer:
    """A generator run by one worker at a time, in turns, while there is room."""

    DONE = object()

    def __init__(self, items: Iterator[Any], call: CallContext, room: int,
                 deliver: Callable[..., None]) -> None:
        self._items = items
        self._call = call
        self._room = room
        self._deliver = deliver
        self._lock = threading.Lock()
        self._running = True  # the first worker is started at once
        self.finished = False

    def make_room(self) -> bool:
        """The consumer took an item (or the call was cancelled); True if a worker
        must be started: none runs the generator now."""
        with self._lock:
            self._room += 1
            if self._running or self.finished:
                return False
            self._running = True
            return True

    def run(self) -> None:
        """Worker thread: produce while there is room; at the end, close the generator."""
        error: Optional[BaseException] = None
        try:
            while not self._call.cancelled:
                with self._lock:
                    if not self._room:
                        self._running = False
                        return  # the consumer starts a worker again when it makes room
                    self._room -= 1
                try:
                    item = next(self._items)
                except StopIteration:
                    break
                self._deliver(item, None)
        except BaseException as exc:  # delivered to the caller as the stream's error
            error = exc
        try:
            self.close()
        except BaseException as exc:
            error = error or exc
        self._deliver(self.DONE, error)

    def close(self) -> None:
        """Mark the stream finished and close the generator."""
        self.finished = True
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
