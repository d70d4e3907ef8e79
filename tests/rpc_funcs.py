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


FUNCTIONS = {f.__name__: f for f in (
    echo, add, aecho, count, acount, fail_after, boom, custom, raise_unpicklable,
    raise_bad_init, unpicklable_result, unpicklable_item, noisy, pid, record,
    wait_cancelled, barrier, stubborn)}
