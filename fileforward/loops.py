"""Reaching an event loop from another thread."""
from __future__ import annotations

import asyncio
from typing import Any, Callable


def call_soon_if_open(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> bool:
    """From any thread: have `loop` run `callback(*args)`. False if the loop is closed
    (whoever would have listened has gone), which callers may ignore."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        return False
    return True
