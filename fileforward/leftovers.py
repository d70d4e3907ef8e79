"""Whose files may be removed: a bell's owner is dead only on evidence valid here.

A free owner lock proves that its holder exited only where locks exclude across
the machines that share the directory: on our own machine (same view of the
directory), where we saw them exclude when we met that endpoint, or with coherence
"locks". Another node's endpoint is judged by silence alone (peers.py), and what
it left is not ours to remove.
"""
from __future__ import annotations

import logging
from pathlib import Path

from . import tunneldir
from .bell import SLOT_SIZE, read_owner
from .coherence import LOCKS, DataPath, ReadBuffer
from .files import TABLE

log = logging.getLogger(__name__)


class Leftovers:
    """Judges endpoints of one tunnel directory dead, and removes what dead ones left."""

    def __init__(self, tunnel_dir: Path, view: str, coherence: str, data: DataPath, buffer: ReadBuffer) -> None:
        self.tunnel_dir = tunnel_dir
        self._view = view
        self._coherence = coherence
        self._data = data
        self._buffer = buffer  # the I/O thread's read buffer: judge only on that thread

    def owner_dead(self, bell: Path, trusted: bool = False) -> bool:
        """Whether the owner of `bell` is known dead: its owner lock is free, and its
        lock would exclude ours (`trusted`: seen to when we met; or it ran with our
        view of the directory, or coherence is "locks")."""
        if TABLE.local_alive_holder(bell):
            return False
        try:
            shared = TABLE.open(bell)
        except FileNotFoundError:
            return False
        try:
            if self._coherence != LOCKS and not trusted:
                owner = read_owner(self._buffer.read(shared.reading_fd(self._data.direct), 0, SLOT_SIZE))
                if owner is not None and owner.boot != self._view:
                    return False
            return shared.alive_elsewhere() is False
        except FileNotFoundError:  # removed meanwhile: by its owner, or a cleaner
            return False
        finally:
            TABLE.release(shared)

    def clear(self, own_eid: str) -> None:
        """Remove what endpoints known dead left behind (every owner but `own_eid`)."""
        for owner, names in tunneldir.files_by_owner(self.tunnel_dir, own_eid).items():
            bells = [n for n in names if n.endswith(tunneldir.BELL_SUFFIX)] or \
                    [n for n in names if n.endswith(tunneldir.NEW_SUFFIX)]
            if bells and not self.owner_dead(self.tunnel_dir / bells[0]):
                continue
            log.info("tunnel directory %s: removing %d file(s) left by a dead endpoint %s",
                     self.tunnel_dir, len(names), owner)
            for name in names:
                TABLE.unlink(self.tunnel_dir / name)
