"""ssh-style forwarding over one tunnel directory: `fileforward serve` and its requesters.

`fileforward serve` is the far end, like sshd: it takes tunnel connections from
any number of requesting processes (`fileforward -L/-R/-D/--http-proxy`), each
beginning with one request line (see dialing.py):

- `open HOST:PORT`: connect there from the serve side, then carry the bytes
  (`-L`, `-D`, `--http-proxy`);
- `listen [BIND:]PORT`: listen on the serve side, and announce each accepted
  connection on this (control) connection as `incoming TOKEN` (`-R`);
- `take TOKEN`: the requester's tunnel connection for one announced connection,
  made after the requester has connected to its local destination.

A refused or failed destination is logged on both sides and reaches the
application as an error (a reset, a SOCKS reply, an HTTP status), never a hang.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Awaitable, Callable, Dict, Optional, Tuple

from .dialing import DialError, answer, dial_error, parse_open, read_line, request_open, write_line, VERSION
from .forwardspec import Forward, Listen, Permit, parse_listen
from .listeners import start_listener, stop_listener
from .proxyproto import ProxyRequestError, Target
from .pump import splice

log = logging.getLogger(__name__)

Streams = Tuple[asyncio.StreamReader, asyncio.StreamWriter]
OpenTunnel = Callable[[], Awaitable[Streams]]
Handshake = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Target]]

REQUEST_TIMEOUT = 30.0  # a requester writes its line at once; a silent one is broken
CONNECT_TIMEOUT = 30.0  # like a browser's, for destinations that do not answer
TAKE_TIMEOUT = 60.0     # how long an -R connection waits for its requester


class ServeSide:
    """The `fileforward serve` end: one instance per process, serving every requester."""

    def __init__(self, permit: Permit) -> None:
        self._permit = permit
        self._incoming: Dict[str, "Tuple[Streams, asyncio.Future[None]]"] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One tunnel connection from a requester (the transport server's callback)."""
        try:
            message = await asyncio.wait_for(read_line(reader), REQUEST_TIMEOUT)
            if "open" in message:
                await self._open(parse_open(message), reader, writer)
            elif "listen" in message:
                await self._listen(_checked(message, "listen"), reader, writer)
            elif "take" in message:
                await self._take(message, reader, writer)
            else:
                raise ValueError(f"unknown request {sorted(message)}")
        except (ValueError, ConnectionError, asyncio.TimeoutError) as exc:
            log.warning("refused a request from a requesting process: %s", exc or type(exc).__name__)
            writer.transport.abort()

    async def _open(self, destination: Tuple[str, int], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        host, port = destination
        if not self._permit.allows(host, port):
            error = DialError(f"{host}:{port} is not permitted here (--permit {self._permit})", "rule")
            log.warning("refused a connection to %s:%d: not permitted by --permit (%s)", host, port, self._permit)
            await _refuse(writer, error)
            return
        try:
            destination_streams = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            error = DialError(f"cannot connect to {host}:{port}: no answer within {CONNECT_TIMEOUT:g} s",
                              "unreachable")
            log.warning("%s", error)
            await _refuse(writer, error)
            return
        except OSError as exc:
            error = dial_error(exc, host, port)
            log.warning("%s", error)
            await _refuse(writer, error)
            return
        log.debug("connected to %s:%d for a requester", host, port)
        await answer(writer)
        await splice((reader, writer), destination_streams)

    async def _listen(self, spec: str, reader: asyncio.StreamReader, control: asyncio.StreamWriter) -> None:
        listen = parse_listen(spec)
        announcing = asyncio.Lock()

        async def accepted(app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter) -> None:
            token = secrets.token_hex(8)
            taken: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
            self._incoming[token] = ((app_reader, app_writer), taken)
            try:
                async with announcing:
                    await write_line(control, {"incoming": token})
                await asyncio.wait_for(taken, TAKE_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError) as exc:
                log.warning("-R %s: the requesting process did not take a connection (%s)",
                            listen, exc or "timeout")
                app_writer.transport.abort()
            finally:
                self._incoming.pop(token, None)

        try:
            server = await start_listener(listen, accepted)
        except OSError as exc:
            log.warning("-R: %s", exc.strerror or exc)
            await _refuse(control, DialError(str(exc.strerror or exc)))
            return
        log.info("-R: listening on %s for a requesting process", listen)
        try:
            await answer(control)
            with contextlib.suppress(ConnectionError):
                while await reader.read(4096):  # nothing is expected: wait for the requester to leave
                    pass
        finally:
            stop_listener(listen, server)
            log.info("-R: stopped listening on %s (its requesting process left)", listen)

    async def _take(self, message: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        entry = self._incoming.pop(_checked(message, "take"), None)
        if entry is None:
            raise ValueError("take: no such incoming connection (it timed out?)")
        (app_reader, app_writer), taken = entry
        try:
            if message.get("error"):
                log.warning("-R: the requesting side could not connect: %s", message["error"])
                app_writer.transport.abort()
                writer.close()
                return
            await answer(writer)
            await splice((app_reader, app_writer), (reader, writer))
        finally:
            if not taken.done():
                taken.set_result(None)


class Requester:
    """The requesting side: local listeners whose connections leave from `serve`."""

    def __init__(self, open_tunnel: OpenTunnel) -> None:
        self._open_tunnel = open_tunnel

    async def open(self, host: str, port: int) -> Streams:
        """A tunnel connection that `serve` has connected to host:port (DialError if not)."""
        reader, writer = await self._open_tunnel()
        try:
            await request_open(reader, writer, host, port)
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    def handler(self, what: str, handshake: Handshake) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                                   Awaitable[None]]:
        """A listener callback: read what the application wants, then carry it."""
        async def handle(app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter) -> None:
            try:
                target = await handshake(app_reader, app_writer)
            except (ProxyRequestError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                log.warning("%s: %s", what, exc)
                app_writer.transport.abort()
                return
            try:
                tunnel = await self.open(target.host, target.port)
            except DialError as exc:
                log.warning("%s: the serve side refused %s:%d: %s", what, target.host, target.port, exc)
                await _answer_failure(target, exc.kind, app_writer)
                return
            except (OSError, ValueError) as exc:
                log.warning("%s: cannot reach the serve side: %s", what, exc)
                await _answer_failure(target, "failed", app_writer)
                return
            await target.succeed()
            if target.preamble:
                tunnel[1].write(target.preamble)
            await splice((app_reader, app_writer), tunnel)
        return handle

    async def reverse(self, forward: Forward, listening: "asyncio.Future[None]") -> None:
        """-R: ask `serve` to listen, then carry each connection it announces to
        forward.host:forward.port from here. Sets `listening` (or its exception)."""
        reader, control = await self._open_tunnel()
        try:
            await write_line(control, {"v": VERSION, "listen": str(forward.listen)})
            reply = await read_line(reader)
            if not reply.get("ok"):
                raise DialError(f"-R {forward}: the serve side cannot listen: {reply.get('error')}")
            listening.set_result(None)
            tasks = set()
            while True:
                announcement = await read_line(reader)
                task = asyncio.ensure_future(self._take(forward, _checked(announcement, "incoming")))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except BaseException as exc:
            if not listening.done():
                listening.set_exception(exc)
            raise
        finally:
            control.transport.abort()

    async def _take(self, forward: Forward, token: str) -> None:
        error: Optional[str] = None
        try:
            local = await asyncio.wait_for(asyncio.open_connection(forward.host, forward.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            error = str(dial_error(exc, forward.host, forward.port)) if isinstance(exc, OSError) else \
                f"cannot connect to {forward.host}:{forward.port}: no answer within {CONNECT_TIMEOUT:g} s"
            log.warning("-R %s: %s", forward, error)
        reader, writer = await self._open_tunnel()
        await write_line(writer, {"v": VERSION, "take": token, **({"error": error} if error else {})})
        if error is not None:
            writer.close()
            return
        reply = await read_line(reader)
        if not reply.get("ok"):
            log.warning("-R %s: the serve side dropped the connection: %s", forward, reply.get("error"))
            local[1].transport.abort()
            writer.transport.abort()
            return
        await splice(local, (reader, writer))


def fixed_target(host: str, port: int) -> Handshake:
    """-L: every connection goes to the same destination; nothing to read first."""
    async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Target:
        return Target(host, port, succeed=_nothing, fail=None)
    return handshake


async def _nothing() -> None:
    """-L needs no answer to the application before the bytes flow."""


async def _answer_failure(target: Target, kind: str, app_writer: asyncio.StreamWriter) -> None:
    """A proxy protocol says why (then closes cleanly, so the answer arrives);
    a plain -L connection can only be reset."""
    if target.fail is None:
        app_writer.transport.abort()
        return
    with contextlib.suppress(ConnectionError):
        await target.fail(kind)
    app_writer.close()


async def _refuse(writer: asyncio.StreamWriter, error: DialError) -> None:
    with contextlib.suppress(ConnectionError):
        await answer(writer, error)
    writer.close()


def _checked(message: dict, field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(f"bad {field!r} field in a request line")
    return value
