"""The wire format: frames as bytes, and the payload of each message kind.

Pure functions and a decoder; no state beyond one frame being parsed. The rules of
a conversation (handshake, request ids, credit, ...) live in :mod:`rpc.protocol`.

Wire format of a frame (network byte order, 16-byte header)::

    u32 payload length | u8 protocol version | u8 kind | u16 flags | u64 request id
    payload

Handshake frames (HELLO, AUTH, AUTH_OK, REJECT) carry JSON, never pickle: nothing is
unpickled before both sides have proved that they hold the key.
"""
from __future__ import annotations

import enum
import json
import pickle
import struct
import traceback
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple, Union

import cloudpickle

from .errors import ProtocolError, RemoteSerializationError, RemoteTraceback

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!IBBHQ")
#: Frames are limited before authentication so that a stranger cannot make us allocate.
HANDSHAKE_MAX_FRAME = 64 * 1024
#: Default limit of one frame's payload; a 256 MiB argument fits with room to spare.
DEFAULT_MAX_FRAME = 1 << 30
#: The u32 length field cannot express more.
ABSOLUTE_MAX_FRAME = (1 << 32) - 1
_CREDIT = struct.Struct("!I")
_NAME = struct.Struct("!H")

Buffer = Union[bytes, bytearray, memoryview]
#: A frame payload: one buffer, or a tuple of parts sent back to back (no join copy).
Payload = Union[Buffer, Tuple[Buffer, ...]]


class Kind(enum.IntEnum):
    """Message kinds. The request id ties every reply to its CALL or INFO."""

    HELLO = 1        # JSON: protocol and library versions, a nonce
    AUTH = 2         # JSON: the client's HMAC over both nonces
    AUTH_OK = 3      # JSON: the server's HMAC over both nonces
    REJECT = 4       # JSON: why the handshake failed; the connection then closes
    CALL = 5         # pickle: (name, args, kwargs)
    RESULT = 6       # pickle: the return value (or nothing, with Flag.STREAM)
    ERROR = 7        # pickle: see pack_error
    STREAM_ITEM = 8  # pickle: one item produced by a generator
    STREAM_END = 9   # empty: the generator is exhausted
    CANCEL = 10      # empty: the client gave up on this request id
    CREDIT = 11      # u32: the client may receive that many more stream items
    PING = 12        # empty: liveness probe, answered with PONG
    PONG = 13
    INFO = 14        # empty request; answered with RESULT carrying a dict


class Flag(enum.IntFlag):
    """Header flags."""

    NONE = 0
    #: On RESULT: the function is a generator; STREAM_ITEM frames follow.
    STREAM = 1


#: Header values to enum members, by dictionary: ``Kind(n)`` costs a microsecond.
_KINDS = {int(kind): kind for kind in Kind}
_FLAGS = {int(flag): flag for flag in Flag.__members__.values()}  # with NONE


class Frame(NamedTuple):
    """One decoded frame."""

    kind: Kind
    request_id: int
    flags: Flag
    payload: Buffer
    version: int = PROTOCOL_VERSION


def check_max_frame(max_frame: int) -> int:
    """Validate a configured maximum payload size."""
    if not 0 < max_frame <= ABSOLUTE_MAX_FRAME:
        raise ValueError(f"max_frame must be in 1..{ABSOLUTE_MAX_FRAME}, got {max_frame}")
    return max_frame


def encode_frame(kind: Kind, request_id: int = 0, payload: Payload = b"",
                 flags: Flag = Flag.NONE) -> bytes:
    """Header and payload as one ``bytes`` (for small frames)."""
    parts = payload if isinstance(payload, tuple) else (payload,)
    return b"".join((encode_header(kind, request_id, payload_size(payload), flags),) + parts)


def payload_size(payload: Payload) -> int:
    """Length of a payload given as one buffer or a tuple of parts."""
    return sum(map(len, payload)) if isinstance(payload, tuple) else len(payload)


def encode_header(kind: Kind, request_id: int, length: int, flags: Flag = Flag.NONE) -> bytes:
    """The 16-byte header of a frame whose payload is sent separately (large frames)."""
    return HEADER.pack(length, PROTOCOL_VERSION, kind, flags, request_id)


class FrameDecoder:
    """Incremental frame parser: feed it bytes as they arrive, get whole frames back.

    A large payload is assembled in one preallocated buffer, so receiving it costs
    one copy of its size and never more.
    """

    def __init__(self, max_frame: int = HANDSHAKE_MAX_FRAME) -> None:
        self.max_frame = check_max_frame(max_frame)
        self._head = bytearray()
        self._pending: Optional[Tuple[Kind, int, Flag, int, int]] = None
        self._body = bytearray()
        self._filled = 0

    def feed(self, data: Buffer) -> List[Frame]:
        """Consume ``data``; return the frames it completed (maybe none)."""
        return list(self.decode(data))

    def decode(self, data: Buffer) -> Iterator[Frame]:
        """Consume ``data``, yielding each frame it completes as soon as it is whole.

        Each header is checked against :attr:`max_frame` as it is then, so a limit
        raised on one frame (the end of the handshake) applies to the next.
        Raises :class:`ProtocolError` on a malformed header; the stream is then
        unusable, as there is no way to find the next frame boundary.
        """
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._pending is None:
                if self._head or end - pos < HEADER.size:
                    take = min(HEADER.size - len(self._head), end - pos)
                    self._head += view[pos:pos + take]
                    pos += take
                    if len(self._head) < HEADER.size:
                        break
                    header: Buffer = bytes(self._head)
                    self._head.clear()
                else:
                    header = view[pos:pos + HEADER.size]
                    pos += HEADER.size
                self._pending = self._parse_header(header)
                length = self._pending[3]
                if length <= end - pos:  # whole payload already here: no staging copy
                    pos += length
                    yield self._frame(bytes(view[pos - length:pos]))
                    continue
                self._body = bytearray(length)
                self._filled = 0
            length = self._pending[3]
            take = min(length - self._filled, end - pos)
            self._body[self._filled:self._filled + take] = view[pos:pos + take]
            self._filled += take
            pos += take
            if self._filled == length:
                body, self._body = self._body, bytearray()
                yield self._frame(body)

    def _frame(self, payload: Buffer) -> Frame:
        assert self._pending is not None
        kind, rid, flags, _, version = self._pending
        self._pending = None
        return Frame(kind, rid, flags, payload, version)

    def _parse_header(self, header: Buffer) -> Tuple[Kind, int, Flag, int, int]:
        length, version, number, flags, rid = HEADER.unpack(header)
        kind = _KINDS.get(number)
        if kind is None:
            raise ProtocolError(f"malformed frame: unknown message kind {number}")
        # HELLO is the one frame read across versions, so that a mismatch can be
        # reported with both version numbers instead of as garbage.
        if version != PROTOCOL_VERSION and kind is not Kind.HELLO:
            raise ProtocolError(f"malformed frame: protocol version {version}, "
                                f"expected {PROTOCOL_VERSION}")
        if length > self.max_frame:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of "
                                f"{self.max_frame} bytes")
        flag = _FLAGS.get(flags)
        return kind, rid, Flag(flags) if flag is None else flag, length, version

    def mid_frame(self) -> bool:
        """True if part of a frame has arrived but not all of it (EOF here = truncation)."""
        return bool(self._head) or self._pending is not None


# ---------------------------------------------------------------- payloads

def dumps(obj: Any) -> bytes:
    """Pickle with cloudpickle (functions and lambdas defined in scripts travel too)."""
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: Buffer) -> Any:
    """Unpickle a payload. Only ever called after authentication."""
    return pickle.loads(data)


def encode_call(name: str, args: tuple, kwargs: dict) -> Tuple[bytes, bytes]:
    """CALL payload as two parts: the function name, then the pickled arguments.

    The name travels outside the pickle so the server can find the function (or
    refuse an unknown name) without unpickling, and unpickle in a worker thread.
    Two parts, because joining them would copy a large argument once more.
    """
    raw = name.encode()
    return _NAME.pack(len(raw)) + raw, dumps((args, kwargs))


def decode_call(payload: Buffer) -> Tuple[str, memoryview]:
    """Split a CALL payload into the name and the still pickled arguments."""
    view = memoryview(payload)
    if len(view) < _NAME.size:
        raise ProtocolError("malformed CALL frame: too short")
    (size,) = _NAME.unpack(view[:_NAME.size])
    end = _NAME.size + size
    try:
        name = bytes(view[_NAME.size:end]).decode()
    except UnicodeDecodeError:
        raise ProtocolError("malformed CALL frame: function name is not UTF-8") from None
    if end > len(view):
        raise ProtocolError("malformed CALL frame: name longer than the frame")
    return name, view[end:]


def encode_json(obj: dict) -> bytes:
    """Handshake payloads are JSON so that they are safe to read before auth."""
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(data: Buffer) -> dict:
    """Parse a handshake payload; anything but a JSON object is a protocol error."""
    try:
        obj = json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested input
        raise ProtocolError(f"malformed handshake message: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed handshake message: not a JSON object")
    return obj


def encode_credit(count: int) -> bytes:
    """Payload of a CREDIT frame."""
    return _CREDIT.pack(count)


def decode_credit(data: Buffer) -> int:
    """Parse a CREDIT payload."""
    if len(data) != _CREDIT.size:
        raise ProtocolError(f"malformed CREDIT frame of {len(data)} bytes")
    return _CREDIT.unpack(data)[0]


def pack_error(exc: BaseException, limit: Optional[int] = None) -> bytes:
    """ERROR payload: type name, message, traceback text, and the pickled exception.

    The exception is pickled on its own (or not at all, if that fails) so that the
    client can fall back to a RuntimeError when it cannot rebuild it. One whose
    ``str()`` fails is not sent at all: the client gets ``RuntimeError("Server-side
    <Type>: <unprintable>")``. With a ``limit``, parts are dropped (the pickled
    exception, then the traceback, then the end of the message) until it fits.
    """
    blob: Optional[bytes] = None
    message = error_text(exc)
    if message is not UNPRINTABLE:
        try:
            blob = dumps(exc)
        except Exception:
            pass
    try:
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        tb_text = ""
    name = _type_name(type(exc))
    payload = dumps((name, message, tb_text, blob))
    if limit is None or len(payload) <= limit:
        return payload
    for smaller in ((name, message, tb_text, None), (name, message, "", None)):
        payload = dumps(smaller)
        if len(payload) <= limit:
            return payload
    room = max(0, limit - len(dumps((name, "...", "", None))) - 8)  # 8: pickle's length fields
    return dumps((name, message.encode()[:room].decode(errors="ignore") + "...", "", None))


def error_text(exc: BaseException) -> str:
    """``str(exc)``, or :data:`UNPRINTABLE` if that raises."""
    try:
        return str(exc)
    except Exception:
        return UNPRINTABLE


def describe_error(exc: BaseException) -> str:
    """``Type: message``, even for an exception whose ``str()`` raises."""
    return f"{type(exc).__name__}: {error_text(exc)}"


#: The message of an exception whose ``str()`` raises.
UNPRINTABLE = "<unprintable>"


def unpack_error(data: Buffer) -> BaseException:
    """Rebuild the exception of an ERROR payload, with the remote traceback attached."""
    type_name, message, tb_text, blob = loads(data)
    exc: Optional[BaseException] = None
    if blob is not None:
        try:
            exc = loads(blob)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"Server-side {type_name}: {message}")
    exc.__cause__ = RemoteTraceback(tb_text)
    try:
        exc.remote_traceback = tb_text  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return exc


def pack_value(value: Any, what: str) -> Tuple[bool, bytes]:
    """Pickle a return value or stream item: ``(True, payload)``, or, when it cannot
    be pickled, ``(False, ERROR payload)`` carrying a RemoteSerializationError."""
    try:
        return True, dumps(value)
    except Exception as exc:
        err = RemoteSerializationError(
            f"the server cannot pickle {what} ({type(value).__name__}): "
            f"{describe_error(exc)}")
        return False, pack_error(err)


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
