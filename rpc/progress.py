"""The progress line of ``Pool.map(..., progress=True)``: one line people can watch.

``done/total, failed, tasks/s, ETA, workers online/busy``, on stderr. In a terminal
the line is rewritten in place a few times a second; elsewhere (a log file, a batch
job's output) a new line is written now and then, so that the file stays readable.
Rendering runs on the pool's event loop, where the pool's books may be read.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sys
import threading
import time
from typing import Callable, List, Optional, TextIO, Tuple

#: Seconds between two renderings in a terminal, and elsewhere.
TERMINAL_INTERVAL = 0.2
FILE_INTERVAL = 10.0


class MapProgress:
    """Counts the outcomes of ``futures`` and shows them with the pool's workers.

    ``census()`` gives ``(workers online, workers busy)``; it is called on the loop.
    """

    def __init__(self, futures: List[cf.Future], census: Callable[[], Tuple[int, int]],
                 loop: asyncio.AbstractEventLoop, stream: Optional[TextIO] = None) -> None:
        self.total = len(futures)
        self.census = census
        self.loop = loop
        self.stream = stream if stream is not None else sys.stderr
        self.in_place = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = TERMINAL_INTERVAL if self.in_place else FILE_INTERVAL
        self.started = time.monotonic()
        self.done = self.failed = 0
        self._lock = threading.Lock()
        self._width = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._finished = False
        for future in futures:
            future.add_done_callback(self._count)

    def start(self) -> None:
        """From any thread: show the line now, and keep it up to date."""
        self.loop.call_soon_threadsafe(self._tick)

    def line(self) -> str:
        """The text of the line, as of now."""
        with self._lock:
            done, failed = self.done, self.failed
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 and done < self.total else "-"
        online, busy = self.census()
        return (f"pool: {done}/{self.total} done, {failed} failed, {rate:.1f} tasks/s, "
                f"ETA {eta}, workers {online} online / {busy} busy")

    def _count(self, future: cf.Future) -> None:
        with self._lock:
            self.done += 1
            if future.cancelled() or future.exception() is not None:
                self.failed += 1
            last = self.done == self.total
        if last:  # the final line at once, not at the next tick
            self.loop.call_soon_threadsafe(self._tick)

    def _tick(self) -> None:
        """On the loop: render; again after the interval, until every task is done."""
        if self._finished:
            return
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._finished = self.done >= self.total
        self._render(self.line(), final=self._finished)
        if not self._finished:
            self._timer = self.loop.call_later(self.interval, self._tick)

    def _render(self, text: str, final: bool) -> None:
        if self.in_place:
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
