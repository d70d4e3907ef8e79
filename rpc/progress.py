"""The progress line of ``Pool.map(..., progress=True)``: one line people can watch.

``done/total, failed, tasks/s, ETA, workers online/busy``, then how far the running
tasks say they are (``rpc.report_progress``): their mean fraction, the latest
message. In a Jupyter notebook the line is one text display, updated in place
(through IPython, used only if the kernel already imported it: no dependency).
Elsewhere it goes to stderr: in a terminal it is rewritten in place a few times a
second; in a log file or a batch job's output a new line is written now and then,
so that the file stays readable. Rendering runs on the pool's event loop, where
the pool's books may be read.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sys
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, TextIO, Tuple

#: Seconds between two renderings in a terminal or a notebook, and in a file.
TERMINAL_INTERVAL = 0.2
FILE_INTERVAL = 10.0


class StreamLine:
    """The line on a text stream: rewritten in place in a terminal, else whole
    lines now and then."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.in_place = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = TERMINAL_INTERVAL if self.in_place else FILE_INTERVAL
        self._width = 0

    def show(self, text: str, final: bool) -> None:
        """Show ``text``; ``final``: the map is over."""
        if self.in_place:
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class NotebookDisplay:
    """The line as one text output of the notebook cell that runs the map, updated
    in place. Made in the caller's thread, so that it belongs to the caller's cell."""

    interval = TERMINAL_INTERVAL

    def __init__(self, display: Callable[..., Any], text: str) -> None:
        self._handle = display({"text/plain": text}, raw=True, display_id=True)

    def show(self, text: str, final: bool) -> None:
        """Replace the display's text (the last one stays in the notebook)."""
        self._handle.update({"text/plain": text}, raw=True)


def notebook_display() -> Optional[Callable[..., Any]]:
    """IPython's ``display`` if this process is a Jupyter kernel, else None.

    Terminal IPython (no kernel) gets the stderr line. IPython is never imported
    here: a kernel has always imported it already.
    """
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if get_ipython is not None else None
    if getattr(shell, "kernel", None) is None:
        return None
    from IPython.display import display
    return display


def running_summary(futures: Iterable[Any]) -> str:
    """How far the running tasks that reported say they are: ``running 45% (3
    reporting), 'latest message'``, or an empty string."""
    reported = [f for f in futures if getattr(f, "progress", None) is not None]
    fractions = [f.progress for f in reported if isinstance(f.progress, float)]
    messages = [f for f in reported if isinstance(f.progress, str)]
    parts = []
    if fractions:
        parts.append(f"running {100 * sum(fractions) / len(fractions):.0f}% "
                     f"({len(fractions)} reporting)")
    if messages:
        parts.append(repr(max(messages, key=lambda f: f.progress_updated).progress))
    return ", ".join(parts)


class MapProgress:
    """Counts the outcomes of ``futures`` and shows them with the pool's workers.

    ``census()`` gives ``(workers online, workers busy)`` and ``running()`` the
    futures of the pool's running tasks; both are called on the loop. ``stream``:
    where the line goes (default: the notebook's output in a Jupyter kernel, else
    stderr).
    """

    def __init__(self, futures: List[cf.Future], census: Callable[[], Tuple[int, int]],
                 running: Callable[[], Iterable[cf.Future]],
                 loop: asyncio.AbstractEventLoop, stream: Optional[TextIO] = None) -> None:
        self.total = len(futures)
        self.census = census
        self.running = running
        self.loop = loop
        self.started = time.monotonic()
        self.done = self.failed = self.cancelled = 0
        self._mine = set(futures)
        self._lock = threading.Lock()
        self._timer: Optional[asyncio.TimerHandle] = None
        self._finished = False
        display = notebook_display() if stream is None else None
        self.output = (NotebookDisplay(display, f"pool: 0/{self.total} done") if display
                       else StreamLine(stream if stream is not None else sys.stderr))
        for future in futures:
            future.add_done_callback(self._count)

    def start(self) -> None:
        """From any thread: show the line now, and keep it up to date."""
        self.loop.call_soon_threadsafe(self._tick)

    def line(self) -> str:
        """The text of the line, as of now (on the loop)."""
        with self._lock:
            done, failed, cancelled = self.done, self.failed, self.cancelled
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        left = self.total - done - cancelled
        eta = f"{left / rate:.0f} s" if rate > 0 and left else "-"
        online, busy = self.census()
        text = (f"pool: {done}/{self.total} done, {failed} failed, "
                f"{f'{cancelled} cancelled, ' if cancelled else ''}{rate:.1f} tasks/s, "
                f"ETA {eta}, workers {online} online / {busy} busy")
        tasks = running_summary(f for f in self.running() if f in self._mine)
        return f"{text}, {tasks}" if tasks else text

    def _count(self, future: cf.Future) -> None:
        with self._lock:
            if future.cancelled():  # e.g. the caller stopped at a failed task
                self.cancelled += 1
            else:
                self.done += 1
                self.failed += future.exception() is not None
            last = self.done + self.cancelled == self.total
        if last:  # the final line at once, not at the next tick
            self.loop.call_soon_threadsafe(self._tick)

    def _tick(self) -> None:
        """On the loop: render; again after the interval, until every task is done."""
        if self._finished:
            return
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._finished = self.done + self.cancelled >= self.total
        self.output.show(self.line(), final=self._finished)
        if not self._finished:
            self._timer = self.loop.call_later(self.output.interval, self._tick)
