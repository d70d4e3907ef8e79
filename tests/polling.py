"""The one way tests wait for a condition that nothing signals: poll it, with a deadline.

Use an event (threading.Event, a log line read by a thread) where one exists; poll
only what nobody announces (a file appearing, a counter in another process). A
timeout fails with the name of what was awaited, so a failed run says what did not
happen. Both twins share one schedule: check first, then the deadline, then a pause
that grows from 1 ms to ``interval`` (quick when the condition is nearly met, cheap
on a loaded machine when it is not).
"""
import asyncio
import time
from typing import Callable, Optional, TypeVar

T = TypeVar("T")

#: Seconds a wait lasts unless the caller says otherwise: generous, as the test
#: machines are loaded, yet bounded well below pytest-timeout's limit.
DEFAULT_TIMEOUT = 10.0
#: Longest pause between two checks (seconds).
DEFAULT_INTERVAL = 0.05
FIRST_PAUSE = 0.001


class WaitTimeout(AssertionError):
    """The awaited condition did not hold within the deadline (a test failure)."""


class _Schedule:
    """When to check again, and when to give up."""

    def __init__(self, timeout: float, what: str, interval: float,
                 seen: Optional[Callable[[], object]]) -> None:
        self.timeout, self.what, self.seen = timeout, what, seen
        self.deadline = time.monotonic() + timeout
        self.interval = interval
        self.pause = min(FIRST_PAUSE, interval)

    def next_pause(self) -> float:
        """The pause before the next check; raises WaitTimeout past the deadline."""
        if time.monotonic() > self.deadline:
            seen = f"; last seen: {self.seen()!r}" if self.seen is not None else ""
            raise WaitTimeout(f"timed out after {self.timeout:g} s waiting for {self.what}{seen}")
        pause, self.pause = self.pause, min(self.pause * 2, self.interval)
        return pause


def wait_until(check: Callable[[], Optional[T]], timeout: float = DEFAULT_TIMEOUT, *,
               what: str, interval: float = DEFAULT_INTERVAL,
               pause: Callable[[float], None] = time.sleep,
               seen: Optional[Callable[[], object]] = None) -> T:
    """Call ``check`` until it returns something true, and return that.

    ``pause(seconds)`` waits between checks: a library that runs its event handlers
    only inside its own calls (playwright) passes its own wait. ``seen()`` describes
    the state a timeout reports (what was there instead).
    """
    schedule = _Schedule(timeout, what, interval, seen)
    while True:
        result = check()
        if result:
            return result
        pause(schedule.next_pause())


async def async_wait_until(check: Callable[[], Optional[T]], timeout: float = DEFAULT_TIMEOUT,
                           *, what: str, interval: float = DEFAULT_INTERVAL,
                           seen: Optional[Callable[[], object]] = None) -> T:
    """:func:`wait_until` inside an event loop: the loop runs on between checks."""
    schedule = _Schedule(timeout, what, interval, seen)
    while True:
        result = check()
        if result:
            return result
        await asyncio.sleep(schedule.next_pause())
