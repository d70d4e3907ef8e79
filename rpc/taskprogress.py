"""``rpc.report_progress``: a task running on a pool's worker tells its caller how far it got.

The worker (``worker.py``) runs each task with a :class:`ProgressReporter` as the
current one; :func:`report_progress` hands it the value. The reporter sends at most
one update per ``interval`` to the pool, so a task that reports in a tight loop
costs the shared filesystem a few requests per second, not one per call; the value
it held back is sent when the interval ends, so the latest one always arrives.
Outside a pool task (a plain script, a test, a function served by ``rpc.serve``)
:func:`report_progress` does nothing.
"""
from __future__ import annotations

import contextvars
import math
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

#: A fraction done (0 to 1), or a message.
Progress = Union[float, str]

#: Seconds between two updates of one task sent to the pool.
DEFAULT_INTERVAL = 0.25
#: Longest message sent; the rest is cut.
MAX_MESSAGE = 200

_current: contextvars.ContextVar[Optional["ProgressReporter"]] = contextvars.ContextVar(
    "rpc_task_progress", default=None)


def report_progress(fraction_or_message: Union[float, str]) -> None:
    """Inside a pool task: tell the caller how far the task got, a fraction from 0
    to 1 or a short message. The caller sees it as ``future.progress``, in
    ``pool.info()`` and on the ``progress=True`` line. Call it as often as you like
    (updates are throttled); from the task's own thread. Anywhere else, a no-op."""
    value = checked_progress(fraction_or_message)
    reporter = _current.get()
    if reporter is not None:
        reporter.report(value)


def checked_progress(value: object) -> Progress:
    """``value`` as sent: a float in [0, 1], or a string of at most MAX_MESSAGE."""
    if isinstance(value, str):
        return value[:MAX_MESSAGE]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"progress is a fraction (0 to 1) or a message (str), "
                        f"not {type(value).__name__}")
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"a progress fraction is between 0 and 1, got {value!r}")
    return float(value)


class ProgressReporter:
    """Sends one task's progress with ``send``, at most once per ``interval``."""

    def __init__(self, send: Callable[[Progress], None],
                 interval: float = DEFAULT_INTERVAL) -> None:
        self._send = send
        self._interval = interval
        self._lock = threading.Lock()
        self._next_send = 0.0  # monotonic time from which a value may be sent at once
        self._held: Optional[Progress] = None  # the latest value not sent yet
        self._timer: Optional[threading.Timer] = None  # sends ``_held`` when it is due
        self._closed = False

    def report(self, value: Progress) -> None:
        """Send ``value`` now if the interval has passed, else when it does."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return
            if self._timer is None and now >= self._next_send:
                self._next_send = now + self._interval
            else:
                self._held = value
                if self._timer is None:
                    self._timer = threading.Timer(self._next_send - now, self._send_held)
                    self._timer.name, self._timer.daemon = "rpc-task-progress", True
                    self._timer.start()
                return
        self._send(value)

    def close(self) -> None:
        """The task ended: a value still held back no longer matters."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()

    def _send_held(self) -> None:
        with self._lock:
            value, self._held, self._timer = self._held, None, None
            if self._closed or value is None:
                return
            self._next_send = time.monotonic() + self._interval
        self._send(value)


@contextmanager
def reporting(reporter: ProgressReporter) -> Iterator[None]:
    """Make ``reporter`` the one :func:`report_progress` uses, for the block's task."""
    token = _current.set(reporter)
    try:
        yield
    finally:
        _current.reset(token)
        reporter.close()
