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
Every forward keeps live counters (ForwardCounters) of its connections and bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from pathlib import Path
from typing import Awaitable, Callable, Dict, List, Optional, Set, Tuple

from .cliargs import dir_option
from .errors import NoServerError
from .dialing import DialError, answer, dial_error, parse_open, read_line, request_open, write_line, VERSION
from .forwardspec import Forward, Permit, parse_listen
from .listeners import bind, start_listener, stop_listener
from .proxyproto import ProxyRequestError, Target
from .pump import Spliced, reset, splice

log = logging.getLogger(__name__)

Streams = Tuple[asyncio.StreamReader, asyncio.StreamWriter]
OpenTunnel = Callable[[], Awaitable[Streams]]
Handshake = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Target]]

REQUEST_TIMEOUT = 30.0  # a requester writes its line at once; a silent one is broken
CONNECT_TIMEOUT = 30.0  # like a browser's, for destinations that do not answer
TAKE_TIMEOUT = 60.0     # how long an -R connection waits for its requester


@dataclasses.dataclass
class ForwardCounters:
    """One forward's connections and bytes, live (bytes count as they move): what a
    status report shows."""

    connections: int = 0        # accepted so far
    failed: int = 0             # refused or failed before any byte was carried
    finished_to: int = 0        # bytes towards the destination, of finished connections
    finished_from: int = 0      # bytes back from it
    live: List[Spliced] = dataclasses.field(default_factory=list)

    @property
    def open(self) -> int:
        """Connections carrying bytes now."""
        return len(self.live)

    @property
    def to_destination(self) -> int:
        """Bytes sent towards the destination so far, open connections included."""
        return self.finished_to + sum(s.forward for s in self.live)

    @property
    def from_destination(self) -> int:
        """Bytes received from the destination so far, open connections included."""
        return self.finished_from + sum(s.backward for s in self.live)

    async def carry(self, what: str, app: Streams, destination: Streams) -> None:
        """Splice app with destination, counted; one DEBUG line when it ends."""
        stats = Spliced()
        self.live.append(stats)
        try:
            await splice(app, destination, stats)
        finally:
            self.live.remove(stats)
            self.finished_to += stats.forward
            self.finished_from += stats.backward
            log.debug("%s: connection ended: %d bytes to the destination, %d bytes back, %.3f s, %s",
                      what, stats.forward, stats.backward, stats.seconds, stats.describe())


class ServeSide:
    """The `fileforward serve` end: one instance per process, serving every requester."""

    def __init__(self, permit: Permit) -> None:
        self._permit = permit
        self._incoming: Dict[str, _Incoming] = {}
        self.counters: Dict[str, ForwardCounters] = {"out": ForwardCounters()}  # "out", and one per -R listener

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
            why = str(exc) or type(exc).__name__
            log.warning("refused a request from a requesting process: %s", why)
            reset(writer, f"fileforward serve refused the request: {why}")

    async def _open(self, destination: Tuple[str, int], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        host, port = destination
        counters = self.counters["out"]
        counters.connections += 1
        if not self._permit.allows(host, port):
            counters.failed += 1
            log.warning("refused a connection to %s:%d: not permitted (--permit %s)", host, port, self._permit)
            await _refuse(writer, DialError(f"{host}:{port} is not permitted by fileforward serve "
                                            f"(--permit {self._permit})", "rule"))
            return
        try:
            destination_streams = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            counters.failed += 1
            error = dial_error(exc, host, port) if isinstance(exc, OSError) else DialError(
                f"cannot connect to {host}:{port}: no answer within {CONNECT_TIMEOUT:g} s", "unreachable")
            log.warning("a requesting process asked for %s", error)
            await _refuse(writer, error)
            return
        log.debug("connected to %s:%d for a requesting process", host, port)
        await answer(writer)
        await counters.carry(f"to {host}:{port}", (reader, writer), destination_streams)

    async def _listen(self, spec: str, reader: asyncio.StreamReader, control: asyncio.StreamWriter) -> None:
        listen = parse_listen(spec)
        announcing = asyncio.Lock()
        counters = ForwardCounters()

        async def accepted(app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter) -> None:
            counters.connections += 1
            token = secrets.token_hex(8)
            taken: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
            self._incoming[token] = _Incoming((app_reader, app_writer), taken, name, counters)
            try:
                async with announcing:
                    await write_line(control, {"incoming": token})
                await asyncio.wait_for(asyncio.shield(taken), TAKE_TIMEOUT)
            except (asyncio.TimeoutError, ConnectionError) as exc:
                counters.failed += 1
                log.warning("%s: the requesting process did not take a connection (%s)",
                            name, exc or "no answer within %g s" % TAKE_TIMEOUT)
                reset(app_writer)
            finally:
                self._incoming.pop(token, None)

        try:
            listen, sock = bind(listen)
        except OSError as exc:
            log.warning("-R: a requesting process asked for a listener: %s", exc.strerror or exc)
            await _refuse(control, DialError(str(exc.strerror or exc)))
            return
        where = str(listen)
        name = f"-R {where}"
        self.counters[name] = counters
        server = await start_listener(sock, accepted)
        log.info("-R: listening on %s for a requesting process", where)
        try:
            await answer(control, on=where)
            with contextlib.suppress(ConnectionError):
                while await reader.read(4096):  # nothing is expected: wait for the requester to leave
                    pass
        finally:
            stop_listener(listen, server)
            self.counters.pop(name, None)
            log.info("-R: stopped listening on %s (its requesting process left)", where)

    async def _take(self, message: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        entry = self._incoming.pop(_checked(message, "take"), None)
        if entry is None:
            raise ValueError("take: no such incoming connection (it timed out?)")
        entry.taken.set_result(None)
        if message.get("error"):
            entry.counters.failed += 1
            log.warning("%s: the requesting process could not connect: %s", entry.name, message["error"])
            reset(entry.app[1])
            writer.close()
            return
        await answer(writer)
        await entry.counters.carry(entry.name, entry.app, (reader, writer))


@dataclasses.dataclass(frozen=True)
class _Incoming:
    """A connection accepted by an -R listener, waiting for its requester's `take`."""

    app: Streams
    taken: "asyncio.Future[None]"
    name: str
    counters: ForwardCounters


class Requester:
    """The requesting side: local listeners whose connections leave from `serve`."""

    def __init__(self, open_tunnel: OpenTunnel, tunnel_dir: Path) -> None:
        self._open_tunnel = open_tunnel
        self.tunnel_dir = tunnel_dir
        self.counters: Dict[str, ForwardCounters] = {}  # one per forward, by its name ("-D 127.0.0.1:1080")

    async def open(self, host: str, port: int) -> Streams:
        """A tunnel connection that `serve` has connected to host:port (DialError if not)."""
        reader, writer = await self._open_tunnel()
        try:
            await request_open(reader, writer, host, port)
        except BaseException:
            reset(writer)
            raise
        return reader, writer

    def handler(self, what: str, handshake: Handshake) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                                   Awaitable[None]]:
        """A listener callback for the forward named `what`: read what the application
        wants, then carry it."""
        counters = self.counters.setdefault(what, ForwardCounters())

        async def handle(app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter) -> None:
            counters.connections += 1
            try:
                target = await handshake(app_reader, app_writer)
            except (ProxyRequestError, asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
                counters.failed += 1
                log.warning("%s: %s", what, exc)
                if isinstance(exc, ProxyRequestError):
                    app_writer.close()  # answered: a clean close, so the answer is read before the end
                else:
                    reset(app_writer)
                return
            try:
                tunnel = await self.open(target.host, target.port)
            except DialError as exc:
                counters.failed += 1
                log.warning("%s: the serve side refused %s:%d: %s", what, target.host, target.port, exc)
                await _answer_failure(target, exc.kind, app_writer)
                return
            except (OSError, ValueError) as exc:
                counters.failed += 1
                why = self.no_serve() if isinstance(exc, NoServerError) else f"cannot reach the serve side: {exc}"
                log.warning("%s: %s:%d failed: %s", what, target.host, target.port, why)
                await _answer_failure(target, "failed", app_writer)
                return
            await target.succeed()
            if target.preamble:
                tunnel[1].write(target.preamble)
            await counters.carry(f"{what} to {target.host}:{target.port}", (app_reader, app_writer), tunnel)
        return handle

    def no_serve(self) -> str:
        """Why a tunnel connection failed when no `serve` answered, and the fix."""
        return (f"no fileforward serve answers on tunnel {self.tunnel_dir} (start it on the login node: "
                f"fileforward serve {dir_option(self.tunnel_dir, 'net')})")

    async def reverse(self, forward: Forward, listening: "asyncio.Future[str]") -> None:
        """-R: ask `serve` to listen, then carry each connection it announces to
        forward.host:forward.port from here, until the control connection ends.
        Sets `listening` to where the serve side listens (or to the exception)."""
        tasks: Set[asyncio.Task] = set()
        control: Optional[asyncio.StreamWriter] = None
        try:
            reader, control = await self._open_tunnel()
            await write_line(control, {"v": VERSION, "listen": str(forward.listen)})
            reply = await read_line(reader)
            if not reply.get("ok"):
                raise DialError(f"the serve side cannot listen on {forward.listen}: {reply.get('error')}")
            where = str(reply.get("on") or forward.listen)
            listening.set_result(where)
            counters = self.counters.setdefault(f"-R {where}", ForwardCounters())
            while True:
                announcement = await read_line(reader)
                task = asyncio.ensure_future(self._take(forward, _checked(announcement, "incoming"), counters))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except BaseException as exc:
            if not listening.done():
                listening.set_exception(exc)
            raise
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if control is not None:
                reset(control)

    async def _take(self, forward: Forward, token: str, counters: ForwardCounters) -> None:
        """One connection announced by an -R listener: connect here, then take it."""
        counters.connections += 1
        error: Optional[str] = None
        try:
            local = await asyncio.wait_for(asyncio.open_connection(forward.host, forward.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            counters.failed += 1
            error = str(dial_error(exc, forward.host, forward.port)) if isinstance(exc, OSError) else \
                f"cannot connect to {forward.host}:{forward.port}: no answer within {CONNECT_TIMEOUT:g} s"
            log.warning("-R %s: %s", forward, error)
        try:
            reader, writer = await self._open_tunnel()
        except OSError as exc:
            log.warning("-R %s: cannot reach the serve side to take a connection: %s", forward, exc)
            if error is None:
                reset(local[1])
            return
        await write_line(writer, {"v": VERSION, "take": token, **({"error": error} if error else {})})
        if error is not None:
            writer.close()
            return
        try:
            reply = await read_line(reader)
        except (ValueError, ConnectionError) as exc:
            reply = {"error": str(exc)}
        if not reply.get("ok"):
            counters.failed += 1
            log.warning("-R %s: the serve side dropped the connection: %s", forward, reply.get("error"))
            reset(local[1])
            reset(writer)
            return
        await counters.carry(f"-R {forward}", local, (reader, writer))


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
        reset(app_writer)
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
