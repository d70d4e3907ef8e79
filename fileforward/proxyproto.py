"""The application side of `-D` (SOCKS5 and SOCKS4/4a) and `--http-proxy`.

Each handshake reads what the application asks for on the accepted socket and
returns a `Target`: the destination, bytes to send there first (a plain-http
request rewritten to origin form), and how to answer the application once the
`serve` side has connected or failed. Names are never resolved here: they travel
to the serve side, which may be the only one that can resolve them.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import ipaddress
import secrets
import struct
from typing import Awaitable, Callable, Optional
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024

# SOCKS5 reply codes by dialing.DialError kind
_SOCKS5_REPLY = {"rule": 0x02, "unreachable": 0x04, "refused": 0x05, "failed": 0x01}
_HTTP_STATUS = {"rule": (403, "Forbidden"), "unreachable": (502, "Bad Gateway"),
                "refused": (502, "Bad Gateway"), "failed": (502, "Bad Gateway")}


class ProxyRequestError(ConnectionError):
    """The application's proxy request was malformed, unsupported or unauthorised
    (it has been answered already)."""


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A proxy user and password (RFC 1929 for SOCKS5, Basic for HTTP)."""

    user: str
    password: str

    @classmethod
    def generate(cls) -> "Credentials":
        """Random credentials, safe to put in a URL."""
        return cls("ff-" + secrets.token_hex(4), secrets.token_urlsafe(18))

    def check(self, user: str, password: str) -> bool:
        """Constant-time comparison of both fields."""
        return (hmac.compare_digest(user.encode(), self.user.encode())
                & hmac.compare_digest(password.encode(), self.password.encode()))


@dataclasses.dataclass
class Target:
    """What the application asked for, and how to answer it."""

    host: str
    port: int
    succeed: Callable[[], Awaitable[None]]
    fail: Optional[Callable[[str], Awaitable[None]]]  # tells the application why (a DialError kind)
    preamble: bytes = b""


async def socks_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          credentials: Optional[Credentials]) -> Target:
    """SOCKS5 (no auth, or user/password when credentials are set) or SOCKS4/4a CONNECT."""
    version = (await reader.readexactly(1))[0]
    if version == 5:
        return await _socks5(reader, writer, credentials)
    if version == 4:
        return await _socks4(reader, writer, credentials)
    raise ProxyRequestError(f"not a SOCKS request (first byte {version:#04x})")


async def _socks5(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  credentials: Optional[Credentials]) -> Target:
    methods = await reader.readexactly((await reader.readexactly(1))[0])
    wanted = 0x02 if credentials is not None else 0x00
    if wanted not in methods:
        writer.write(b"\x05\xff")
        await writer.drain()
        raise ProxyRequestError("SOCKS5 client offers no acceptable authentication method"
                                + (" (user/password required)" if credentials else ""))
    writer.write(bytes([5, wanted]))
    if credentials is not None:
        await reader.readexactly(1)  # subnegotiation version 1
        user = await reader.readexactly((await reader.readexactly(1))[0])
        password = await reader.readexactly((await reader.readexactly(1))[0])
        ok = credentials.check(user.decode("utf-8", "replace"), password.decode("utf-8", "replace"))
        writer.write(b"\x01\x00" if ok else b"\x01\x01")
        await writer.drain()
        if not ok:
            raise ProxyRequestError("SOCKS5 authentication failed (wrong user or password)")
    _, command, _, address_type = await reader.readexactly(4)
    if address_type == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif address_type == 3:
        host = (await reader.readexactly((await reader.readexactly(1))[0])).decode("idna")
    elif address_type == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    else:
        await _socks5_reply(writer, 0x08)
        raise ProxyRequestError(f"SOCKS5 address type {address_type} is not supported")
    (port,) = struct.unpack(">H", await reader.readexactly(2))
    if command != 1:
        await _socks5_reply(writer, 0x07)
        raise ProxyRequestError(f"SOCKS5 command {command} is not supported (only CONNECT)")
    return Target(host, port, succeed=lambda: _socks5_reply(writer, 0x00),
                  fail=lambda kind: _socks5_reply(writer, _SOCKS5_REPLY.get(kind, 0x01)))


async def _socks5_reply(writer: asyncio.StreamWriter, code: int) -> None:
    writer.write(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))
    await writer.drain()


async def _socks4(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  credentials: Optional[Credentials]) -> Target:
    command, port, address = struct.unpack(">BH4s", await reader.readexactly(7))
    await _read_cstring(reader)  # the user id: SOCKS4 has no password
    host = str(ipaddress.IPv4Address(address))
    if address[:3] == b"\0\0\0" and address[3]:  # SOCKS4a: the name follows
        host = (await _read_cstring(reader)).decode("idna")
    if credentials is not None:
        await _socks4_reply(writer, False)
        raise ProxyRequestError("SOCKS4 has no password: this proxy requires SOCKS5 with user/password")
    if command != 1:
        await _socks4_reply(writer, False)
        raise ProxyRequestError(f"SOCKS4 command {command} is not supported (only CONNECT)")
    return Target(host, port, succeed=lambda: _socks4_reply(writer, True),
                  fail=lambda kind: _socks4_reply(writer, False))


async def _read_cstring(reader: asyncio.StreamReader) -> bytes:
    try:
        return (await reader.readuntil(b"\0"))[:-1]
    except asyncio.LimitOverrunError:
        raise ProxyRequestError("SOCKS4 field too long") from None


async def _socks4_reply(writer: asyncio.StreamWriter, granted: bool) -> None:
    writer.write(bytes([0, 0x5A if granted else 0x5B, 0, 0, 0, 0, 0, 0]))
    await writer.drain()


async def http_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         credentials: Optional[Credentials]) -> Target:
    """An HTTP proxy request: CONNECT host:port (https), or an absolute-form request
    (plain http), which is forwarded in origin form with `Connection: close`."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        await _http_reply(writer, 431, "Request Header Fields Too Large")
        raise ProxyRequestError(f"HTTP proxy request head over {MAX_HEAD} bytes") from None
    request_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    try:
        method, uri, version = request_line.split(" ")
    except ValueError:
        await _http_reply(writer, 400, "Bad Request")
        raise ProxyRequestError(f"malformed HTTP request line {request_line[:80]!r}") from None
    headers = [line.split(":", 1) for line in header_lines if ":" in line]
    if credentials is not None and not _authorised(headers, credentials):
        await _http_reply(writer, 407, "Proxy Authentication Required",
                          'Proxy-Authenticate: Basic realm="fileforward"\r\n')
        raise ProxyRequestError("HTTP proxy request without valid credentials (answered 407)")
    if method.upper() == "CONNECT":
        host, _, port = uri.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            await _http_reply(writer, 400, "Bad Request")
            raise ProxyRequestError(f"CONNECT to {uri!r}: expected HOST:PORT")
        return Target(host, int(port),
                      succeed=lambda: _http_reply(writer, 200, "Connection established", body=False),
                      fail=lambda kind: _http_reply(writer, *_HTTP_STATUS.get(kind, (502, "Bad Gateway"))))
    url = urlsplit(uri)
    if url.scheme != "http" or not url.hostname:
        await _http_reply(writer, 400, "Bad Request")
        raise ProxyRequestError(f"{method} {uri[:80]!r}: this proxy takes CONNECT, or absolute http:// URLs")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    kept = [f"{name}:{value}" for name, value in headers
            if name.strip().lower() not in ("proxy-authorization", "proxy-connection", "connection", "keep-alive")]
    preamble = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""]).encode("latin-1")
    return Target(url.hostname, url.port or 80, succeed=_nothing,
                  fail=lambda kind: _http_reply(writer, *_HTTP_STATUS.get(kind, (502, "Bad Gateway"))),
                  preamble=preamble)


def _authorised(headers: "list[list[str]]", credentials: Credentials) -> bool:
    for name, value in headers:
        if name.strip().lower() != "proxy-authorization":
            continue
        scheme, _, encoded = value.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return credentials.check(user, password)
    return False


async def _http_reply(writer: asyncio.StreamWriter, status: int, reason: str, extra: str = "",
                      body: bool = True) -> None:
    text = f"fileforward proxy: {status} {reason}\n" if body else ""
    length = f"Content-Length: {len(text)}\r\nConnection: close\r\n" if body else ""
    writer.write(f"HTTP/1.1 {status} {reason}\r\n{extra}{length}\r\n{text}".encode("latin-1"))
    await writer.drain()


async def _nothing() -> None:
    """A plain-http request needs no answer of ours: the origin server answers."""
