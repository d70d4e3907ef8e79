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


async def run_in_thread(pool: Executor, call: CallContext, fn: Callable[..., Any],
                        *args: Any) -> Any:
    """``fn(*args)`` in a worker thread that sees ``call`` as its current call."""
    context = contextvars.copy_context()
    context.run(enter, call)
    return await asyncio.get_running_loop().run_in_executor(pool, context.run, fn, *args)


async def iterate_in_thread(items: Iterator[Any], pool: Executor, call: CallContext,
                            lookahead: int = 8) -> AsyncIterator[Any]:
    """Drive a plain generator in a worker thread, at most ``lookahead`` items ahead.

    One thread serves the whole stream (no hand-off per item); the generator is
    closed in that same thread when the stream ends, fails or is cancelled.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(lookahead)
    call.on_cancel(room.release)
    done = object()

    def produce() -> None:
        try:
            while room.acquire() and not call.cancelled:
                try:
                    item = next(items)
                except StopIteration:
                    break
                loop.call_soon_threadsafe(queue.put_nowait, (item, None))
            loop.call_soon_threadsafe(queue.put_nowait, (done, None))
        except BaseException as exc:  # delivered to the caller as the stream's error
            loop.call_soon_threadsafe(queue.put_nowait, (done, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    producer = run_in_thread(pool, call, produce)
    task = asyncio.ensure_future(producer)
    try:
        while True:
            item, error = await queue.get()
            if item is done:
                if error is not None:
                    raise error
                return
            room.release()
            yield item
    finally:
        if not task.done():
            call.cancel()
