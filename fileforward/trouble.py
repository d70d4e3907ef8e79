"""Endpoint-wide filesystem errors: reported, retried with backoff, fatal once persistent.

An error that concerns one connection ends that connection (the endpoint handles it
where it happens). What is left is an error of the whole endpoint (its bell, its
directory, the server pointer): the filesystem may recover (space freed, a mount
back), so the endpoint retries; but an endpoint that cannot serve must not stay up
looking alive, so after `give_up_after` seconds of failure it stops.
"""
from __future__ import annotations

import logging
from typing import Optional

from .errors import EndpointFailedError

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0


class Trouble:
    """The state of an endpoint-wide error, from its first occurrence to its end."""

    def __init__(self, where: str, give_up_after: float) -> None:
        self.where = where
        self.give_up_after = give_up_after
        self.since: Optional[float] = None
        self._delay = BACKOFF_MIN
        self._reported = ""

    def failed(self, exc: OSError, now: float) -> float:
        """Record a failed cycle; returns how long to wait before the next try.

        Logs at WARNING the first time, and whenever the error changes. Raises
        EndpointFailedError once errors have lasted `give_up_after` seconds.
        """
        if self.since is None:
            self.since, self._delay = now, BACKOFF_MIN
        if now - self.since >= self.give_up_after:
            raise EndpointFailedError(
                f"{self.where}: {exc} (failing for {now - self.since:.0f} s; giving up)") from exc
        if str(exc) != self._reported:
            self._reported = str(exc)
            log.warning("%s: %s; retrying for up to %g s", self.where, exc, self.give_up_after)
        delay, self._delay = self._delay, min(self._delay * 2, BACKOFF_MAX)
        return delay

    def cleared(self, now: float) -> None:
        """A cycle succeeded: the error (if any) is over."""
        if self.since is not None:
            log.warning("%s: works again after %.1f s", self.where, now - self.since)
            self.since, self._reported = None, ""
