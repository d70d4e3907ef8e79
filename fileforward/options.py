"""Tunable knobs of an endpoint, with their documented defaults."""
from __future__ import annotations

import dataclasses

from .coherence import AUTO, COHERENCE_CHOICES

MiB = 1024 * 1024


def pings_needed(liveness_timeout: float) -> float:
    """How often to prove we live to a peer that gives up after `liveness_timeout`:
    five times within it, so that a late look or two does not cost the connections."""
    return liveness_timeout / 5


@dataclasses.dataclass(frozen=True)
class Options:
    """Every knob of the transport. The defaults suit a shared NFS home directory.

    - liveness_timeout: a peer that shows no sign of life for this long (seconds,
      on our own clock) is declared dead and its connections fail.
    - connect_timeout: how long open_connection waits for a live server.
    - poll_min / poll_max: polling interval while data flows, and the ceiling an
      idle endpoint backs off to (the idle cost is a few filesystem calls per
      poll_max, whatever the number of open connections).
    - window: per connection and direction, the most data in flight beyond what
      the receiving protocol took (on disk, or read and held while it pauses).
    - chunk: the largest data record.
    - slow_call_warning: a filesystem call outstanding this long is logged.
    - give_up_after: an endpoint-wide filesystem error (not one connection's) is
      retried with backoff for this long (seconds); then the endpoint fails.
    - coherence: "auto" (the default) trusts a peer's locks for fast death detection
      only where they were seen to exclude ours; "locks" always, "lock-free" never
      (coherence.py). Data never depends on locks.
    """

    liveness_timeout: float = 15.0
    connect_timeout: float = 10.0
    poll_min: float = 0.0002
    poll_max: float = 0.12
    window: int = 4 * MiB
    chunk: int = 1 * MiB
    slow_call_warning: float = 5.0
    give_up_after: float = 60.0
    coherence: str = AUTO

    def __post_init__(self) -> None:
        for name in ("liveness_timeout", "connect_timeout", "poll_min", "poll_max", "slow_call_warning",
                     "give_up_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.poll_min > self.poll_max:
            raise ValueError(f"poll_min ({self.poll_min}) must not exceed poll_max ({self.poll_max})")
        if self.poll_max * 4 > self.liveness_timeout:
            raise ValueError(
                f"liveness_timeout ({self.liveness_timeout} s) must be at least 4x poll_max ({self.poll_max} s)"
            )
        if self.coherence not in COHERENCE_CHOICES:
            raise ValueError(f"coherence must be one of {', '.join(COHERENCE_CHOICES)}, got {self.coherence!r}")
        if self.chunk < 1024 or self.window < self.chunk:
            raise ValueError(f"need 1 KiB <= chunk ({self.chunk}) <= window ({self.window})")

    @property
    def segment_bytes(self) -> int:
        """A connection file this long goes on in a new segment (the reader removes
        the finished one): at most about two segments per direction on disk."""
        return 2 * self.window

    @property
    def ping_interval(self) -> float:
        """How often an endpoint proves it is alive to a peer that waits as long as
        it does (see peers.Peer.ping_interval)."""
        return pings_needed(self.liveness_timeout)

    @property
    def wake_after_idle(self) -> float:
        """A writer rings the reader's bell when an append returns more than this
        after the previous append to the same file began (see ARCHITECTURE.md,
        "The wake-up protocol")."""
        return 1.0

    @property
    def cool_after(self) -> float:
        """A reader keeps polling a connection directly until an empty poll that
        started this long after the end of its last fruitful drain (then it waits
        for the bell).

        Longer than wake_after_idle, so that a write the reader can miss always rings.
        """
        return self.wake_after_idle + 0.25

    def replace(self, **changes: object) -> "Options":
        """A copy with some knobs changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
