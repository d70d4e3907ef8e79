"""The other endpoints one endpoint knows, what we say to each, and how we judge them alive.

We know a peer from first contact (its slot appearing in our bell, or the server
pointer naming it) until it says BYE or is declared gone. To talk to it, we own a
slot in its bell (bell.py), claimed by an exclusive create; everything we tell it
(new connections, wake-ups, pings, BYE, STEPDOWN) is a counter raised or a flag
set in that slot, written in place, fsynced on a shared filesystem.

Liveness, judged on our own clock:

- a ping counter in its slot that rose since our previous look at our bell proves
  it was alive after that look (after a stall of our own, stale pings prove nothing);
  none for `liveness_timeout` and it is gone;
- where its locks are known to exclude ours (`locks_trusted`: one machine, or the
  owner lock of its bell seen held when we met, or `coherence="locks"`), a free
  owner lock means its process died: noticed within DEATH_CHECK, not the liveness
  timeout. Elsewhere a free lock proves nothing and is never looked at.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional, Set

from . import tunneldir
from .bell import SLOT_SIZE, Flag, PeerSlot, Reason, read_owner
from .coherence import AUTO, LOCK_FREE, LOCKS, ReadBuffer
from .files import TABLE, SharedFile, close_file, open_private, write_at
from .options import pings_needed

log = logging.getLogger(__name__)

DEATH_CHECK = 1.5  # how often a trusted peer's owner lock is tested while we have connections with it
MAX_SLOTS = 100_000


def machine_identity(directory: Path) -> "tuple[str, str]":
    """(view, host). Two processes with the same view (one kernel: its boot id, and one
    mount of `directory`: its device) share one page cache and one lock table, so
    their locks exclude each other. Two mounts of one filesystem on one machine
    are two clients, like two nodes (the test harness's two nodes are that)."""
    host = socket.gethostname().encode("ascii", "replace").decode().replace(" ", "_") or "?"
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = host
    view = hashlib.sha256(f"{boot} {os.stat(directory).st_dev}".encode()).hexdigest()[:16]
    return view, host


class Peer:
    """Another endpoint, with our slot in its bell and what we saw of it."""

    def __init__(self, eid: str, bell: SharedFile, slot_index: int, slot: PeerSlot, met_after_ping: int) -> None:
        self.eid = eid
        self.bell = bell
        self.slot_index = slot_index
        self.slot = slot
        self.last_seen = time.monotonic()
        self.last_ping = float("-inf")
        # our ping counter when we (re)met it: a BYE from it that saw none of our later
        # pings gave up on an earlier meeting, not on this one
        self.met_after_ping = met_after_ping
        self.pings_seen = 0  # the highest counter of its pings to us
        self.handled_conns = 0  # the number of its last connection we took up (server side)
        self.who: Optional[str] = None  # "pid P on host H", from its bell
        self.its_liveness_timeout = 0.0  # how long it waits for our pings, from its bell (0: not said)
        self.announced = False  # "appeared" logged, at its first sign of life
        self.same_machine = False
        self.locks_trusted = False
        self.why_mode = ""
        self.next_death_check = 0.0
        self.conns: Set[str] = set()

    def tell(self, sync: bool) -> None:
        """Write our slot in its bell (after changing `slot`)."""
        write_at(self.bell.fd, [self.slot.encode()], self.slot_index * SLOT_SIZE, sync)

    def bye(self, reason: Reason, bye_ping: int, sync: bool) -> None:
        """Say BYE in our slot: we shut down (CLEAN), or we gave up on it after its
        ping `bye_ping` (NO_LIFE). That slot is done with."""
        self.slot.flags |= Flag.BYE
        self.slot.reason, self.slot.bye_ping = reason, bye_ping
        self.tell(sync)

    def ping_interval(self, ours: float) -> float:
        """How often we ping it: as often as we ask of our peers, or more often if it
        gives up sooner than we do (a client asking for a 2 s liveness timeout of a
        server that uses 60 s must still hear from it within 2 s)."""
        if self.its_liveness_timeout <= 0:
            return ours
        return min(ours, pings_needed(self.its_liveness_timeout))

    @property
    def mode(self) -> str:
        """The coherence mode of this pair."""
        return LOCKS if self.locks_trusted else LOCK_FREE


def claim_slot(tunnel_dir: Path, owner: str) -> int:
    """Own the first free slot of `owner`'s bell: the file server decides exclusive creates."""
    for index in range(1, MAX_SLOTS):
        try:
            fd = open_private(str(tunneldir.slot_claim_path(tunnel_dir, owner, index)),
                              os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        close_file(fd, str(tunnel_dir))
        return index
    raise OSError(errno.ENOSPC, f"all {MAX_SLOTS} slots of bell {owner} are claimed")


def meet(tunnel_dir: Path, eid: str, slot: PeerSlot, met_after_ping: int, buffer: ReadBuffer,
         direct: bool, coherence: str, view: str) -> Peer:
    """Open `eid`'s bell, claim a slot in it, and judge what its locks are worth to us.
    FileNotFoundError if its bell is gone."""
    bell = TABLE.open(tunneldir.bell_path(tunnel_dir, eid))
    try:
        index = claim_slot(tunnel_dir, eid)
        peer = Peer(eid, bell, index, slot, met_after_ping)
        owner = read_owner(buffer.read(bell.reading_fd(direct), 0, SLOT_SIZE))
    except BaseException:
        TABLE.release(bell)
        raise
    if owner is not None:
        peer.who = f"pid {owner.pid} on host {owner.host}"
        peer.its_liveness_timeout = owner.liveness_timeout
        peer.same_machine = owner.boot == view
    peer.locks_trusted, peer.why_mode = _judge_locks(peer, coherence)
    return peer


def _judge_locks(peer: Peer, coherence: str) -> "tuple[bool, str]":
    if coherence == LOCKS:
        return True, "chosen with --coherence locks"
    if coherence == LOCK_FREE:
        return False, "chosen with --coherence lock-free"
    assert coherence == AUTO
    if peer.same_machine:
        return True, "both sides on one machine and one mount"
    held = peer.bell.alive_elsewhere()
    if held is None:
        return False, "the filesystem refuses locks"
    if held:
        return True, "its lock excludes this node"
    return False, "its lock is free while it runs: locks do not exclude across nodes here"
