"""Log a repeated failure at most once per interval, with how often it happened.

A flood (descriptors exhausted, a stranger opening connections by the hundred)
must show in the log without filling the disk: the first occurrence is logged at
once, the next ones as one line per interval that counts them.
"""
from __future__ import annotations

import logging
import threading
import time

#: Default seconds between two lines about the same failure.
LOG_INTERVAL = 10.0


class ThrottledLog:
    """``note(detail)`` for each occurrence; logs ``what`` at WARNING, counted."""

    def __init__(self, logger: logging.Logger, what: str, interval: float = LOG_INTERVAL) -> None:
        self._logger = logger
        self._what = what
        self._interval = interval
        self._lock = threading.Lock()
        self._count = 0  # occurrences not logged yet
        self._next_line = 0.0  # monotonic time after which a line may be logged

    def note(self, detail: object) -> None:
        """One more occurrence; ``detail`` is the latest cause, shown in the line."""
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if now < self._next_line:
                return
            count, self._count = self._count, 0
            self._next_line = now + self._interval
        self._logger.warning("%s (%d time%s since the last such message, at most one per "
                             "%g s): %s", self._what, count, "" if count == 1 else "s",
                             self._interval, detail)
