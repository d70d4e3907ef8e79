"""On-disk record framing shared by the chunk files and the bell files.

Every record is a fixed header followed by its payload::

    magic b"FF" | format version (1 byte) | kind (1 byte) | payload length (4 bytes, big endian)

Records are appended only while holding the file's lock, so a reader holding the
lock never sees a writer's partial record: a short or malformed tail means the file
was damaged (or written by a different version) and is reported, never guessed at.
"""
from __future__ import annotations

import enum
import struct
from typing import List, Optional, Tuple

from .errors import ProtocolError

MAGIC = b"FF"
FORMAT_VERSION = 1
HEADER = struct.Struct(">2sBBI")
MAX_PAYLOAD = 64 * 1024 * 1024


class Kind(enum.IntEnum):
    """Record kinds. Chunk files carry 1-9, bell files carry 16 and up."""

    DATA = 1  # payload: stream bytes
    EOF = 2  # the writer will send no more data (half-close)
    CLOSE = 3  # EOF, and the writer will read no more either
    RESET = 4  # payload: why (empty: a plain abort); the connection is aborted. Answered with a RESET
    #            by the receiver, so that both sides release the connection at once
    ACCEPT = 5  # first record from the server: the connection is established
    REFUSE = 6  # payload: reason text; the server will not take the connection
    CONNECT = 16  # payload: "<sender eid> <connection id>"
    WAKE = 17  # payload: "<sender eid> <connection id>": look at that chunk file
    PING = 18  # payload: "<sender eid> <counter> [<pid> <host>]": the sender is alive (a new counter)
    BYE = 19  # payload: "<sender eid> [<counter> <why>]": every connection with the sender is gone;
    #           alone: it shut down cleanly, else it gave up on the receiver (e.g. no sign of life)
    #           after the receiver's PING <counter> (so a receiver that met it again since ignores it)
    STEPDOWN = 20  # payload: "<sender eid> <description>": a new server took over


Record = Tuple[Kind, memoryview]


def encode(kind: Kind, payload: bytes = b"") -> bytes:
    """One framed record."""
    return HEADER.pack(MAGIC, FORMAT_VERSION, kind, len(payload)) + payload


def encode_text(kind: Kind, *fields: object) -> bytes:
    """A record whose payload is space-separated ASCII fields (bell records)."""
    return encode(kind, " ".join(str(f) for f in fields).encode("ascii"))


def decode(buf: bytes) -> List[Record]:
    """All records in `buf`, which must hold whole records only.

    Payloads are zero-copy views into `buf`.

    Raises ProtocolError for a bad magic, an unknown version or kind, an absurd
    length or a truncated tail; the caller decides which connection that breaks.
    """
    records, damage = decode_until_damage(buf)
    if damage is not None:
        raise damage
    return records


def decode_until_damage(buf: bytes) -> Tuple[List[Record], Optional[ProtocolError]]:
    """The whole records before any damage in `buf`, and the damage (None if there is none).

    For files whose records are independent of each other (bells): what was
    appended before a damaged record is still good.
    """
    records: List[Record] = []
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < HEADER.size:
            return records, ProtocolError(f"truncated record header at offset {pos}")
        magic, version, kind, length = HEADER.unpack_from(view, pos)
        if magic != MAGIC:
            return records, ProtocolError(f"bad record magic {bytes(magic)!r} at offset {pos}")
        if version != FORMAT_VERSION:
            return records, ProtocolError(
                f"record format version {version} at offset {pos}; this fileforward "
                f"speaks version {FORMAT_VERSION}: run the same fileforward version on both sides"
            )
        if length > MAX_PAYLOAD:
            return records, ProtocolError(f"record length {length} at offset {pos} exceeds {MAX_PAYLOAD}")
        try:
            kind = Kind(kind)
        except ValueError:
            return records, ProtocolError(f"unknown record kind {kind} at offset {pos}")
        start = pos + HEADER.size
        if start + length > end:
            return records, ProtocolError(f"truncated record at offset {pos}: {length} bytes announced")
        records.append((kind, view[start : start + length]))
        pos = start + length
    return records, None


def text_fields(payload: memoryview) -> List[str]:
    """The fields of an encode_text payload."""
    try:
        return bytes(payload).decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProtocolError("bell record payload is not ASCII") from None
