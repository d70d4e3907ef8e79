"""The bell: one endpoint's inbox, read in one request however many peers it has.

An idle endpoint must look at one file per look, yet several peers, on several
nodes, must be able to announce new connections and wake-ups to it, and no two
nodes may ever write the same bytes of a file (appends from two nodes are not
atomic, and a lock may not exclude the other node). So the bell is made of fixed
slots, each with exactly one writer:

- slot 0 is the owner's: its id, pid, host and view id (who it is, and whether a
  free lock of it can be trusted as proof of death: only with the same view), and
  its liveness timeout (how often its peers must ping it);
- slot i >= 1 belongs to the peer that created the claim file `<owner>.slot-<i>`
  with O_CREAT|O_EXCL, which the file server decides for all nodes at once. In it,
  the peer keeps counters that it only ever raises: `conns` (the number of its last
  connection offered to the owner; the owner accepts every one above what it has
  seen, from `base` on), `ring` (look at my connections again), `ping` (I am
  alive), and, at the end, a BYE with the owner's last ping counter it saw and why,
  or a STEPDOWN (I am the new server).

Every slot carries a CRC: a slot read while it is being rewritten is ignored, and
read again at the next look.
"""
from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from typing import Dict, Iterator, Optional, Tuple

SLOT_SIZE = 64
_PEER = struct.Struct(">2sBB8sIIIIIB")  # magic, version, flags, eid, base, conns, ring, ping, bye_ping, reason
_OWNER = struct.Struct(">2sBB8sI8s32sI")  # magic, version, flags, eid, pid, view id, host, liveness ms
_CRC = struct.Struct(">I")
PEER_MAGIC, OWNER_MAGIC = b"FP", b"FO"
VERSION = 1
FIRST_LOOK = 64 * SLOT_SIZE  # how much of a bell its owner reads at first; more once slots fill up


class Flag(enum.IntFlag):
    """What a peer's slot says beyond its counters."""

    BYE = 1  # every connection with the sender is gone (reason: Reason)
    STEPDOWN = 2  # the sender took over the server pointer: the owner must stop serving


class Reason(enum.IntEnum):
    """Why a BYE was said."""

    CLEAN = 0  # the sender shut down
    NO_LIFE = 1  # the sender saw no sign of life from the owner and gave up on it


@dataclasses.dataclass
class PeerSlot:
    """What one peer says to the owner of a bell."""

    eid: str
    base: int = 0
    conns: int = 0
    ring: int = 0
    ping: int = 0
    flags: Flag = Flag(0)
    bye_ping: int = 0
    reason: Reason = Reason.CLEAN

    def encode(self) -> bytes:
        """The slot's 64 bytes."""
        body = _PEER.pack(PEER_MAGIC, VERSION, self.flags, bytes.fromhex(self.eid), self.base, self.conns,
                          self.ring, self.ping, self.bye_ping, self.reason)
        return _seal(body)


@dataclasses.dataclass(frozen=True)
class OwnerSlot:
    """Who owns a bell."""

    eid: str
    pid: int
    boot: str  # 16 hex digits: the owner's kernel and mount of the directory (peers.machine_identity)
    host: str
    liveness_timeout: float = 0.0  # seconds without a sign of life before it gives up on a peer; 0: not said

    def encode(self) -> bytes:
        """Slot 0's 64 bytes."""
        body = _OWNER.pack(OWNER_MAGIC, VERSION, 0, bytes.fromhex(self.eid), self.pid,
                           bytes.fromhex(self.boot), self.host.encode("ascii", "replace")[:32],
                           round(self.liveness_timeout * 1000))
        return _seal(body)


def _seal(body: bytes) -> bytes:
    padded = body + bytes(SLOT_SIZE - _CRC.size - len(body))
    return padded + _CRC.pack(zlib.crc32(padded))


def _unseal(raw: memoryview) -> Optional[memoryview]:
    if len(raw) < SLOT_SIZE or not any(raw):
        return None
    (crc,) = _CRC.unpack_from(raw, SLOT_SIZE - _CRC.size)
    return raw if zlib.crc32(raw[:SLOT_SIZE - _CRC.size]) == crc else None


def read_owner(raw: memoryview) -> Optional[OwnerSlot]:
    """Slot 0 of a bell, or None if it is empty or being written."""
    body = _unseal(raw[:SLOT_SIZE])
    if body is None:
        return None
    magic, version, _, eid, pid, boot, host, liveness_ms = _OWNER.unpack_from(body)
    if magic != OWNER_MAGIC or version != VERSION:
        return None
    return OwnerSlot(eid.hex(), pid, boot.hex(), host.rstrip(b"\0").decode("ascii", "replace"),
                     liveness_ms / 1000)


def read_peers(raw: memoryview) -> Iterator[Tuple[int, Optional[PeerSlot]]]:
    """(slot index, slot) of every peer slot in use in a bell's bytes; the slot is
    None where it cannot be read (being rewritten, or damaged)."""
    for index in range(1, -(-len(raw) // SLOT_SIZE)):  # a short last slot too: being written, or damage
        chunk = raw[index * SLOT_SIZE:(index + 1) * SLOT_SIZE]
        if not any(chunk):
            continue
        body = _unseal(chunk)
        if body is None:
            yield index, None
            continue
        magic, version, flags, eid, base, conns, ring, ping, bye_ping, reason = _PEER.unpack_from(body)
        try:
            if magic != PEER_MAGIC or version != VERSION:
                raise ValueError(f"magic {magic!r}, version {version}")
            yield index, PeerSlot(eid.hex(), base, conns, ring, ping, Flag(flags), bye_ping, Reason(reason))
        except ValueError:  # another version's, or a flag or reason we do not know: not ours to guess
            yield index, None


def look_size(slots: Dict[int, PeerSlot]) -> int:
    """How much of its bell an owner reads: every slot in use, and room for newcomers."""
    highest = max(slots, default=0)
    return max(FIRST_LOOK, (highest + 64) * SLOT_SIZE)
