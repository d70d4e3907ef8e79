"""On-disk record framing of the connection files (format 2).

Every record is a fixed header followed by its payload::

    magic b"FF" | format version (1 byte) | kind (1 byte) | payload length (4 bytes)
    | sequence number (4 bytes) | CRC-32 of the header's first 12 bytes and the payload (4 bytes)

all big endian. A connection file has one writer, which appends records numbered
0, 1, 2, ... (the numbering goes on across the file's segments), and one reader,
which never truncates or rewrites it. The reader may look while a write is still
arriving, so what it sees past the last whole record can be incomplete, or even
torn (on a shared filesystem, parts of one write can become visible out of order):
`StreamDecoder` reports that as "not yet", and the caller gives up only when it
does not heal. A record with a valid checksum but the wrong number (a gap, a
duplicate, a stale copy) is damage at once, never delivered.
"""
from __future__ import annotations

import enum
import struct
import zlib
from typing import List, NamedTuple, Optional, Tuple

from .errors import ProtocolError

MAGIC = b"FF"
FORMAT_VERSION = 2
_CHECKED = struct.Struct(">2sBBII")  # what the checksum covers, besides the payload
_CRC = struct.Struct(">I")
HEADER_SIZE = _CHECKED.size + _CRC.size
MAX_PAYLOAD = 64 * 1024 * 1024
_POSITION = struct.Struct(">Q")


class Kind(enum.IntEnum):
    """Record kinds of a connection file."""

    DATA = 1  # payload: stream bytes
    EOF = 2  # the writer will send no more data (half-close); ACKs may still follow
    CLOSE = 3  # EOF, and the writer will read no more either: the file's last record
    RESET = 4  # payload: why (empty: a plain abort); the file's last record. Answered with a RESET
    #            by the receiver, so that both sides release the connection at once
    ACCEPT = 5  # first record from the server: the connection is established
    REFUSE = 6  # payload: reason text; the server will not take the connection
    ACK = 7  # payload: u64 position: the writer has read the other direction up to there
    NEXT = 8  # the file's last record: the stream goes on in the next segment file


class Record(NamedTuple):
    """One decoded record; `payload` is a view into the buffer it was decoded from."""

    kind: Kind
    payload: memoryview


def header(kind: Kind, payload: bytes, seq: int) -> bytes:
    """The header of a record carrying `payload`: writers send it and the payload as
    two buffers, so that a large payload is never copied."""
    checked = _CHECKED.pack(MAGIC, FORMAT_VERSION, kind, len(payload), seq)
    return checked + _CRC.pack(zlib.crc32(payload, zlib.crc32(checked)))


def encode(kind: Kind, payload: bytes = b"", seq: int = 0) -> bytes:
    """One whole record."""
    return header(kind, payload, seq) + payload


def encode_position(position: int) -> bytes:
    """The payload of an ACK."""
    return _POSITION.pack(position)


def decode_position(payload: memoryview) -> int:
    """The position an ACK carries."""
    if len(payload) != _POSITION.size:
        raise ProtocolError(f"ACK record of {len(payload)} bytes")
    return _POSITION.unpack(payload)[0]


class Problem(NamedTuple):
    """Why decoding stopped before the end of the buffer: `fatal` damage, or bytes
    that may still be arriving (they must heal soon, or the caller calls it damage)."""

    error: ProtocolError
    fatal: bool


class StreamDecoder:
    """Decodes one connection file's records, in order, checking every number."""

    def __init__(self) -> None:
        self.seq = 0  # the number of the next record

    def decode(self, buf: memoryview) -> Tuple[List[Record], int, Optional[Problem]]:
        """The whole, valid records at the start of `buf`, how many bytes they take,
        and why decoding stopped early (None: at the end of `buf`, or at a record
        whose bytes have not all arrived). Stops after a NEXT record: what follows
        it belongs to no segment."""
        records: List[Record] = []
        pos, end = 0, len(buf)
        while end - pos >= HEADER_SIZE:
            magic, version, kind, length, seq = _CHECKED.unpack_from(buf, pos)
            if magic != MAGIC:
                return records, pos, Problem(ProtocolError(f"bad record magic {bytes(magic)!r}"), fatal=False)
            if version != FORMAT_VERSION:
                return records, pos, Problem(ProtocolError(
                    f"record format version {version}; this fileforward speaks version {FORMAT_VERSION}: "
                    f"run the same fileforward version on both sides"), fatal=True)
            if length > MAX_PAYLOAD:
                return records, pos, Problem(ProtocolError(f"record length {length} exceeds {MAX_PAYLOAD}"),
                                             fatal=False)
            start = pos + HEADER_SIZE
            if start + length > end:
                return records, pos, None
            payload = buf[start:start + length]
            (crc,) = _CRC.unpack_from(buf, pos + _CHECKED.size)
            if zlib.crc32(payload, zlib.crc32(buf[pos:pos + _CHECKED.size])) != crc:
                return records, pos, Problem(ProtocolError(f"record {self.seq}: bad checksum"), fatal=False)
            if seq != self.seq:
                what = "a gap" if seq > self.seq else "a duplicate or stale record"
                return records, pos, Problem(ProtocolError(
                    f"record number {seq} where {self.seq} was due ({what})"), fatal=True)
            try:
                kind = Kind(kind)
            except ValueError:
                return records, pos, Problem(ProtocolError(f"unknown record kind {kind}"), fatal=True)
            records.append(Record(kind, payload))
            self.seq += 1
            pos = start + length
            if kind is Kind.NEXT:
                break
        return records, pos, None


def decode(buf: bytes) -> List[Record]:
    """Every record of a whole stream in `buf` (tests and tools); ProtocolError for
    anything but whole, valid, consecutive records."""
    records, used, problem = StreamDecoder().decode(memoryview(buf))
    if problem is not None:
        raise problem.error
    if used != len(buf):
        raise ProtocolError(f"truncated record at offset {used}")
    return records
