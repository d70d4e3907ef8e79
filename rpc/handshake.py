"""The connection handshake: versions, limits, then mutual HMAC authentication.

Client                                   Server
  HELLO {proto, versions, nonce_c, max_frame}  ->
                                         <-  HELLO {proto, versions, nonce_s, max_frame}
  AUTH {mac = HMAC(key, client, nonces)}       ->
                                         <-  AUTH_OK {mac = HMAC(key, server, nonces)}
                                             (or REJECT {reason, error})

Everything here is JSON; the first pickle is read after AUTH_OK.
"""
from __future__ import annotations

import logging
import platform
import socket
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Union

import cloudpickle

from . import auth
from .channel import Channel
from .errors import AuthenticationError, ConnectionLost, ProtocolError
from .protocol import (ABSOLUTE_MAX_FRAME, PROTOCOL_VERSION, Kind, decode_json,
                       encode_json)

if TYPE_CHECKING:
    from .links import SocketLink

log = logging.getLogger(__name__)


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


def _hello(nonce: str, max_frame: int) -> bytes:
    return encode_json({"proto": PROTOCOL_VERSION, "nonce": nonce, "max_frame": max_frame,
                        "versions": versions(), "hostname": socket.gethostname()})


async def _expect(channel: Union[Channel, "SocketLink"], kind: Kind) -> Dict[str, Any]:
    frame = await channel.recv()
    if frame.kind is Kind.REJECT:
        reply = decode_json(frame.payload)
        error = AuthenticationError if reply.get("error") == "auth" else ProtocolError
        raise error(f"the server refused the connection: {reply.get('reason')}")
    if frame.kind is not kind:
        raise ProtocolError(f"expected a {kind.name} message during the handshake, "
                            f"got {frame.kind.name}")
    return decode_json(frame.payload)


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


async def client_handshake(channel: Union[Channel, "SocketLink"], get_key: Callable[[], bytes],
                           max_frame: int) -> Dict[str, Any]:
    """Authenticate to the server; returns the server's HELLO.

    The key is read (``get_key()``) only once a server has answered, so that "no
    server" is reported as such even where no key file exists yet.
    """
    nonce_c = auth.new_nonce()
    channel.send(Kind.HELLO, payload=_hello(nonce_c, max_frame))
    hello = await _expect(channel, Kind.HELLO)
    _check_hello(hello, "server")
    key = get_key()
    nonce_s = hello["nonce"]
    channel.send(Kind.AUTH, payload=encode_json(
        {"mac": auth.answer(key, "client", nonce_c, nonce_s)}))
    reply = await _expect(channel, Kind.AUTH_OK)
    if not auth.check_answer(key, "server", nonce_c, nonce_s, reply.get("mac")):
        raise AuthenticationError("the server does not hold the same RPC key as this "
                                  "client: it may be an impostor, or use another key file")
    channel.set_limits(max_frame, hello["max_frame"])
    return hello


async def server_handshake(channel: Channel, key: bytes, max_frame: int,
                           before_accepting: Callable[[], None] = lambda: None
                           ) -> Dict[str, Any]:
    """Authenticate a client; returns its HELLO. On failure, tells it why, then raises.

    ``before_accepting()`` runs once the client is authenticated, just before it is
    told so: until then, it sends nothing more.
    """
    nonce_s = auth.new_nonce()
    try:
        hello = await _expect(channel, Kind.HELLO)
        channel.send(Kind.HELLO, payload=_hello(nonce_s, max_frame))
        _check_hello(hello, "client")
        reply = await _expect(channel, Kind.AUTH)
        nonce_c = hello["nonce"]
        if not auth.check_answer(key, "client", nonce_c, nonce_s, reply.get("mac")):
            raise AuthenticationError("the client's RPC key does not match the server's "
                                      "key file")
    except (AuthenticationError, ProtocolError) as exc:
        error = "auth" if isinstance(exc, AuthenticationError) else "protocol"
        try:
            channel.send(Kind.REJECT, payload=encode_json({"reason": str(exc), "error": error}))
            await channel.drain()
        except ConnectionLost:
            pass
        raise
    channel.set_limits(max_frame, hello["max_frame"])
    before_accepting()
    channel.send(Kind.AUTH_OK, payload=encode_json(
        {"mac": auth.answer(key, "server", nonce_c, nonce_s)}))
    return hello

