"""An endpoint: the I/O thread that moves one process's connections through the tunnel dir.

Every filesystem call of the transport happens on this thread, never on the event
loop: a hung NFS mount stalls this thread (and is reported by a watchdog on the
loop), not the application.

How the files are used (see tunneldir.py for names):

- Writing: append records to the connection's out chunk file under its lock, at
  most `window` bytes unread. When an append returns more than wake_after_idle
  after the previous one began, the writer also appends a WAKE record to the
  reader's bell, because the reader may have stopped looking (the proof that no
  write is missed, whatever the timing, is in ARCHITECTURE.md).
- Reading: a connection the reader has seen data on recently is "hot" and drained
  directly every cycle; a cold one is only looked at when a WAKE for it arrives.
  That keeps the idle cost at one bell poll per cycle, whatever the number of
  connections, while active connections never wait for the bell.
- Ending: a RESET is answered with a RESET, so both sides release a reset
  connection's descriptors and files at once.
- Peers: an endpoint knows each peer from its first record until the peer says BYE
  or is declared dead. It appends a PING (a new counter, with its pid and host) to
  each peer's bell every liveness_timeout/5. A new record from a peer proves it was
  alive after our previous look at that file (not when we happen to drain it: after
  a stall of our own, stale pings prove nothing). A side that gives up on a peer
  tells it with a BYE carrying the reason, so that both sides end their connections,
  and the counter of its last ping it saw, so that a BYE crossing the receiver's own
  giving up does not end the connections made after the two met again.
  A client endpoint with no peer looks at the server pointer every POINTER_WATCH,
  so that both sides learn of each other before the first connection.
- Cycle timing: right after activity the thread polls every poll_min; then it
  waits half the time since the last activity, up to poll_max. While connections
  are hot, the bell is drained at most every 10 ms: every request counts on NFS.
- Errors: one connection's filesystem error ends that connection. An error of the
  whole endpoint (bell, directory, pointer) is retried with backoff (trouble.py) and
  fails the endpoint after give_up_after. The directory is checked again every
  DIR_CHECK_INTERVAL and before each connection: a tampered one (owner, mode, or a
  file that is a link, not ours or not 0600) stops the endpoint writing nothing more;
  a deleted one is made again, with a new bell (and pointer, if we serve).
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

from . import tunneldir
from .errors import (EndpointFailedError, NoServerError, PeerLostError, ProtocolError, ServerAlreadyRunningError,
                     TunnelDirLostError, TunnelError, UnsafeTunnelDirError)
from .files import TABLE, Busy, SharedFile
from .options import Options
from .records import (FORMAT_VERSION, HEADER, MAGIC, Kind, decode, decode_until_damage, encode, encode_text,
                      text_fields)
from .transport import FileTransport
from .trouble import Trouble

log = logging.getLogger(__name__)

_CID_RE = re.compile(r"^[0-9a-f]{16}-[0-9]{1,12}$")
_EID_RE = re.compile(r"^[0-9a-f]{16}$")
POINTER_RECHECK = 0.25
STEPDOWN_WAIT = 10.0
BELL_POLL_WHILE_HOT = 0.01  # hot connections are drained directly; the bell can wait a little
POINTER_WATCH = 2.0  # how often a client endpoint with no peer looks for a server
DIR_CHECK_INTERVAL = 5.0  # how often the directory's owner, mode and identity are checked again
_GONE_ERRNOS = (errno.ENOENT, errno.ESTALE)


class Conn:
    """One connection's state, shared by the event loop (the application's side) and
    the I/O thread. Fields the loop writes are guarded by `lock`."""

    def __init__(self, endpoint: "Endpoint", cid: str, in_path: Path, out_path: Path,
                 in_file: SharedFile, out_file: SharedFile) -> None:
        self.endpoint = endpoint
        self.cid = cid
        self.in_path, self.out_path = in_path, out_path
        self.in_file, self.out_file = in_file, out_file
        self.peer: Optional[str] = None
        self.transport = FileTransport(self, {
            "peername": ("fileforward", cid), "sockname": ("fileforward", cid),
            "tunnel_dir": str(endpoint.tunnel_dir), "connection_id": cid,
        })
        self.lock = threading.Lock()
        self.out_buf = bytearray()
        self.want_eof = False
        self.want_close = False
        self.app_closed = False
        self.reset_reason: Optional[str] = None
        self.eof_written = False
        self.out_done = False
        self.lost_after_write = False
        self.writer_paused = False
        self.resume_below = 0
        self.resume_writer = False  # set by build_batch when the paused writer may go on
        self.in_eof = False
        self.in_done = False
        self.reading = True
        self.hot = True
        self.last_seen = self.looked = time.monotonic()  # last fruitful drain / start of the last look
        self.last_write = float("-inf")  # when the last append began
        self.in_next = self.out_next = 0.0  # see _leave_free_since

    # --- called on the loop --------------------------------------------------------------
    def push(self, data: bytes, high: int, low: int) -> bool:
        """Buffer data for the I/O thread. True if the writer must now pause: the
        buffer passed `high`; the I/O thread resumes it once it is down to `low`."""
        with self.lock:
            if not self.out_done:
                self.out_buf += data
            pause = not self.writer_paused and len(self.out_buf) > high
            if pause:
                self.writer_paused, self.resume_below = True, low
        self.endpoint.wake()
        return pause

    def buffered(self) -> int:
        """Bytes written by the application and not yet on disk."""
        with self.lock:
            return len(self.out_buf)

    def request_end(self, close: bool) -> bool:
        """write_eof (close=False) or close (close=True), after the buffered data.

        Returns True if our direction was already over (nothing left to do).
        """
        with self.lock:
            if self.out_done:
                return True
            self.want_eof = True
            if close:
                self.want_close = self.app_closed = True
        self.endpoint.wake()
        return False

    def request_reset(self, reason: str) -> None:
        """Abort: drop buffered data and tell the peer (`reason` empty for a plain abort).

        Reading goes on until the peer's answering RESET, which releases the connection.
        """
        with self.lock:
            self.out_buf.clear()
            self.app_closed = True
            if self.reset_reason is None and not self.out_done:
                self.reset_reason = reason
        self.reading = self.hot = True
        self.endpoint.wake()

    def set_reading(self, reading: bool) -> None:
        """Flow control from the StreamReader: stop or resume draining the in file."""
        self.reading = reading
        if reading:
            self.hot = True
            self.endpoint.wake()

    # --- called on the I/O thread ------------------------------------------------------
    def has_output(self) -> bool:
        """Whether there is data or an end record waiting to be written."""
        with self.lock:
            return not self.out_done and (
                bool(self.out_buf) or self.reset_reason is not None or self.want_close
                or (self.want_eof and not self.eof_written))

    def build_batch(self, room: int, chunk: int) -> List[bytes]:
        """Record buffers for up to `room` bytes of buffered data, then any end record due.

        Zero-copy when everything buffered fits: the buffer itself is handed over.
        End records are tiny and may overshoot the window slightly; data never does.
        """
        parts: List[bytes] = []
        with self.lock:
            self._resume_writer_if_drained()  # also after a reset or the peer's CLOSE emptied it
            if self.out_done:
                return parts
            if self.reset_reason is not None:
                self.out_buf.clear()
                self.out_done = True
                return [encode(Kind.RESET, self.reset_reason.encode("utf-8", "replace"))]
            budget = room - HEADER.size * (room // chunk + 1)
            if self.out_buf and budget > 0:
                if len(self.out_buf) <= budget:
                    data, self.out_buf = self.out_buf, bytearray()
                else:
                    data = self.out_buf[:budget]
                    del self.out_buf[:budget]
                view = memoryview(data)
                for offset in range(0, len(data), chunk):
                    payload = view[offset:offset + chunk]
                    parts += [HEADER.pack(MAGIC, FORMAT_VERSION, Kind.DATA, len(payload)), payload]
            self._resume_writer_if_drained()
            if not self.out_buf:
                if self.want_close:
                    parts.append(encode(Kind.CLOSE))
                    self.eof_written = self.out_done = True
                    self.lost_after_write = self.app_closed
                elif self.want_eof and not self.eof_written:
                    parts.append(encode(Kind.EOF))
                    self.eof_written = True
        return parts

    def _resume_writer_if_drained(self) -> None:
        if self.writer_paused and len(self.out_buf) <= self.resume_below:
            self.writer_paused, self.resume_writer = False, True

    def peer_closed(self) -> None:
        """The peer reads no more: drop what we still have and close our direction."""
        with self.lock:
            if not self.out_done:
                self.out_buf.clear()
                self.want_eof = self.want_close = True

    def end_output(self) -> bool:
        """Mark our direction over without writing (peer gone). True if it was open."""
        with self.lock:
            was_open = not self.out_done
            self.out_done = True
            self.out_buf.clear()
            return was_open


class PendingConnect:
    """A client connection waiting for the server's ACCEPT."""

    def __init__(self, conn: Conn, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.future: "concurrent.futures.Future[FileTransport]" = concurrent.futures.Future()
        self.sent_to: Optional[str] = None
        self.next_check = 0.0
        self.refusal = ""


class Peer:
    """Another endpoint we know, from its first record until it leaves or is declared dead."""

    def __init__(self, eid: str, bell: SharedFile, met_after_ping: int) -> None:
        self.eid = eid
        self.bell = bell
        self.last_seen = time.monotonic()
        self.last_ping = float("-inf")
        # our ping counter when we (re)met it: a BYE from it that saw none of our later
        # pings gave up on an earlier meeting, not on this one
        self.met_after_ping = met_after_ping
        self.pings_seen = 0  # the highest counter of its pings to us
        self.who: Optional[str] = None  # "pid P on host H", from its pings
        self.conns: Set[str] = set()


def _describe_gone(exc: OSError, doing: str) -> Exception:
    if exc.errno in _GONE_ERRNOS:
        return PeerLostError(f"connection file vanished while {doing} (the other side removed it): {exc}")
    return PeerLostError(f"filesystem error while {doing}: {exc}")


class Endpoint:
    """The I/O thread of one process's side of a tunnel directory.

    Create, then `await endpoint.start()`. A serving endpoint also claims the
    directory's server pointer. With `autostop`, the endpoint stops once it has
    had connections and has none (and no server role) left. `peer_name` names the
    other side in log lines (e.g. "fileforward --client"); by default "tunnel
    client" for a serving endpoint, else "tunnel server".
    """

    def __init__(self, tunnel_dir: Path, loop: asyncio.AbstractEventLoop, options: Options,
                 *, serve: bool = False, force: bool = False, autostop: bool = False,
                 on_accept: Optional[Callable[[FileTransport], None]] = None,
                 on_stepdown: Optional[Callable[[str], None]] = None,
                 peer_name: Optional[str] = None) -> None:
        self.tunnel_dir = tunnel_dir
        self.loop = loop
        self.opts = options
        self.eid = ""
        self.autostop = autostop
        self.peer_name = peer_name or ("tunnel client" if serve else "tunnel server")
        host = socket.gethostname().encode("ascii", "replace").decode().replace(" ", "_") or "?"
        self._identity = f"{os.getpid()} {host}"  # "<pid> <host>", ASCII fields of our PINGs
        self._serve = serve
        self._force = force
        self._on_accept = on_accept
        self._on_stepdown = on_stepdown
        self._bell: Optional[SharedFile] = None
        self._pointer: Optional[SharedFile] = None
        self._dir_id: Optional[tunneldir.DirIdentity] = None
        self._next_dir_check = 0.0
        self.failure: Optional[EndpointFailedError] = None
        self.silent = False  # set when the directory was tampered with: write nothing more there
        self._conns: Dict[str, Conn] = {}
        self._connects: Dict[str, PendingConnect] = {}
        self._peers: Dict[str, Peer] = {}
        self._pings = 0  # the counter of our pings, to any peer: it rises across meetings with a peer
        self._commands: List[Callable[[], None]] = []
        self._commands_lock = threading.Lock()
        self._closed = False
        self._wake = threading.Event()
        self._stop_requested = False
        self._had_work = False
        self._next_cid = 0
        self._last_refused = ""
        self._last_activity = time.monotonic()
        self._last_bell_poll = float("-inf")
        self._bell_looked = time.monotonic()  # start of the last drain of our bell
        self._next_watch = 0.0  # next look at the server pointer (client endpoints with no peer)
        self.busy_since: Optional[float] = None
        self.started: "concurrent.futures.Future[None]" = concurrent.futures.Future()
        self.stopped: "concurrent.futures.Future[None]" = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="fileforward-io", daemon=True)
        self._warned_stall = False

    # --- event loop side ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the I/O thread; returns once our bell (and server pointer) exist."""
        self._thread.start()
        try:
            await asyncio.shield(asyncio.wrap_future(self.started))
        except asyncio.CancelledError:  # nobody will use it: let the thread clean up and exit
            self.stop()
            raise
        atexit.register(self._stop_at_exit)
        self.loop.call_later(1.0, self._check_stall)

    def wake(self) -> None:
        """Make the I/O thread run a cycle now (data to write, reader resumed...)."""
        self._wake.set()

    def call(self, command: Callable[[], None]) -> None:
        """Run `command` on the I/O thread at the start of its next cycle."""
        with self._commands_lock:
            if self._closed:
                if self.failure is not None:
                    raise EndpointFailedError(str(self.failure))
                raise ConnectionAbortedError(f"fileforward endpoint for {self.tunnel_dir} is shut down")
            self._commands.append(command)
        self._wake.set()

    def stop(self) -> None:
        """Stop: reset open connections, tell peers, remove our files. Thread-safe."""
        self._stop_requested = True
        self._wake.set()

    def _stop_at_exit(self) -> None:
        """Interpreter exit with the endpoint still running: clean up before daemon threads die."""
        self.stop()
        self._thread.join(5.0)

    async def wait_stopped(self) -> None:
        """Wait until the I/O thread has cleaned up and exited. Cancelling the wait
        leaves the endpoint alone (a bare wrap_future would cancel `stopped` itself,
        which the I/O thread then fails to set)."""
        await asyncio.shield(asyncio.wrap_future(self.stopped))

    def raise_failure(self) -> None:
        """Raise EndpointFailedError if the endpoint stopped because it could not go on."""
        if self.failure is not None:
            raise EndpointFailedError(str(self.failure)) from self.failure.__cause__

    async def connect(self) -> FileTransport:
        """A new connection to the directory's server (NoServerError if none answers)."""
        started: "concurrent.futures.Future[PendingConnect]" = concurrent.futures.Future()

        def command() -> None:
            try:
                started.set_result(self._begin_connect())
            except BaseException as exc:  # handed to the caller
                started.set_exception(exc)

        self.call(command)
        pending = await asyncio.wrap_future(started)
        return await asyncio.wrap_future(pending.future)

    def stop_serving(self) -> "concurrent.futures.Future[None]":
        """Stop accepting and release the server pointer; open connections go on."""
        done: "concurrent.futures.Future[None]" = concurrent.futures.Future()

        def command() -> None:
            self._release_pointer(clear=True)
            done.set_result(None)

        self.call(command)
        return done

    def _check_stall(self) -> None:
        busy, now = self.busy_since, time.monotonic()
        if busy is not None and now - busy > self.opts.slow_call_warning:
            log.warning("tunnel directory %s: a filesystem call has not returned for %.0f s "
                        "(is the shared filesystem hung?)", self.tunnel_dir, now - busy)
            self._warned_stall = True
        elif self._warned_stall and busy is None:
            log.warning("tunnel directory %s: the filesystem answers again", self.tunnel_dir)
            self._warned_stall = False
        if not self.stopped.done():
            self.loop.call_later(1.0, self._check_stall)

    def to_loop(self, callback: Callable[..., None], *args: object) -> None:
        """Schedule `callback` on the event loop (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # --- the I/O thread: main loop ------------------------------------------------------
    def _run(self) -> None:
        try:
            self._open()
        except BaseException as exc:
            self.started.set_exception(exc)
            self.stopped.set_result(None)
            return
        self.started.set_result(None)
        trouble = Trouble(f"tunnel directory {self.tunnel_dir}", self.opts.give_up_after)
        try:
            while not self._should_stop():
                self._wake.clear()
                now = time.monotonic()
                self.busy_since = now
                try:
                    self._watch_dir(now)
                    if self._cycle(now):
                        self._last_activity = time.monotonic()
                    trouble.cleared(now)
                    wait = self._interval()
                except UnsafeTunnelDirError:
                    raise
                except OSError as exc:  # endpoint-wide: a connection's own error ends it where it happens
                    wait = trouble.failed(exc, now)
                    with contextlib.suppress(OSError):  # the same trouble, reported just above
                        self._keep_peers(now)  # meanwhile, a peer we cannot reach or hear is lost as usual
                self.busy_since = None
                self._wake.wait(wait)
        except BaseException as exc:
            self._fail_endpoint(exc)
        finally:
            self.busy_since = None
            try:
                self._shutdown()
            except BaseException:  # a broken filesystem: still tell everyone we stopped
                log.exception("fileforward endpoint for %s: cleanup failed", self.tunnel_dir)
            atexit.unregister(self._stop_at_exit)
            self.stopped.set_result(None)

    def _fail_endpoint(self, exc: BaseException) -> None:
        """Stop for good, in one ERROR line naming the cause (and, for a tampered directory,
        its fix); after tampering nothing more is written into the directory."""
        if isinstance(exc, UnsafeTunnelDirError):
            self.silent = True
        if isinstance(exc, (TunnelError, EndpointFailedError)):
            log.error("fileforward stopped: %s", exc)
        else:  # a bug: keep its traceback
            log.exception("fileforward I/O thread for %s failed", self.tunnel_dir)
        failure = EndpointFailedError(f"fileforward stopped: {exc}")
        failure.__cause__ = exc
        self.failure = failure

    def _should_stop(self) -> bool:
        if self._stop_requested:
            return True
        return (self.autostop and self._had_work and not self._conns and not self._connects
                and self._pointer is None and not self._commands)

    def _interval(self) -> float:
        idle = time.monotonic() - self._last_activity
        return min(self.opts.poll_max, max(self.opts.poll_min, idle / 2 if idle > 0.02 else 0.0))

    def _run_commands(self, last: bool = False) -> bool:
        with self._commands_lock:
            commands, self._commands = self._commands, []
            self._closed = last
        for command in commands:
            command()
        return bool(commands)

    def _cycle(self, now: float) -> bool:
        activity = self._run_commands()
        for conn in list(self._conns.values()):
            if now >= conn.out_next and conn.has_output():
                activity |= self._flush(conn)
        hot = [c for c in self._conns.values() if c.hot and c.reading and not c.in_done and now >= c.in_next]
        if not hot or now - self._last_bell_poll >= BELL_POLL_WHILE_HOT:
            self._last_bell_poll = now
            activity |= self._poll_bell()
        for conn in hot:
            if not conn.in_done and self._conns.get(conn.cid) is conn:  # not ended by the bell
                activity |= self._poll_in(conn, now)
        for pending in list(self._connects.values()):
            self._advance_connect(pending, now)
        if not self._serve and not self._peers and now >= self._next_watch:
            self._next_watch = now + POINTER_WATCH
            self._watch_server()
        self._keep_peers(now)
        for conn in [c for c in self._conns.values() if c.in_done and c.out_done]:
            self._forget(conn)
        return activity

    # --- startup and shutdown -----------------------------------------------------------
    def _open(self, again: bool = False) -> None:
        """Make (or, `again`, make again) the directory, our bell, and the server pointer
        if we serve."""
        self.tunnel_dir, self._dir_id = tunneldir.prepare(self.tunnel_dir, parents=not again)
        self._next_dir_check = time.monotonic() + DIR_CHECK_INTERVAL
        while self._bell is None:
            eid = secrets.token_hex(8)
            final = tunneldir.bell_path(self.tunnel_dir, eid)
            bell = TABLE.open(final.with_name(final.name + tunneldir.NEW_SUFFIX), create=True, exclusive=True)
            bell.try_hold_alive()
            try:
                TABLE.rename(bell, final)
            except FileNotFoundError:  # a cleaner took it for a crashed endpoint's: retry
                bell.drop_alive()
                TABLE.release(bell)
                continue
            self.eid, self._bell = eid, bell
        try:
            if self._serve:
                self._claim_pointer()
            self._clear_stale_files()
        except BaseException:
            _quietly(self._release_pointer, True)
            self._close_bell()
            raise

    def _shutdown(self) -> None:
        self._run_commands(last=True)
        self._end_all(self.failure or ConnectionAbortedError(f"fileforward endpoint for {self.tunnel_dir} shut down"),
                      tell_peers=not self.silent)

    def _end_all(self, lost: BaseException, tell_peers: bool) -> None:
        """End every connection with `lost`, forget every peer, give up our files; with
        `tell_peers`, peers get a BYE first (a peer that reads it ends our connections
        at once) and a plain RESET per connection (the BYE says why)."""
        if tell_peers:
            for peer in self._peers.values():
                _quietly(peer.bell.append, encode_text(Kind.BYE, self.eid))
        for pending in list(self._connects.values()):
            self._abandon_connect(pending, lost)
        for conn in list(self._conns.values()):
            if tell_peers:
                _reset_output(conn, "")
            conn.end_output()
            self._end_input(conn)
            self.to_loop(conn.transport.deliver_lost, lost)
            self._forget(conn)
        for peer in list(self._peers.values()):
            self._drop_peer(peer)
        _quietly(self._release_pointer, tell_peers)
        self._close_bell()

    def _close_bell(self) -> None:
        if self._bell is not None:
            TABLE.unlink(Path(self._bell.path))
            _quietly(self._bell.drop_alive)
            TABLE.release(self._bell)
            self._bell = None

    def _watch_dir(self, now: float) -> None:
        """Every DIR_CHECK_INTERVAL, check the directory again: UnsafeTunnelDirError if its
        owner or mode changed (the endpoint stops); if it was deleted, everything in it
        is lost: end our connections and make it again (retried while that fails)."""
        if self._bell is not None:
            if now < self._next_dir_check:
                return
            self._next_dir_check = now + DIR_CHECK_INTERVAL
            try:
                tunneldir.verify(self.tunnel_dir, self._dir_id)
                return
            except TunnelDirLostError as exc:
                log.error("%s: %d connection(s) lost; making it again (mode 700)", exc, len(self._conns))
                self._serve = self._pointer is not None
                self._end_all(PeerLostError(str(exc)), tell_peers=False)
        self._open(again=True)
        log.warning("tunnel directory %s made again; connections work again", self.tunnel_dir)

    def _clear_stale_files(self) -> None:
        """Remove what crashed endpoints left behind; a live owner holds its bell's lock."""
        owners: Dict[str, List[str]] = {}
        for name in os.listdir(self.tunnel_dir):
            owner = tunneldir.owner_of(name)
            if owner is not None and owner != self.eid:
                owners.setdefault(owner, []).append(name)
        for owner, names in owners.items():
            bells = [n for n in names if n.endswith(tunneldir.BELL_SUFFIX)] or \
                    [n for n in names if n.endswith(tunneldir.NEW_SUFFIX)]
            if bells and not self._owner_dead(self.tunnel_dir / bells[0]):
                continue
            log.info("tunnel directory %s: removing %d file(s) left by a dead endpoint %s",
                     self.tunnel_dir, len(names), owner)
            for name in names:
                TABLE.unlink(self.tunnel_dir / name)

    @staticmethod
    def _owner_dead(path: Path) -> bool:
        if TABLE.local_alive_holder(path):
            return False
        try:
            shared = TABLE.open(path)
        except FileNotFoundError:
            return False
        try:
            if not shared.try_hold_alive():
                return False
            shared.drop_alive()
            return True
        finally:
            TABLE.release(shared)

    # --- server pointer ---------------------------------------------------------------------
    def _pointer_path(self) -> Path:
        return self.tunnel_dir / tunneldir.SERVER_FILE

    def _claim_pointer(self) -> None:
        pointer = TABLE.open(self._pointer_path(), create=True)
        try:
            if not pointer.try_hold_alive():
                self._take_over(pointer)
            pointer.replace(json.dumps({
                "eid": self.eid, "pid": os.getpid(), "host": socket.gethostname(),
                "format": FORMAT_VERSION, "started": time.time(),
            }).encode())
        except BaseException:
            TABLE.release(pointer)
            raise
        self._pointer = pointer
        self._had_work = True

    def _take_over(self, pointer: SharedFile) -> None:
        info = _parse_pointer(pointer.read()) or {}
        who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
        if not self._force:
            raise ServerAlreadyRunningError(
                f"another process ({who}) already serves tunnel directory {self.tunnel_dir}: "
                f"stop it, or pass --force (force=True) to make it step down")
        log.warning("tunnel directory %s: asking the running server (%s) to step down", self.tunnel_dir, who)
        if _EID_RE.match(str(info.get("eid", ""))):
            _quietly(self._append_to, tunneldir.bell_path(self.tunnel_dir, info["eid"]),
                     encode_text(Kind.STEPDOWN, self.eid, f"pid {os.getpid()} on host {socket.gethostname()}"))
        deadline = time.monotonic() + STEPDOWN_WAIT
        while not pointer.try_hold_alive():
            if time.monotonic() > deadline:
                raise ServerAlreadyRunningError(
                    f"the running server ({who}) in {self.tunnel_dir} did not step down within {STEPDOWN_WAIT:g} s")
            time.sleep(0.05)

    def _release_pointer(self, clear: bool) -> None:
        if self._pointer is None:
            return
        if clear and not self.silent:
            _quietly(self._pointer.replace, b"")
        self._pointer.drop_alive()
        TABLE.release(self._pointer)
        self._pointer = None

    def _read_pointer(self) -> Optional[dict]:
        try:
            pointer = TABLE.open(self._pointer_path())
        except FileNotFoundError:
            return None
        try:
            info = _parse_pointer(pointer.read())
        finally:
            TABLE.release(pointer)
        if info is not None and info.get("format") != FORMAT_VERSION:
            raise ProtocolError(
                f"tunnel directory {self.tunnel_dir} is served with tunnel format {info.get('format')}, "
                f"this fileforward speaks format {FORMAT_VERSION}: install the same fileforward version on both sides")
        return info

    # --- connecting (client) ------------------------------------------------------------
    def _begin_connect(self) -> PendingConnect:
        self.raise_failure()
        self._verify_dir()
        self._next_cid += 1
        cid = f"{self.eid}-{self._next_cid}"
        to_server, to_client = tunneldir.chunk_paths(self.tunnel_dir, cid)
        out_file = TABLE.open(to_server, create=True, exclusive=True)
        try:
            in_file = TABLE.open(to_client, create=True, exclusive=True)
        except BaseException:
            TABLE.unlink(to_server)
            TABLE.release(out_file)
            raise
        conn = Conn(self, cid, to_client, to_server, in_file, out_file)
        pending = PendingConnect(conn, time.monotonic() + self.opts.connect_timeout)
        self._conns[cid] = conn
        self._connects[cid] = pending
        self._had_work = True
        return pending

    def _verify_dir(self) -> None:
        """Check the directory before a connection's files are opened in it; on a
        failure, the next cycle's check stops the endpoint or makes the directory again."""
        try:
            tunneldir.verify(self.tunnel_dir, self._dir_id)
        except OSError:
            self._next_dir_check = 0.0
            raise

    def _advance_connect(self, pending: PendingConnect, now: float) -> None:
        if now >= pending.deadline:
            refusal = f" (last answer: {pending.refusal})" if pending.refusal else ""
            self._abandon_connect(pending, NoServerError(
                f"no {self.peer_name} answered in tunnel directory {self.tunnel_dir} within "
                f"{self.opts.connect_timeout:g} s{refusal}. Start the far end first, e.g. "
                f"`fileforward --client --port PORT --tunnel_dir {self.tunnel_dir}` on the node that runs "
                f"the service (or `python -m rpc serve MODULE:FUNCTIONS --tunnel_dir {self.tunnel_dir}` for RPC)"))
            return
        if now < pending.next_check:
            return
        pending.next_check = now + POINTER_RECHECK
        try:
            info = self._read_pointer()
        except ProtocolError as exc:
            self._abandon_connect(pending, exc)
            return
        eid = str(info.get("eid", "")) if info else ""
        if not _EID_RE.match(eid) or eid == pending.sent_to:
            return
        try:
            self._append_to(tunneldir.bell_path(self.tunnel_dir, eid),
                            encode_text(Kind.CONNECT, self.eid, pending.conn.cid))
        except FileNotFoundError:
            return
        except UnsafeTunnelDirError:
            raise
        except OSError as exc:  # e.g. ENOSPC: this connection fails, the next may work
            self._abandon_connect(pending, TunnelError(
                exc.errno, f"cannot ask the server in {self.tunnel_dir} for a connection: {exc.strerror or exc}"))
            return
        pending.sent_to = eid

    def _on_answer(self, pending: PendingConnect, kind: Kind, text: str) -> None:
        if kind is Kind.REFUSE:
            pending.refusal, pending.sent_to = text, None
            return
        conn = pending.conn
        del self._connects[conn.cid]
        try:
            peer = self._peer(text)
        except (FileNotFoundError, ValueError) as exc:
            self._abandon_connect(pending, PeerLostError(f"the server vanished while accepting: {exc}"))
            return
        conn.peer = peer.eid
        peer.conns.add(conn.cid)
        try:
            pending.future.set_result(conn.transport)
        except concurrent.futures.InvalidStateError:  # cancelled: the application stopped waiting
            self._fail(conn, ConnectionAbortedError("the connecting side stopped waiting"), tell_peer=True, why="")

    def _abandon_connect(self, pending: PendingConnect, exc: BaseException) -> None:
        conn = pending.conn
        self._connects.pop(conn.cid, None)
        _reset_output(conn, "")  # in case the server accepted just now
        TABLE.unlink(conn.in_path)
        TABLE.unlink(conn.out_path)
        conn.in_done = True
        self._forget(conn)
        if not pending.future.done():
            pending.future.set_exception(exc)

    # --- accepting (server) -------------------------------------------------------------
    def _on_connect(self, sender: str, cid: str) -> None:
        if not (_EID_RE.match(sender) and _CID_RE.match(cid) and cid.startswith(sender + "-")):
            raise ProtocolError(f"bad connection id {cid!r} from {sender!r}")
        if cid in self._conns:
            return
        to_server, to_client = tunneldir.chunk_paths(self.tunnel_dir, cid)
        if self._pointer is None:
            _quietly(self._append_to, to_client, encode(Kind.REFUSE, b"the server is not accepting connections"))
            return
        try:
            self._verify_dir()  # UnsafeTunnelDirError stops the endpoint before anything is opened
        except TunnelDirLostError:
            return
        files: List[SharedFile] = []
        try:
            for path in (to_server, to_client):
                files.append(TABLE.open(path))
            peer = self._peer(sender)
        except OSError as exc:
            for shared in files:
                TABLE.release(shared)
            if isinstance(exc, UnsafeTunnelDirError):
                raise
            if isinstance(exc, FileNotFoundError):
                log.debug("ignoring connection %s: its files or its client are gone", cid)
                return
            if cid != self._last_refused:  # the client asks again until its timeout: one line
                self._last_refused = cid
                log.warning("tunnel directory %s: cannot accept connection %s: %s", self.tunnel_dir, cid, exc)
            _quietly(self._append_to, to_client, encode(Kind.REFUSE, f"the server cannot accept it: {exc}".encode()))
            return
        in_file, out_file = files
        conn = Conn(self, cid, to_server, to_client, in_file, out_file)
        conn.peer = sender
        peer.conns.add(cid)
        self._conns[cid] = conn
        conn.last_write = time.monotonic()
        try:
            out_file.append(encode(Kind.ACCEPT, self.eid.encode()))
        except OSError as exc:
            self._fail_loudly(conn, _describe_gone(exc, "accepting"), tell_peer=False)
            return
        self._ring(conn)
        if self._on_accept is not None:
            self.to_loop(self._on_accept, conn.transport)

    # --- writing ------------------------------------------------------------------------
    def _flush(self, conn: Conn) -> bool:
        eof_before = conn.eof_written
        started = time.monotonic()
        try:
            written = conn.out_file.append_batch(lambda room: conn.build_batch(room, self.opts.chunk),
                                                 self.opts.window)
        except OSError as exc:
            self._fail_loudly(conn, _describe_gone(exc, "writing"), tell_peer=False)
            return True
        if conn.resume_writer:  # only then wake the loop: not once per flush
            conn.resume_writer = False
            self.to_loop(conn.transport.writer_drained)
        if not written:  # the window is full: let the reader at the file
            conn.out_next = _leave_free_since(started)
            return False
        # Timed after the append returned, against when the previous one began: the
        # bounds the wake-up protocol needs (ARCHITECTURE.md), whatever delayed this append.
        if (conn.out_done or conn.eof_written != eof_before
                or time.monotonic() - conn.last_write > self.opts.wake_after_idle):
            self._ring(conn)
        conn.last_write = started
        if conn.lost_after_write:
            conn.lost_after_write = False
            self.to_loop(conn.transport.deliver_lost, None)
        return True

    def _ring(self, conn: Conn) -> None:
        peer = self._peers.get(conn.peer) if conn.peer else None
        if peer is None:
            return
        try:
            peer.bell.append(encode_text(Kind.WAKE, self.eid, conn.cid))
        except OSError as exc:
            self._peer_lost(peer, f"its bell file is gone ({exc.strerror})")

    @staticmethod
    def _append_to(path: Path, record: bytes) -> None:
        """Append one record to a file we do not keep open (a bell, a refused connection)."""
        shared = TABLE.open(path)
        try:
            shared.append(record)
        finally:
            TABLE.release(shared)

    # --- reading ------------------------------------------------------------------------
    def _poll_bell(self) -> bool:
        """Drain our bell; True if it brought activity (not just pings)."""
        assert self._bell is not None
        started = time.monotonic()
        try:
            data = self._bell.drain(wait=False)
        except Busy:  # a peer is appending: come back in a moment
            return True
        looked, self._bell_looked = self._bell_looked, started
        if not data:
            return False
        records, damage = decode_until_damage(data)
        if damage is not None:  # what came before it is good: act on it
            log.warning("tunnel directory %s: ignoring the damaged end of our bell file (%d bytes): %s",
                        self.tunnel_dir, len(data), damage)
        for kind, payload in records:
            try:
                self._on_bell_record(kind, text_fields(payload), looked)
            except (ProtocolError, IndexError, ValueError) as exc:
                log.warning("tunnel directory %s: ignoring a malformed %s record (%s)",
                            self.tunnel_dir, kind.name, exc)
        return any(kind is not Kind.PING for kind, _ in records)  # a ping is no reason to poll faster

    def _on_bell_record(self, kind: Kind, fields: List[str], looked: float) -> None:
        """Act on one bell record, appended after `looked` (our previous drain began)."""
        sender = fields[0]
        if kind is Kind.PING:
            self._on_ping(sender, fields[1:], looked)
            return
        peer = self._peers.get(sender)
        if peer is not None:
            peer.last_seen = max(peer.last_seen, looked)
        if kind is Kind.WAKE:
            conn = self._conns.get(fields[1])
            if conn is not None:
                conn.hot, conn.last_seen = True, time.monotonic()
        elif kind is Kind.CONNECT:
            self._on_connect(sender, fields[1])
        elif kind is Kind.BYE:
            if peer is not None:
                self._on_bye(peer, fields[1:])
        elif kind is Kind.STEPDOWN:
            if self._pointer is not None:
                description = " ".join(fields[1:])
                log.warning("tunnel directory %s: stepping down for a new server (%s)", self.tunnel_dir, description)
                self._release_pointer(clear=False)
                if self._on_stepdown is not None:
                    self.to_loop(self._on_stepdown, description)
        else:
            raise ProtocolError(f"unexpected record {kind.name} in a bell file")

    def _on_bye(self, peer: Peer, fields: List[str]) -> None:
        """A peer left (no fields) or gave up on us ("<our last ping it saw> <why>"). A
        give-up that saw none of our pings since we (re)met it crossed our own giving up
        and is for the earlier meeting: the connections made since are not its business."""
        if not fields:
            self._peer_lost(peer, "")
        elif int(fields[0]) <= peer.met_after_ping:
            log.debug("tunnel directory %s: ignoring a BYE from %s meant for an earlier meeting",
                      self.tunnel_dir, self._describe(peer))
        else:
            self._peer_lost(peer, f"it gave up on this side: {' '.join(fields[1:])}")

    def _on_ping(self, sender: str, fields: List[str], looked: float) -> None:
        """A peer's PING: life if its counter is new; a new peer is announced with its pid and host."""
        peer = self._peers.get(sender)
        if peer is None:
            if sender == self.eid:
                return
            try:
                peer = self._peer(sender)
            except FileNotFoundError:  # gone already
                return
        counter = int(fields[0])
        if counter > peer.pings_seen:
            peer.pings_seen = counter
            peer.last_seen = max(peer.last_seen, looked)
        if peer.who is None and len(fields) >= 3:
            peer.who = f"pid {fields[1]} on host {fields[2]}"
            log.info("tunnel directory %s: %s appeared", self.tunnel_dir, self._describe(peer))

    def _poll_in(self, conn: Conn, started: float) -> bool:
        """Drain a connection's in file. `started`: when this cycle began, before the look."""
        polled = time.monotonic()
        try:
            data = conn.in_file.drain(wait=False)
        except Busy:  # the writer is appending: come back in a moment
            conn.in_next = _leave_free_since(polled)
            return True
        except OSError as exc:
            self._fail_loudly(conn, _describe_gone(exc, "reading"), tell_peer=True)
            return True
        looked, conn.looked = conn.looked, polled
        if not data:
            conn.in_next = _leave_free_since(polled)
            if started - conn.last_seen > self.opts.cool_after and conn.cid not in self._connects:
                conn.hot = False
            return False
        conn.last_seen = time.monotonic()
        peer = self._peers.get(conn.peer) if conn.peer else None
        if peer is not None:
            peer.last_seen = max(peer.last_seen, looked)
        try:
            self._on_records(conn, decode(data))
        except ProtocolError as exc:
            self._fail_loudly(conn, ProtocolError(f"damaged record: {exc}"), tell_peer=True)
        return True

    def _on_records(self, conn: Conn, records: list) -> None:
        payloads: List[memoryview] = []
        for kind, payload in records:
            if kind is Kind.DATA and not conn.in_eof:
                payloads.append(payload)
                continue
            if payloads:
                self.to_loop(conn.transport.deliver_data, payloads)
                payloads = []
            if kind is Kind.EOF and not conn.in_eof:
                conn.in_eof = True
                self.to_loop(conn.transport.deliver_eof)
            elif kind is Kind.CLOSE:
                if not conn.in_eof:
                    conn.in_eof = True
                    self.to_loop(conn.transport.deliver_eof)
                self._end_input(conn)
                conn.peer_closed()
            elif kind is Kind.RESET:
                self._on_reset(conn, bytes(payload).decode("utf-8", "replace"))
                return
            elif kind in (Kind.ACCEPT, Kind.REFUSE) and conn.cid in self._connects:
                self._on_answer(self._connects[conn.cid], kind, bytes(payload).decode("utf-8", "replace"))
            else:
                raise ProtocolError(f"unexpected {kind.name} record")
        if payloads:
            self.to_loop(conn.transport.deliver_data, payloads)

    # --- ending connections -------------------------------------------------------------
    def _on_reset(self, conn: Conn, why: str) -> None:
        """The peer reset the connection: answer (unless we reset it first), so that
        it can release the connection too, and tell the application why."""
        peer = self._peers.get(conn.peer) if conn.peer else None
        by = self._describe(peer) if peer is not None else f"the {self.peer_name}"
        if why:  # a failure the peer explains (a plain abort has no reason)
            log.warning("tunnel directory %s: %s reset connection %s: %s", self.tunnel_dir, by, conn.cid, why)
        self._fail(conn, PeerLostError(f"connection reset by the other side ({by})" + (f": {why}" if why else "")),
                   tell_peer=True, why="")

    def _end_input(self, conn: Conn) -> None:
        """No more records will be read from the in file: remove it (its writer is done)."""
        if not conn.in_done:
            conn.in_done = True
            TABLE.unlink(conn.in_path)

    def _fail(self, conn: Conn, exc: BaseException, tell_peer: bool, why: Optional[str] = None) -> None:
        """End a connection with an error for the application; with `tell_peer`, a
        RESET tells the peer `why` (default: the error)."""
        if tell_peer and _reset_output(conn, str(exc) if why is None else why):
            self._ring(conn)
        conn.end_output()  # no more writes either way
        self._end_input(conn)
        pending = self._connects.get(conn.cid)
        if pending is not None:
            self._abandon_connect(pending, exc)
        else:
            self.to_loop(conn.transport.deliver_lost, exc)

    def _fail_loudly(self, conn: Conn, exc: BaseException, tell_peer: bool) -> None:
        """_fail for a cause the user must hear of (a damaged file, a full disk...):
        logged at WARNING on this side, where the broken connection shows up."""
        log.warning("tunnel directory %s: connection %s broken: %s", self.tunnel_dir, conn.cid, exc)
        self._fail(conn, exc, tell_peer)

    def _forget(self, conn: Conn) -> None:
        if self._conns.pop(conn.cid, None) is None:
            return
        peer = self._peers.get(conn.peer) if conn.peer else None
        if peer is not None:
            peer.conns.discard(conn.cid)
        TABLE.release(conn.in_file)
        TABLE.release(conn.out_file)

    # --- peers and liveness -------------------------------------------------------------
    def _peer(self, eid: str) -> Peer:
        peer = self._peers.get(eid)
        if peer is None:
            if not _EID_RE.match(eid):
                raise ValueError(f"bad endpoint id {eid!r}")
            peer = Peer(eid, TABLE.open(tunneldir.bell_path(self.tunnel_dir, eid)), self._pings)
            self._peers[eid] = peer
        return peer

    def _describe(self, peer: Peer) -> str:
        return f"{self.peer_name} ({peer.who})" if peer.who else f"{self.peer_name} {peer.eid}"

    def _drop_peer(self, peer: Peer) -> None:
        if self._peers.pop(peer.eid, None) is not None:
            TABLE.release(peer.bell)

    def _watch_server(self) -> None:
        """Meet the directory's live server before any connection, so that both
        sides can tell their users about each other."""
        try:
            info = self._read_pointer()
        except ProtocolError:  # a connection attempt reports it
            return
        eid = str(info.get("eid", "")) if info else ""
        if not _EID_RE.match(eid) or self._owner_dead(tunneldir.bell_path(self.tunnel_dir, eid)):
            return
        try:
            self._peer(eid)  # our first PING introduces us; its PING introduces it
        except FileNotFoundError:
            pass

    def _keep_peers(self, now: float) -> None:
        for peer in list(self._peers.values()):
            if now - peer.last_seen > self.opts.liveness_timeout:
                self._peer_lost(peer, f"no sign of life for {self.opts.liveness_timeout:g} s (it crashed, "
                                      f"was stopped, or the shared filesystem stopped answering)", tell=True)
            elif now - peer.last_ping >= self.opts.ping_interval:
                peer.last_ping = now
                self._pings += 1
                try:
                    peer.bell.append(encode_text(Kind.PING, self.eid, self._pings, self._identity))
                except OSError as exc:
                    self._peer_lost(peer, f"its bell file is gone ({exc.strerror})")

    def _peer_lost(self, peer: Peer, why: str, tell: bool = False) -> None:
        """The peer left (`why` empty) or is gone: end its connections and clear
        the files it cannot. With `tell`, a BYE tells it that we gave up on it, so
        that it ends its side of them too, should it come back."""
        if self._peers.get(peer.eid) is not peer:
            return
        who = self._describe(peer)
        if not why:
            log.info("tunnel directory %s: %s left (it shut down cleanly)", self.tunnel_dir, who)
            error = PeerLostError(f"{who} shut down")
        else:
            level = logging.WARNING if peer.who or peer.conns else logging.DEBUG
            log.log(level, "tunnel directory %s: %s is gone: %s", self.tunnel_dir, who, why)
            error = PeerLostError(f"{who} is gone (tunnel directory {self.tunnel_dir}): {why}")
        if tell:
            _quietly(peer.bell.append, encode_text(  # with its last ping we saw: see _on_bye
                Kind.BYE, self.eid, peer.pings_seen,
                f"it saw no sign of life from this side for {self.opts.liveness_timeout:g} s "
                f"(was this process stopped, or its filesystem hung?)"))
        for cid in list(peer.conns):
            conn = self._conns.get(cid)
            if conn is None:
                continue
            self._fail(conn, error, tell_peer=False)
            TABLE.unlink(conn.out_path)
            self._forget(conn)
        self._drop_peer(peer)
        bell = tunneldir.bell_path(self.tunnel_dir, peer.eid)
        if self._owner_dead(bell):
            TABLE.unlink(bell)


def _leave_free_since(started: float) -> float:
    """When to try a file again after a fruitless look at it: leave its lock free
    for as long as we just held it, so that a polling reader cannot starve the
    writer (nor a writer waiting for room the reader). Microseconds on a local disk,
    milliseconds on NFS."""
    now = time.monotonic()
    return now + (now - started)


def _parse_pointer(data: bytes) -> Optional[dict]:
    try:
        info = json.loads(data.decode("utf-8")) if data.strip() else None
    except (UnicodeDecodeError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _reset_output(conn: Conn, reason: str) -> bool:
    """End our direction with a RESET record for the peer; False if it was over already."""
    if not conn.end_output():
        return False
    if conn.endpoint.silent:
        return False
    _quietly(conn.out_file.append, encode(Kind.RESET, reason.encode("utf-8", "replace")))
    return True


def _quietly(function: Callable[..., object], *args: object) -> None:
    """Best effort, for messages to a peer that may already be gone (a tampered
    directory is not ignored: UnsafeTunnelDirError goes on)."""
    try:
        function(*args)
    except UnsafeTunnelDirError:
        raise
    except OSError as exc:
        log.debug("ignored while ending: %s", exc)
