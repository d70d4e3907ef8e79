"""The RPC protocol core, sans I/O: every rule of a conversation, and no I/O at all.

:class:`ClientProtocol` and :class:`ServerProtocol` take bytes in
(:meth:`~_Protocol.receive_data`, :meth:`~_Protocol.receive_eof`) and give events
(:meth:`~_Protocol.events_received`) and bytes (:meth:`~_Protocol.data_to_send`)
out. They never touch a socket, a thread, an event loop or a clock: the drivers
(``aio.py``, ``sync.py``) move the bytes, and ``client.py`` / ``server.py`` act on
the events.

The core owns the handshake and the mutual HMAC authentication (JSON frames, 64 KiB
at most, until both ends have proved they hold the key; ``max_frame`` after),
request ids and which replies are expected, streams and their credit,
cancellation, and pings. The wire format is in :mod:`rpc.frames`::

    client  HELLO {proto, versions, nonce, max_frame, hostname}  ->
            <-  HELLO {proto, versions, nonce, max_frame, hostname}       server
    client  AUTH {mac: HMAC(key, "client", nonces)}              ->
            <-  AUTH_OK {mac: HMAC(key, "server", nonces)}  or  REJECT {reason, error}

A peer that breaks a rule raises :class:`ProtocolError` (:class:`AuthenticationError`
for a failed proof) from ``receive_data``; the connection is then over, and what
must still go out (the server's REJECT) is in ``data_to_send()``. Not thread-safe:
a driver calls one core from one thread at a time.
"""
from __future__ import annotations

import enum
import functools
import logging
import platform
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import cloudpickle

from . import auth
from .errors import (AuthenticationError, ConnectionLost, ProtocolError, RPCError,
                     TruncatedFrameError)
from .frames import (ABSOLUTE_MAX_FRAME, DEFAULT_MAX_FRAME, HANDSHAKE_MAX_FRAME,
                     PROTOCOL_VERSION, Buffer, Flag, Frame, FrameDecoder, Kind, Payload,
                     check_max_frame, decode_call, decode_credit, decode_json, encode_credit,
                     encode_frame, encode_header, encode_json, pack_error)

log = logging.getLogger(__name__)

#: Frames up to this size are joined into one buffer; larger ones go out as header and
#: payload parts, so that a large argument is never copied.
JOIN_LIMIT = 1 << 16
#: Stream items the server may send ahead of the consumer, by default.
DEFAULT_STREAM_WINDOW = 64


class State(enum.Enum):
    """Where a connection is: authenticating, serving requests, or over."""

    HANDSHAKE = 1
    OPEN = 2
    CLOSED = 3


# ---------------------------------------------------------------- events

class Opened(NamedTuple):
    """Both ends proved they hold the key; ``hello`` is the peer's HELLO."""

    hello: Dict[str, Any]


class Replied(NamedTuple):
    """Client: the RESULT (``ok``) or ERROR of the request made with ``token``."""

    token: Any
    ok: bool
    payload: Buffer


class StreamOpened(NamedTuple):
    """Client: the request made with ``token`` returned a stream (items follow)."""

    token: Any
    request_id: int


class StreamItem(NamedTuple):
    """Client: one item of the stream of the request made with ``token``."""

    token: Any
    payload: Buffer


class StreamEnded(NamedTuple):
    """Client: the stream is over; ``error`` is an ERROR payload, or None at its end."""

    token: Any
    error: Optional[Buffer]


class CallReceived(NamedTuple):
    """Server: call ``name`` with the still pickled ``args``; answer with ``reply``."""

    request_id: int
    name: str
    args: memoryview


class InfoRequested(NamedTuple):
    """Server: the client asks for the server's status; answer with ``reply``."""

    request_id: int


class CallCancelled(NamedTuple):
    """Server: the client gave up on the request; nothing more is sent for it."""

    request_id: int


class CreditGranted(NamedTuple):
    """Server: the client may receive more items of this stream (see ``credit``)."""

    request_id: int


# ---------------------------------------------------------------- hello

@functools.lru_cache(maxsize=1)
def versions() -> Dict[str, Any]:
    """Versions that matter for compatibility, as sent in HELLO and shown by status."""
    try:
        from importlib.metadata import version
        fileforward_version = version("fileforward")
    except Exception:  # running from a checkout that is not installed
        fileforward_version = "unknown"
    return {"protocol": PROTOCOL_VERSION, "python": platform.python_version(),
            "cloudpickle": cloudpickle.__version__, "fileforward": fileforward_version}


def version_warnings(mine: Dict[str, Any], theirs: Dict[str, Any]) -> List[str]:
    """Differences that may break unpickling (functions, classes) across the two ends."""
    warnings = []
    py_mine, py_theirs = str(mine.get("python")), str(theirs.get("python"))
    if py_mine.split(".")[:2] != py_theirs.split(".")[:2]:
        warnings.append(f"Python {py_mine} here, {py_theirs} on the peer")
    for lib in ("cloudpickle", "fileforward"):
        if mine.get(lib) != theirs.get(lib):
            warnings.append(f"{lib} {mine.get(lib)} here, {theirs.get(lib)} on the peer")
    return warnings


def _hello(nonce: str, max_frame: int, hostname: str) -> bytes:
    return encode_json({"proto": PROTOCOL_VERSION, "nonce": nonce, "max_frame": max_frame,
                        "versions": versions(), "hostname": hostname})


def _check_hello(hello: Dict[str, Any], peer_role: str) -> None:
    if hello.get("proto") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"incompatible RPC protocol versions: the {peer_role} speaks version "
            f"{hello.get('proto')}, this side speaks version {PROTOCOL_VERSION}; "
            f"install the same fileforward release on both sides")
    nonce, max_frame = hello.get("nonce"), hello.get("max_frame")
    if not (isinstance(nonce, str) and 16 <= len(nonce) <= 128):
        raise ProtocolError(f"malformed HELLO from the {peer_role}: bad nonce")
    if not (isinstance(max_frame, int) and 0 < max_frame <= ABSOLUTE_MAX_FRAME):
        raise ProtocolError(f"malformed HELLO from the {peer_role}: bad max_frame")
    peer_versions = hello.get("versions") or {}
    if not isinstance(peer_versions, dict):
        raise ProtocolError(f"malformed HELLO from the {peer_role}: bad versions")
    for warning in version_warnings(versions(), peer_versions):
        log.warning("version mismatch with %s (%s): %s; pickled functions and classes "
                    "may fail to load", peer_role, hello.get("hostname"), warning)


def _expect(frame: Frame, kind: Kind) -> Dict[str, Any]:
    if frame.kind is not kind:
        raise ProtocolError(f"expected a {kind.name} message during the handshake, "
                            f"got {frame.kind.name}")
    return decode_json(frame.payload)


# ---------------------------------------------------------------- both sides

class _Protocol:
    """What both ends share: decoding, the frame limits, the output and the events."""

    def __init__(self, max_frame: int, peer: str) -> None:
        #: Names the peer in error messages ("connection closed by <peer>").
        self.peer = peer
        self.state = State.HANDSHAKE
        #: The peer's HELLO, once received.
        self.peer_hello: Dict[str, Any] = {}
        #: The largest payload the peer accepts (raised after the handshake).
        self.peer_max_frame = HANDSHAKE_MAX_FRAME
        self._max_frame = check_max_frame(max_frame)
        self._decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        self._out: List[Buffer] = []
        self._events: List[Any] = []

    def receive_data(self, data: Buffer) -> None:
        """Take bytes from the peer; raises ProtocolError (the connection is then over)."""
        if self.state is State.CLOSED:
            return
        try:
            for frame in self._decoder.decode(data):
                if self.state is State.HANDSHAKE:
                    self._handshake(frame)
                else:
                    self._receive(frame)
        except RPCError:
            self.state = State.CLOSED
            raise

    def receive_eof(self) -> None:
        """The peer closed the stream: raises ConnectionLost (TruncatedFrameError if it
        ended in the middle of a frame)."""
        self.state = State.CLOSED
        if self._decoder.mid_frame():
            raise TruncatedFrameError(f"connection to {self.peer} ended in the middle "
                                      f"of a frame")
        raise ConnectionLost(f"connection closed by {self.peer}")

    def events_received(self) -> List[Any]:
        """The events of the bytes received so far, oldest first (each returned once)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> List[Buffer]:
        """The bytes to write to the peer, in order (each returned once)."""
        out, self._out = self._out, []
        return out

    def close(self) -> None:
        """This side ends the connection: nothing more is received or sent."""
        self.state = State.CLOSED

    def check_size(self, size: int, what: str) -> None:
        """Raise ProtocolError if the peer would refuse a payload of ``size`` bytes."""
        if size > self.peer_max_frame:
            raise ProtocolError(
                f"{what} is {size} bytes, more than the peer's frame limit of "
                f"{self.peer_max_frame} bytes (raise max_frame on both ends)")

    def _send(self, kind: Kind, request_id: int = 0, payload: Payload = b"",
              flags: Flag = Flag.NONE, what: str = "") -> None:
        parts = payload if isinstance(payload, tuple) else (payload,)
        size = sum(map(len, parts))
        if size > self.peer_max_frame:
            self.check_size(size, what or f"a {kind.name} message")
        header = encode_header(kind, request_id, size, flags)
        if size <= JOIN_LIMIT:
            self._out.append(b"".join((header, *parts)))
        else:
            self._out.append(header)
            self._out.extend(parts)

    def _open(self) -> None:
        self.state = State.OPEN
        self._decoder.max_frame = self._max_frame
        self.peer_max_frame = self.peer_hello["max_frame"]
        self._events.append(Opened(self.peer_hello))

    def _require_open(self) -> None:
        if self.state is not State.OPEN:
            raise ConnectionLost(f"the connection to {self.peer} is not open")

    def _handshake(self, frame: Frame) -> None:
        raise NotImplementedError

    def _receive(self, frame: Frame) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------- client

class _ClientStream:
    """A stream being received: its token, and how many items the server may send."""

    __slots__ = ("token", "expected")

    def __init__(self, token: Any, granted: int) -> None:
        self.token = token
        self.expected = granted  # items the server may still send


class ClientProtocol(_Protocol):
    """The client's side. HELLO is in ``data_to_send()`` from the start.

    ``get_key()`` is called once a server has answered, so that "no server" is
    reported as such even where no key file exists yet. Requests carry an opaque
    ``token`` (the caller's future), which comes back in their events.
    """

    def __init__(self, get_key: Callable[[], bytes], *, max_frame: int = DEFAULT_MAX_FRAME,
                 stream_window: int = DEFAULT_STREAM_WINDOW, hostname: str = "",
                 peer: str = "server") -> None:
        super().__init__(max_frame, peer)
        self.stream_window = max(2, stream_window)
        self._get_key = get_key
        self._key: Optional[bytes] = None
        self._nonce = auth.new_nonce()
        self._next_id = 1
        self._requests: Dict[int, Any] = {}  # request id -> token, awaiting a reply
        self._streams: Dict[int, _ClientStream] = {}
        self._send(Kind.HELLO, payload=_hello(self._nonce, self._max_frame, hostname))

    @property
    def busy(self) -> bool:
        """True while requests or streams wait for frames."""
        return bool(self._requests or self._streams)

    def call(self, payload: Payload, token: Any, what: str) -> int:
        """Send a CALL (``payload`` from ``frames.encode_call``); returns its request id."""
        return self._request(Kind.CALL, payload, token, what)

    def info(self, token: Any) -> int:
        """Ask for the server's status; returns the request id."""
        return self._request(Kind.INFO, b"", token, "info")

    def _request(self, kind: Kind, payload: Payload, token: Any, what: str) -> int:
        self._require_open()
        request_id = self._next_id
        self._send(kind, request_id, payload, what=what)
        self._next_id += 1
        self._requests[request_id] = token
        return request_id

    def cancel(self, request_id: int) -> bool:
        """Give up on a request or stream: True if it was waiting (CANCEL is sent)."""
        if (self._requests.pop(request_id, None) is None
                and self._streams.pop(request_id, None) is None):
            return False
        if self.state is State.OPEN:
            self._send(Kind.CANCEL, request_id)
        return True

    def grant(self, request_id: int, count: int) -> None:
        """The application consumed ``count`` items of the stream: the server may send
        that many more (CREDIT). When to grant is the application's choice."""
        stream = self._streams.get(request_id)
        if stream is None or self.state is not State.OPEN:
            return
        self._send(Kind.CREDIT, request_id, encode_credit(count))
        stream.expected += count

    def ping(self) -> None:
        """Ask the server for a sign of life (it answers PONG)."""
        if self.state is State.OPEN:
            self._send(Kind.PING)

    def abandon(self) -> List[Any]:
        """The connection is over: the tokens of everything still waiting."""
        self.state = State.CLOSED
        tokens = list(self._requests.values()) + [s.token for s in self._streams.values()]
        self._requests.clear()
        self._streams.clear()
        return tokens

    def _handshake(self, frame: Frame) -> None:
        if frame.kind is Kind.REJECT:
            reply = decode_json(frame.payload)
            error = AuthenticationError if reply.get("error") == "auth" else ProtocolError
            raise error(f"the server refused the connection: {reply.get('reason')}")
        if self._key is None:
            hello = _expect(frame, Kind.HELLO)
            _check_hello(hello, "server")
            self.peer_hello = hello
            self._key = self._get_key()
            self._send(Kind.AUTH, payload=encode_json(
                {"mac": auth.answer(self._key, "client", self._nonce, hello["nonce"])}))
            return
        reply = _expect(frame, Kind.AUTH_OK)
        if not auth.check_answer(self._key, "server", self._nonce, self.peer_hello["nonce"],
                                 reply.get("mac")):
            raise AuthenticationError("the server does not hold the same RPC key as this "
                                      "client: it may be an impostor, or use another key file")
        self._open()

    def _receive(self, frame: Frame) -> None:
        kind, request_id = frame.kind, frame.request_id
        if kind is Kind.RESULT or kind is Kind.ERROR:
            token = self._requests.pop(request_id, None)
            if token is not None:
                if kind is Kind.RESULT and frame.flags & Flag.STREAM:
                    self._streams[request_id] = _ClientStream(token, self.stream_window)
                    self._send(Kind.CREDIT, request_id, encode_credit(self.stream_window))
                    self._events.append(StreamOpened(token, request_id))
                else:
                    self._events.append(Replied(token, kind is Kind.RESULT, frame.payload))
                return
        if kind is Kind.STREAM_ITEM:
            stream = self._streams.get(request_id)
            if stream is not None:
                if stream.expected <= 0:
                    raise ProtocolError(f"the server sent an item of stream {request_id} "
                                        f"beyond the credit it was given")
                stream.expected -= 1
                self._events.append(StreamItem(stream.token, frame.payload))
            return  # otherwise: an item of a stream cancelled here; drop it
        if kind is Kind.STREAM_END or kind is Kind.ERROR:
            ended = self._streams.pop(request_id, None)
            if ended is not None:
                self._events.append(StreamEnded(
                    ended.token, frame.payload if kind is Kind.ERROR else None))
            return
        if kind is not Kind.PONG and kind is not Kind.RESULT:  # RESULT: cancelled here
            raise ProtocolError(f"unexpected {kind.name} message from the server")


# ---------------------------------------------------------------- server

_ABSENT = object()


class ServerProtocol(_Protocol):
    """The server's side: waits for the client's HELLO."""

    def __init__(self, key: bytes, *, max_frame: int = DEFAULT_MAX_FRAME,
                 hostname: str = "", peer: str = "client") -> None:
        super().__init__(max_frame, peer)
        self._key = key
        self._hostname = hostname
        self._nonce = auth.new_nonce()
        #: Requests not answered yet: request id -> stream credit (None: not a stream).
        self._open_requests: Dict[int, Optional[int]] = {}

    def reply(self, request_id: int, ok: bool, payload: Buffer) -> None:
        """Answer a request with RESULT (``ok``) or ERROR (which also ends a stream),
        unless the client cancelled it. A payload too large for the client becomes an
        error cut down to its limit; raises ProtocolError if not even that fits."""
        credit = self._open_requests.pop(request_id, _ABSENT)
        if credit is _ABSENT or self.state is not State.OPEN:
            return
        if ok and credit is not None:
            raise RuntimeError(f"request {request_id} is a stream: end it with end_stream()")
        self._send_or_error(Kind.RESULT if ok else Kind.ERROR, request_id, payload)

    def start_stream(self, request_id: int) -> bool:
        """Answer a call with a stream (RESULT with STREAM); False if it was cancelled.
        Items may then be sent as the client grants credit."""
        if self._open_requests.get(request_id, _ABSENT) is not None:
            return False
        if self.state is not State.OPEN:
            return False
        self._open_requests[request_id] = 0
        self._send(Kind.RESULT, request_id, flags=Flag.STREAM)
        return True

    def credit(self, request_id: int) -> int:
        """How many more items of the stream the client accepts now (0 if it is over)."""
        return self._open_requests.get(request_id) or 0

    def send_item(self, request_id: int, payload: Buffer) -> bool:
        """One item of the stream; False if the stream is over (cancelled, or ended by an
        item too large for the client, sent as an error instead). Needs credit."""
        credit = self._open_requests.get(request_id)
        if credit is None or self.state is not State.OPEN:
            return False
        if credit <= 0:
            raise RuntimeError(f"no credit left for stream {request_id}")
        self._open_requests[request_id] = credit - 1
        if not self._send_or_error(Kind.STREAM_ITEM, request_id, payload):
            del self._open_requests[request_id]
            return False
        return True

    def end_stream(self, request_id: int) -> None:
        """The stream is exhausted: STREAM_END (nothing if it was cancelled)."""
        if self._open_requests.pop(request_id, None) is None or self.state is not State.OPEN:
            return
        self._send(Kind.STREAM_END, request_id)

    def _send_or_error(self, kind: Kind, request_id: int, payload: Buffer) -> bool:
        try:
            self._send(kind, request_id, payload)
            return True
        except ProtocolError as exc:  # larger than the client accepts
            self._send(Kind.ERROR, request_id, pack_error(exc, self.peer_max_frame))
            return False

    def _handshake(self, frame: Frame) -> None:
        try:
            if not self.peer_hello:
                hello = _expect(frame, Kind.HELLO)
                self._send(Kind.HELLO, payload=_hello(self._nonce, self._max_frame,
                                                      self._hostname))
                _check_hello(hello, "client")
                self.peer_hello = hello
                return
            reply = _expect(frame, Kind.AUTH)
            if not auth.check_answer(self._key, "client", self.peer_hello["nonce"],
                                     self._nonce, reply.get("mac")):
                raise AuthenticationError("the client's RPC key does not match the server's "
                                          "key file")
        except (AuthenticationError, ProtocolError) as exc:
            error = "auth" if isinstance(exc, AuthenticationError) else "protocol"
            self._out.append(encode_frame(Kind.REJECT, payload=encode_json(  # unchecked:
                {"reason": str(exc), "error": error})))  # the error is what matters
            raise
        self._send(Kind.AUTH_OK, payload=encode_json(
            {"mac": auth.answer(self._key, "server", self.peer_hello["nonce"], self._nonce)}))
        self._open()

    def _receive(self, frame: Frame) -> None:
        kind, request_id = frame.kind, frame.request_id
        if kind is Kind.CALL:
            name, args = decode_call(frame.payload)
            self._register(request_id)
            self._events.append(CallReceived(request_id, name, args))
        elif kind is Kind.CANCEL:
            if self._open_requests.pop(request_id, _ABSENT) is not _ABSENT:
                self._events.append(CallCancelled(request_id))
        elif kind is Kind.CREDIT:
            count = decode_credit(frame.payload)
            credit = self._open_requests.get(request_id)
            if credit is not None:
                self._open_requests[request_id] = credit + count
                self._events.append(CreditGranted(request_id))
        elif kind is Kind.PING:
            self._send(Kind.PONG, request_id)
        elif kind is Kind.INFO:
            self._register(request_id)
            self._events.append(InfoRequested(request_id))
        else:
            raise ProtocolError(f"unexpected {kind.name} message from a client")

    def _register(self, request_id: int) -> None:
        if request_id in self._open_requests:
            raise ProtocolError(f"request id {request_id} is already in use")
        self._open_requests[request_id] = None
