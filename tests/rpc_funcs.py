"""Functions served by the RPC test servers (in-process and `python -m rpc serve`)."""
import asyncio
import os
import time
import threading

import rpc


class BadInit(Exception):
    """Pickles fine, but cannot be rebuilt: unpickling calls BadInit(msg) -> TypeError."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


class CustomError(Exception):
    """A user-defined exception type that must keep its type across the wire."""


class Unprintable(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self):
        raise ValueError("no text for you")


def echo(x):
    return x


def add(a, b=0):
    return a + b


async def aecho(x, delay=0.0):
    await asyncio.sleep(delay)
    return x


def count(n):
    yield from range(n)


async def acount(n):
    for i in range(n):
        yield i


def fail_after(n):
    yield from range(n)
    raise CustomError(f"failed after {n}")


def boom():
    raise ValueError("bad thing")


def custom():
    raise CustomError("custom message")


def raise_unpicklable():
    exc = ValueError("locked")
    exc.lock = threading.Lock()
    raise exc


def raise_bad_init():
    raise BadInit("cannot rebuild", 7)


def raise_unprintable():
    raise Unprintable()


def unpicklable_result():
    return threading.Lock()


def unpicklable_item():
    yield 1
    yield threading.Lock()


def noisy(x):
    print("stray output from a served function")
    return x


def pid():
    return os.getpid()


def record(path, block):
    """Append one line to ``path``; if ``block``, wait until the call is cancelled."""
    with open(path, "a") as f:
        f.write("called\n")
    if block:
        rpc.current_call().wait(60)
    return "recorded"


def wait_cancelled(timeout=60):
    return rpc.current_call().wait(timeout)


_arrived = {"n": 0}
_all_here = {}


async def barrier(n):
    """Return only once ``n`` callers are waiting here at the same time."""
    event = _all_here.setdefault(n, asyncio.Event())
    _arrived["n"] += 1
    if _arrived["n"] >= n:
        event.set()
    await asyncio.wait_for(event.wait(), 60)
    return os.getpid()


def stubborn(seconds):
    """Ignores cancellation: like a function stuck in a network read."""
    time.sleep(seconds)


# ---------------------------------------------------------------- observed by the caller
# A test names each call by a fresh ``tag`` and asks the same server what that call
# went through (``events``); it works alike when the server runs in the test process
# and when it is a subprocess (the command transport).

_events = {}
_gates = {}
_produced = {}


def _note(tag, event):
    _events.setdefault(tag, set()).add(event)


def events(tag):
    """What the call named ``tag`` went through: started, cancelled, closed."""
    return sorted(_events.get(tag, ()))


def release(tag):
    """Open the gate that ``gated(tag)`` waits at."""
    _gates.setdefault(tag, threading.Event()).set()


def produced(tag):
    """How many items ``many(tag, ...)`` has produced so far."""
    return _produced.get(tag, 0)


def blocking(tag):
    """A plain function that waits for its cancellation."""
    _note(tag, "started")
    if rpc.current_call().wait(60):
        _note(tag, "cancelled")


async def waiting(tag):
    """A coroutine that is cancelled by asyncio."""
    _note(tag, "started")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _note(tag, "cancelled")
        raise


def polling(tag):
    """A plain function doing its work in small steps, asking whether it is cancelled."""
    _note(tag, "started")
    deadline = time.monotonic() + 60
    while not rpc.cancelled() and time.monotonic() < deadline:
        time.sleep(0.005)
    if rpc.cancelled():
        _note(tag, "cancelled")


def gated(tag):
    """Yields "a", then "b" once ``release(tag)`` was called (or after 60 s)."""
    yield "a"
    _gates.setdefault(tag, threading.Event()).wait(60)
    yield "b"


def many(tag, n):
    """Counts up to ``n``, recording how far it got (``produced``)."""
    for i in range(n):
        _produced[tag] = i + 1
        yield i


def endless(tag):
    """Counts for ever; notes "closed" when the stream is closed."""
    try:
        i = 0
        while True:
            yield i
            i += 1
    finally:
        _note(tag, "closed")


FUNCTIONS = {f.__name__: f for f in (
    echo, add, aecho, count, acount, fail_after, boom, custom, raise_unpicklable,
    raise_bad_init, raise_unprintable, unpicklable_result, unpicklable_item, noisy, pid, record,
    wait_cancelled, barrier, stubborn, events, release, produced, blocking, waiting,
    polling, gated, many, endless)}
