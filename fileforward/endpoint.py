"""An endpoint: the I/O thread that moves one process's connections through the tunnel dir.

Every filesystem call of the transport happens on this thread, never on the event
loop: a hung NFS mount stalls this thread (and is reported by a watchdog on the
loop), not the application.

What each part does (the files are described in tunneldir.py and ARCHITECTURE.md):

- Connections (transport.py for their state, chunks.py for their files): a client
  creates both chunk files of a new connection and raises the connection counter in
  its slot of the server's bell; the server takes up every connection above the one
  it saw last, answers ACCEPT in the server-to-client file and hands a transport to
  the application. Records are appended by their one writer, read by their one
  reader from its own position; the reader acknowledges what it read in the other
  direction (ACK), which is the writer's window.
- Wake-ups: a connection the reader has seen data on recently is "hot" and read
  every cycle; a cold one is only looked at when its peer raises the ring counter
  of its slot in our bell. A writer rings when an append returns more than
  wake_after_idle after the previous one began (the proof that no write is missed,
  whatever the timing, is in ARCHITECTURE.md). An idle endpoint reads one file per
  look, its bell, whatever its number of connections and peers.
- Peers and liveness: peers.py. A peer that gives up on us says so with a BYE
  carrying the reason and the counter of our last ping it saw, so that a BYE that
  crosses our own giving up does not end the connections made after we met again.
- Cycle timing: right after activity the thread polls every poll_min; then it
  waits a quarter of the time since the last activity, up to poll_max; and never polls a
  file again sooner than twice the time the last look at it took (on NFS every
  request counts). While connections are hot, the bell is read at most every 10 ms.
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
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

from . import pointer, tunneldir
from .bell import Flag, OwnerSlot, PeerSlot, Reason, look_size, read_peers
from .chunks import DAMAGE_GRACE, InStream, OutStream, read_limit
from .coherence import DataPath, ReadBuffer
from .errors import (EndpointFailedError, NoServerError, PeerLostError, ProtocolError, ServerAlreadyRunningError,
                     TunnelDirLostError, TunnelError, UnsafeTunnelDirError)
from .files import TABLE, SharedFile, close_file, open_file, write_at
from .leftovers import Leftovers
from .loops import call_soon_if_open
from .options import Options
from .peers import DEATH_CHECK, Peer, machine_identity, meet
from .records import Kind, Record, decode_position, encode, encode_position
from .transport import Conn, FileTransport
from .trouble import Trouble

log = logging.getLogger(__name__)

_CID_RE = re.compile(r"^[0-9a-f]{16}-[0-9]{1,12}$")
POINTER_RECHECK = 0.25
STEPDOWN_WAIT = 10.0
BELL_POLL_WHILE_HOT = 0.01  # hot connections are read directly; the bell can wait a little
POINTER_WATCH = 2.0  # how often a client endpoint with no peer looks for a server
DIR_CHECK_INTERVAL = 5.0  # how often the directory's owner, mode and identity are checked again
_GONE_ERRNOS = (errno.ENOENT, errno.ESTALE)


class Link:
    """A connection's files, as the I/O thread sees them: our direction and theirs."""

    def __init__(self, conn: Conn, out: OutStream, into: InStream) -> None:
        self.conn = conn
        self.out = out
        self.into = into
        self.ack_soon = False  # a segment of theirs ended: tell the writer promptly
        self.handed = 0  # the in position after the last data handed to the loop

    def ack_position(self) -> int:
        """How far the writer may count us as having read: all we read, unless data
        we read has not reached the protocol yet (paused, or not yet run on the loop);
        then only what has."""
        return self.into.pos if self.conn.delivered >= self.handed else self.conn.delivered

    def close(self) -> None:
        self.out.close()
        self.into.close()

    def remove(self) -> None:
        """Close, and remove both files (a connection no server has taken up)."""
        self.close()
        TABLE.unlink(self.into.path)
        TABLE.unlink(self.out.path)


class PendingConnect:
    """A client connection waiting for the server's ACCEPT."""

    def __init__(self, link: Link, deadline: float) -> None:
        self.link = link
        self.deadline = deadline
        self.future: "concurrent.futures.Future[FileTransport]" = concurrent.futures.Future()
        self.sent_to: Optional[str] = None
        self.offered = False  # announced to some server already: a new server gets a new connection id
        self.next_check = 0.0
        self.refusal = ""
        self.silent_server = ""  # the server the pointer named, which has not answered


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
        self._view, self._host = "", ""  # see peers.machine_identity, once the directory exists
        self._serve = serve
        self._force = force
        self._on_accept = on_accept
        self._on_stepdown = on_stepdown
        self._bell: Optional[SharedFile] = None
        self._pointer: Optional[SharedFile] = None
        self._dir_id: Optional[tunneldir.DirIdentity] = None
        self._next_dir_check = 0.0
        self._data = DataPath(direct=False, sync=False, mount=None)
        self._buffer = ReadBuffer(read_limit(options.window, options.chunk))
        self.failure: Optional[EndpointFailedError] = None
        self.silent = False  # set when the directory was tampered with: write nothing more there
        self._links: Dict[str, Link] = {}
        self._connects: Dict[str, PendingConnect] = {}
        self._peers: Dict[str, Peer] = {}
        self._slots: Dict[int, PeerSlot] = {}  # what each peer's slot in our bell said at our last look
        self._damaged_slots: Dict[int, Optional[float]] = {}  # since when unreadable (None: reported)
        self._gone: Set[str] = set()  # peers that left or whose process ended (not merely silent): not met again
        self._pings = 0  # the counter of our pings, to any peer: it rises across meetings with a peer
        self._commands: List[Callable[[], None]] = []
        self._commands_lock = threading.Lock()
        self._for_loop: List[Tuple[Callable[..., None], Tuple[object, ...]]] = []  # see to_loop
        self._closed = False
        self._wake = threading.Event()
        self._stop_requested = False
        self._had_work = False
        self._next_cid = 0
        self._last_refused = ""
        self._last_activity = time.monotonic()
        self._last_bell_poll = float("-inf")
        self._bell_looked = time.monotonic()  # start of the last look at our bell
        self._next_bell_look = 0.0
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
                pending = self._begin_connect()
            except BaseException as exc:  # handed to the caller
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    started.set_exception(exc)
                return
            try:
                started.set_result(pending)
            except concurrent.futures.InvalidStateError:  # the caller stopped waiting (Ctrl-C)
                self._abandon_connect(pending, ConnectionAbortedError("the connecting side stopped waiting"))

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
        """Have the event loop run `callback` (I/O thread only). What a cycle hands over
        goes in one wake-up of the loop, in order: see _hand_over."""
        self._for_loop.append((callback, args))

    def _hand_over(self) -> None:
        """End of a cycle: give the loop what the cycle queued for it."""
        if not self._for_loop:
            return
        batch, self._for_loop = self._for_loop, []
        call_soon_if_open(self.loop, _run_all, batch)

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
                self._hand_over()
                self._wake.wait(wait)
        except BaseException as exc:
            self._fail_endpoint(exc)
        finally:
            self.busy_since = None
            try:
                self._shutdown()
            except BaseException:  # a broken filesystem: still tell everyone we stopped
                log.exception("fileforward endpoint for %s: cleanup failed", self.tunnel_dir)
            self._hand_over()
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
        return (self.autostop and self._had_work and not self._links and not self._connects
                and self._pointer is None and not self._commands)

    def _interval(self) -> float:
        idle = time.monotonic() - self._last_activity
        return min(self.opts.poll_max, max(self.opts.poll_min, idle / 4 if idle > 0.02 else 0.0))

    def _run_commands(self, last: bool = False) -> bool:
        with self._commands_lock:
            commands, self._commands = self._commands, []
            self._closed = last
        for command in commands:
            command()
        return bool(commands)

    def _cycle(self, now: float) -> bool:
        activity = self._run_commands()
        for link in list(self._links.values()):
            if self._write_due(link):
                activity |= self._flush(link)
        reading = [link for link in self._links.values()
                   if link.conn.hot and not link.conn.in_done]  # paused protocols too: see Conn.delivered
        hot = [link for link in reading if now >= link.conn.in_next]  # the others wait for the file server
        if (not reading or now - self._last_bell_poll >= BELL_POLL_WHILE_HOT) and now >= self._next_bell_look:
            self._last_bell_poll = now
            activity |= self._poll_bell()
        for link in hot:
            if not link.conn.in_done and self._links.get(link.conn.cid) is link:  # not ended by the bell
                activity |= self._poll_in(link, now)
        for pending in list(self._connects.values()):
            self._advance_connect(pending, now)
        if not self._serve and not self._peers and now >= self._next_watch:
            self._next_watch = now + POINTER_WATCH
            self._watch_server()
        self._keep_peers(now)
        for link in [k for k in self._links.values() if k.conn.in_done and k.conn.out_done]:
            self._forget(link)
        return activity

    # --- startup and shutdown -----------------------------------------------------------
    def _open(self, again: bool = False) -> None:
        """Make (or, `again`, make again) the directory, our bell, and the server pointer
        if we serve."""
        self.tunnel_dir, self._dir_id = tunneldir.prepare(self.tunnel_dir, parents=not again)
        self._data = DataPath.for_directory(self.tunnel_dir)
        self._view, self._host = machine_identity(self.tunnel_dir)
        self._leftovers = Leftovers(self.tunnel_dir, self._view, self.opts.coherence, self._data, self._buffer)
        self._next_dir_check = time.monotonic() + DIR_CHECK_INTERVAL
        self._slots.clear()
        while self._bell is None:
            eid = secrets.token_hex(8)
            final = tunneldir.bell_path(self.tunnel_dir, eid)
            bell = TABLE.open(final.with_name(final.name + tunneldir.NEW_SUFFIX), create=True, exclusive=True)
            bell.try_hold_alive()
            try:
                write_at(bell.fd, [OwnerSlot(eid, os.getpid(), self._view, self._host,
                                                self.opts.liveness_timeout).encode()], 0,
                         self._data.sync)
                self._check_direct_reads(bell)
                TABLE.rename(bell, final)
            except FileNotFoundError:  # a cleaner took it for a crashed endpoint's: retry
                bell.drop_alive()
                TABLE.release(bell)
                continue
            except BaseException:
                TABLE.unlink(Path(bell.path))
                bell.drop_alive()
                TABLE.release(bell)
                raise
            self.eid, self._bell = eid, bell
        try:
            if self._serve:
                self._claim_pointer()
            self._leftovers.clear(self.eid)
        except BaseException:
            _quietly(self._release_pointer, True)
            self._close_bell()
            raise

    def _check_direct_reads(self, bell: SharedFile) -> None:
        """On a shared filesystem we must read past this node's cache: if O_DIRECT is
        refused, no mode can work here, and we say so before anyone waits."""
        try:
            bell.reading_fd(self._data.direct)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise TunnelError(
                errno.EINVAL, f"tunnel directory {self.tunnel_dir} is on {self._data.describe()}, which refuses "
                f"O_DIRECT reads; without them this node cannot see another node's writes: use a directory "
                f"on NFS, Lustre, GPFS or BeeGFS, or on a local disk if both sides run on this machine") from None

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
                _quietly(peer.bye, Reason.CLEAN, 0, self._data.sync)
        for pending in list(self._connects.values()):
            self._abandon_connect(pending, lost)
        for link in list(self._links.values()):
            if tell_peers:
                self._reset_output(link, "")
            link.conn.end_output()
            self._end_input(link)
            self.to_loop(link.conn.transport.deliver_lost, lost)
            self._forget(link)
        for peer in list(self._peers.values()):
            self._drop_peer(peer)
        _quietly(self._release_pointer, tell_peers)
        self._close_bell()

    def _close_bell(self) -> None:
        """Remove our bell, then every claim of a slot in it: also those of peers whose
        slot we have not read yet (a peer that met us a moment ago)."""
        if self._bell is not None:
            TABLE.unlink(Path(self._bell.path))
            try:
                claims = tunneldir.slot_claims(self.tunnel_dir, self.eid)
            except OSError:  # the directory is gone or unreadable: the claims we know of
                claims = [tunneldir.slot_claim_path(self.tunnel_dir, self.eid, index) for index in self._slots]
            for claim in claims:
                TABLE.unlink(claim)
            _quietly(self._bell.drop_alive)
            TABLE.release(self._bell)
            self._bell = None

    def _watch_dir(self, now: float) -> None:
        """Every DIR_CHECK_INTERVAL, check the directory again: UnsafeTunnelDirError if its
        owner or mode changed (the endpoint stops); if it was deleted, everything in it
        is lost: end our connections and make it again (retried while that fails).
        A server also checks that the pointer still names it."""
        if self._bell is not None:
            if now < self._next_dir_check:
                return
            self._next_dir_check = now + DIR_CHECK_INTERVAL
            try:
                tunneldir.verify(self.tunnel_dir, self._dir_id)
                self._check_pointer_ours()
                return
            except TunnelDirLostError as exc:
                log.error("%s: %d connection(s) lost; making it again (mode 700)", exc, len(self._links))
                self._serve = self._pointer is not None
                self._end_all(PeerLostError(str(exc)), tell_peers=False)
        self._open(again=True)
        log.warning("tunnel directory %s made again; connections work again", self.tunnel_dir)

    # --- server pointer ---------------------------------------------------------------------
    def _claim_pointer(self) -> None:
        shared = TABLE.open(pointer.path_in(self.tunnel_dir), create=True)
        try:
            if not shared.try_hold_alive():
                self._take_over(shared)
            else:
                self._challenge_remote_server(shared)
            pointer.write(shared, self.eid, self._view, self._data.sync)
        except BaseException:
            shared.drop_alive()
            TABLE.release(shared)
            raise
        self._pointer = shared
        self._had_work = True

    def _take_over(self, shared: SharedFile) -> None:
        """The pointer's lock is held: its server runs. Step it down (force) or refuse."""
        info = pointer.parse(shared.read()) or {}
        who = pointer.describe(info)
        self._refuse_or_step_down(info)
        deadline = time.monotonic() + STEPDOWN_WAIT
        while not shared.try_hold_alive():
            if time.monotonic() > deadline:
                raise ServerAlreadyRunningError(
                    f"the running server ({who}) in {self.tunnel_dir} did not step down within {STEPDOWN_WAIT:g} s")
            time.sleep(0.05)

    def _challenge_remote_server(self, shared: SharedFile) -> None:
        """The pointer's lock was free. That proves its server dead only where its lock
        excludes ours; elsewhere, knock on its bell and wait for an answer."""
        info = pointer.parse(shared.read())
        eid = pointer.server_eid(info)
        if eid is None or eid == self.eid or self._leftovers.owner_dead(tunneldir.bell_path(self.tunnel_dir, eid)):
            return
        try:
            peer = self._peer(eid)
        except FileNotFoundError:  # its bell is gone: so is it
            return
        who = pointer.describe(info)
        peer.announced = True  # not a peer of ours: only asked whether it runs
        log.debug("tunnel directory %s: the server pointer names %s, whose lock is free, which here does not "
                  "prove it exited: asking it (up to %g s)", self.tunnel_dir, who, self.opts.connect_timeout)
        deadline = time.monotonic() + self.opts.connect_timeout
        while time.monotonic() < deadline:
            self._poll_bell()
            if any(slot.eid == eid for slot in self._slots.values()):
                break
            time.sleep(0.05)
        else:
            log.info("tunnel directory %s: %s did not answer: taking over", self.tunnel_dir, who)
            self._drop_peer(peer)
            return
        self._refuse_or_step_down(info)

    def _refuse_or_step_down(self, info: dict) -> None:
        """A server runs: refuse to start, or (force) ask it to step down."""
        who = pointer.describe(info)
        if not self._force:
            raise ServerAlreadyRunningError(
                f"another process ({who}) already serves tunnel directory {self.tunnel_dir}: "
                f"stop it, or pass --force (force=True) to make it step down")
        log.warning("tunnel directory %s: asking the running server (%s) to step down", self.tunnel_dir, who)
        eid = pointer.server_eid(info)
        if eid is None:
            return
        try:
            peer = self._peer(eid)
        except FileNotFoundError:
            return
        peer.slot.flags |= Flag.STEPDOWN
        _quietly(peer.tell, self._data.sync)

    def _check_pointer_ours(self) -> None:
        """A server whose pointer names another (taken over while we were stalled, or
        on a filesystem whose locks do not exclude) steps down."""
        if self._pointer is None:
            return
        try:
            info = pointer.parse(self._pointer.read())
        except OSError:
            return
        eid = pointer.server_eid(info)
        if eid is not None and eid != self.eid:
            self._step_down(pointer.describe(info))

    def _step_down(self, description: str) -> None:
        log.warning("tunnel directory %s: stepping down for a new server (%s)", self.tunnel_dir, description)
        self._release_pointer(clear=False)
        if self._on_stepdown is not None:
            self.to_loop(self._on_stepdown, description)

    def _release_pointer(self, clear: bool) -> None:
        if self._pointer is None:
            return
        if clear and not self.silent:
            info = pointer.parse(self._pointer.read())
            if pointer.server_eid(info) == self.eid:
                _quietly(self._pointer.replace, b"", self._data.sync)
        self._pointer.drop_alive()
        TABLE.release(self._pointer)
        self._pointer = None

    # --- connecting (client) ------------------------------------------------------------
    def _begin_connect(self) -> PendingConnect:
        self.raise_failure()
        self._verify_dir()
        pending = PendingConnect(self._new_link(), time.monotonic() + self.opts.connect_timeout)
        self._connects[pending.link.conn.cid] = pending
        self._had_work = True
        return pending

    def _new_link(self, conn: Optional[Conn] = None) -> Link:
        """A new connection's two files, created by us (the client) and empty; for `conn`
        (which gets the new id) or a new one."""
        self._next_cid += 1
        cid = f"{self.eid}-{self._next_cid}"
        to_server, to_client = tunneldir.chunk_paths(self.tunnel_dir, cid)
        out_fd = open_file(to_server, "create")
        try:
            close_file(open_file(to_client, "create"), str(to_client))
            in_fd = open_file(to_client, "read", self._data.direct)
        except BaseException:
            close_file(out_fd, str(to_server))
            TABLE.unlink(to_server)
            TABLE.unlink(to_client)
            raise
        return self._link(cid, OutStream(to_server, out_fd, self._data, self.opts.segment_bytes),
                          InStream(to_client, in_fd, self._data), conn)

    def _link(self, cid: str, out: OutStream, into: InStream, conn: Optional[Conn] = None) -> Link:
        if conn is None:
            conn = Conn(cid, self.wake, {"tunnel_dir": str(self.tunnel_dir)})
        conn.name(cid)
        link = Link(conn, out, into)
        self._links[cid] = link
        return link

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
            self._abandon_connect(pending, self._no_server(pending))
            return
        if now < pending.next_check:
            return
        pending.next_check = now + POINTER_RECHECK
        try:
            info = pointer.read(self.tunnel_dir)
        except ProtocolError as exc:
            self._abandon_connect(pending, exc)
            return
        eid = pointer.server_eid(info)
        if eid is None or eid == pending.sent_to or eid == self.eid or eid in self._gone:
            return  # (a server we saw die is not asked again: the pointer will name its successor)
        if pending.offered:  # another server had it: it may answer too, so this one gets a new id
            self._renew(pending)
        try:
            peer = self._peer(eid)
            peer.slot.conns = max(peer.slot.conns, _number(pending.link.conn.cid))
            peer.tell(self._data.sync)
        except FileNotFoundError:  # its bell is gone: wait for the pointer to name another
            return
        except UnsafeTunnelDirError:
            raise
        except OSError as exc:  # e.g. ENOSPC: this connection fails, the next may work
            self._abandon_connect(pending, TunnelError(
                exc.errno, f"cannot ask the server in {self.tunnel_dir} for a connection: {exc.strerror or exc}"))
            return
        pending.sent_to, pending.offered = eid, True
        pending.silent_server = pointer.describe(info)

    def _no_server(self, pending: PendingConnect) -> NoServerError:
        refusal = f" (last answer: {pending.refusal})" if pending.refusal else ""
        silent = ""
        if pending.silent_server and not pending.refusal:
            silent = (f"; the server named in {pointer.path_in(self.tunnel_dir)} ({pending.silent_server}) did not "
                      f"answer: it has exited, or its writes do not reach this node (run `fileforward doctor` "
                      f"on both nodes)")
        return NoServerError(
            f"no {self.peer_name} answered in tunnel directory {self.tunnel_dir} within "
            f"{self.opts.connect_timeout:g} s{refusal}{silent}{self._full()}. Start the far end first, e.g. "
            f"`fileforward --client --port PORT --tunnel_dir {self.tunnel_dir}` on the node that runs "
            f"the service (or `python -m rpc serve MODULE:FUNCTIONS --tunnel_dir {self.tunnel_dir}` for RPC)")

    def _full(self) -> str:
        """Why a server may not have been able to answer: its disk is ours."""
        with contextlib.suppress(OSError):
            if os.statvfs(self.tunnel_dir).f_bavail == 0:
                return (f"; the filesystem of {self.tunnel_dir} is full ({os.strerror(errno.ENOSPC)}): "
                        f"the server cannot write its answer")
        return ""

    def _renew(self, pending: PendingConnect) -> None:
        """Give a waiting connection a new id and new files (its old ones are removed)."""
        old = pending.link
        del self._connects[old.conn.cid]
        del self._links[old.conn.cid]
        old.remove()
        link = self._new_link(old.conn)
        pending.link = link
        self._connects[link.conn.cid] = pending

    def _on_answer(self, pending: PendingConnect, kind: Kind, text: str) -> None:
        if kind is Kind.REFUSE:
            pending.refusal, pending.sent_to = text, None
            return
        link = pending.link
        del self._connects[link.conn.cid]
        peer = self._peers.get(text)
        if peer is None:
            self._abandon_connect(pending, PeerLostError("the server vanished while accepting"))
            return
        link.conn.peer = peer.eid
        peer.conns.add(link.conn.cid)
        try:
            pending.future.set_result(link.conn.transport)
        except concurrent.futures.InvalidStateError:  # cancelled: the application stopped waiting
            self._fail(link, ConnectionAbortedError("the connecting side stopped waiting"), tell_peer=True, why="")

    def _abandon_connect(self, pending: PendingConnect, exc: BaseException) -> None:
        link = pending.link
        self._connects.pop(link.conn.cid, None)
        self._reset_output(link, "")  # in case the server accepted just now
        self._discard(link)
        if not pending.future.done():
            pending.future.set_exception(exc)

    def _discard(self, link: Link) -> None:
        """Forget a connection no server took up, with its files."""
        link.conn.in_done = True
        link.conn.end_output()
        self._forget(link)
        link.remove()

    # --- accepting (server) -------------------------------------------------------------
    def _on_connect(self, sender: str, cid: str) -> None:
        if not (_CID_RE.match(cid) and cid.startswith(sender + "-")) or cid in self._links:
            return
        to_server, to_client = tunneldir.chunk_paths(self.tunnel_dir, cid)
        if self._pointer is None:
            self._refuse(to_client, "the server is not accepting connections")
            return
        try:
            self._verify_dir()  # UnsafeTunnelDirError stops the endpoint before anything is opened
        except TunnelDirLostError:
            return
        fds: List[int] = []
        try:
            fds.append(open_file(to_server, "read", self._data.direct))
            fds.append(open_file(to_client, "write"))
        except OSError as exc:
            for fd in fds:
                close_file(fd, cid)
            if isinstance(exc, UnsafeTunnelDirError):
                raise
            if isinstance(exc, FileNotFoundError):
                log.debug("ignoring connection %s: its files or its client are gone", cid)
                return
            if cid != self._last_refused:
                self._last_refused = cid
                log.warning("tunnel directory %s: cannot accept connection %s: %s", self.tunnel_dir, cid, exc)
            self._refuse(to_client, f"the server cannot accept it: {exc}")
            return
        in_fd, out_fd = fds
        link = self._link(cid, OutStream(to_client, out_fd, self._data, self.opts.segment_bytes),
                          InStream(to_server, in_fd, self._data))
        link.conn.peer = sender
        self._peers[sender].conns.add(cid)
        link.conn.last_write = time.monotonic()
        try:
            link.out.write(link.out.frame(Kind.ACCEPT, self.eid.encode()))
        except OSError as exc:
            self._fail_loudly(link, _describe_gone(exc, "accepting"), tell_peer=False)
            return
        self._ring(link)
        if self._on_accept is not None:
            self.to_loop(self._on_accept, link.conn.transport)

    def _refuse(self, to_client: Path, reason: str) -> None:
        """Answer a connection we will not take (its client then waits for another server)."""
        def write() -> None:
            fd = open_file(to_client, "write")
            try:
                write_at(fd, [encode(Kind.REFUSE, reason.encode())], 0, self._data.sync)
            finally:
                close_file(fd, str(to_client))
        _quietly(write)

    # --- writing ------------------------------------------------------------------------
    def _write_due(self, link: Link) -> bool:
        """Whether a write is due: data or an end record, or telling the writer of the
        other direction how far we have read (window/4 behind, or a segment finished)."""
        conn = link.conn
        if conn.out_done:
            return False
        if conn.has_output():
            return True
        ack = link.ack_position()
        return not conn.in_done and ack > link.into.acked and (
            link.ack_soon or ack - link.into.acked >= self.opts.window // 4)

    def _flush(self, link: Link) -> bool:
        conn, out = link.conn, link.out
        eof_before = conn.eof_written
        try:
            out.rotate_if_full()
        except OSError as exc:
            self._fail_loudly(link, _describe_gone(exc, "writing"), tell_peer=False)
            return True
        parts: List[bytes] = []
        ack = link.ack_position()
        if not conn.in_done and ack > link.into.acked:
            parts += out.frame(Kind.ACK, encode_position(ack))
            link.into.acked, link.ack_soon = ack, False
        parts += conn.build_batch(max(0, self.opts.window - out.unacked()), self.opts.chunk, out.frame)
        if conn.resume_writer:  # only then wake the loop: not once per flush
            conn.resume_writer = False
            self.to_loop(conn.transport.writer_drained)
        if not parts:  # the window is full: the reader's ACK will come
            return False
        started = time.monotonic()
        try:
            out.write(parts)
        except OSError as exc:
            self._fail_loudly(link, _describe_gone(exc, "writing"), tell_peer=False)
            return True
        # Timed after the append returned, against when the previous one began: the
        # bounds the wake-up protocol needs (ARCHITECTURE.md), whatever delayed this append.
        if (conn.out_done or conn.eof_written != eof_before
                or time.monotonic() - conn.last_write > self.opts.wake_after_idle):
            self._ring(link)
        conn.last_write = started
        if conn.lost_after_write:
            conn.lost_after_write = False
            self.to_loop(conn.transport.deliver_lost, None)
        if conn.reset_reason is not None and conn.out_done:  # our RESET is out: read no more
            self._end_input(link)
        return True

    def _ring(self, link: Link) -> None:
        peer = self._peers.get(link.conn.peer) if link.conn.peer else None
        if peer is None or self.silent:
            return
        peer.slot.ring += 1
        try:
            peer.tell(self._data.sync)
        except OSError as exc:
            self._peer_lost(peer, f"its bell file is gone ({exc.strerror})")

    # --- reading ------------------------------------------------------------------------
    def _poll_bell(self) -> bool:
        """Read our bell; True if it brought activity (not just pings)."""
        assert self._bell is not None
        started = time.monotonic()
        raw = self._buffer.read(self._bell.reading_fd(self._data.direct), 0, look_size(self._slots))
        self._next_bell_look = started + 2 * (time.monotonic() - started)
        looked, self._bell_looked = self._bell_looked, started
        activity = False
        for index, slot in list(read_peers(raw)):  # all decoded first: meeting a peer reuses the buffer
            if slot is None:
                self._unreadable_slot(index, started)
                continue
            self._damaged_slots.pop(index, None)
            before = self._slots.get(index)
            if slot == before or slot.eid == self.eid:
                continue
            self._slots[index] = slot
            activity |= self._on_slot(index, slot, before if before is not None and before.eid == slot.eid else None,
                                      looked)
        return activity

    def _unreadable_slot(self, index: int, now: float) -> None:
        """A slot being rewritten is read again at the next look; one that stays
        unreadable is damage: logged once, and ignored (the other slots are not)."""
        since = self._damaged_slots.setdefault(index, now)
        if since is not None and now - since > DAMAGE_GRACE:
            self._damaged_slots[index] = None
            log.warning("tunnel directory %s: ignoring slot %d of our bell file, damaged for %g s "
                        "(the other slots are read as usual)", self.tunnel_dir, index, DAMAGE_GRACE)

    def _on_slot(self, index: int, slot: PeerSlot, before: Optional[PeerSlot], looked: float) -> bool:
        """Act on what a peer's slot says now (`before`: what it said at our last look),
        written after `looked` (our previous look began). True if it is more than a ping."""
        peer = self._peers.get(slot.eid)
        if slot.flags & Flag.STEPDOWN and not (before and before.flags & Flag.STEPDOWN):
            if self._pointer is not None:
                self._step_down(peer.who if peer is not None and peer.who else slot.eid)
            return True
        if slot.flags & Flag.BYE:
            TABLE.unlink(tunneldir.slot_claim_path(self.tunnel_dir, self.eid, index))
            if peer is not None and not (before and before.flags & Flag.BYE):
                self._on_bye(peer, slot)
            return True
        if peer is None:
            try:
                peer = self._peer(slot.eid)
            except (FileNotFoundError, ValueError):  # gone already
                return False
            peer.handled_conns = slot.base
        if not peer.announced:  # its first sign of life
            peer.announced = True
            log.info("tunnel directory %s: %s appeared; coherence %s (%s); %s", self.tunnel_dir,
                     self._describe(peer), peer.mode, peer.why_mode, self._data.describe())
        if before is None or slot.ping > before.ping:
            peer.pings_seen = max(peer.pings_seen, slot.ping)
            peer.last_seen = max(peer.last_seen, looked)
        if before is not None and slot.ring != before.ring:
            now = time.monotonic()
            for cid in peer.conns:
                link = self._links.get(cid)
                if link is not None:
                    link.conn.hot, link.conn.last_seen = True, now
        for number in range(max(peer.handled_conns, slot.base) + 1, slot.conns + 1):
            self._on_connect(slot.eid, f"{slot.eid}-{number}")
        peer.handled_conns = max(peer.handled_conns, slot.conns)
        return before is None or (slot.ring, slot.conns) != (before.ring, before.conns)

    def _on_bye(self, peer: Peer, slot: PeerSlot) -> None:
        """A peer left, or gave up on us after our ping `slot.bye_ping`. A give-up that
        saw none of our pings since we (re)met it crossed our own giving up and is for
        the earlier meeting: the connections made since are not its business."""
        if slot.reason is Reason.CLEAN:
            self._peer_lost(peer, "")
        elif slot.bye_ping <= peer.met_after_ping:
            log.debug("tunnel directory %s: ignoring a BYE from %s meant for an earlier meeting",
                      self.tunnel_dir, self._describe(peer))
        else:
            self._peer_lost(peer, "it gave up on this side: it saw no sign of life from this side for the "
                                  "liveness timeout (was this process stopped, or its filesystem hung?)")

    def _poll_in(self, link: Link, started: float) -> bool:
        """Read a connection's in file. `started`: when this cycle began, before the look."""
        conn = link.conn
        polled = time.monotonic()
        try:
            records, moved = link.into.read(self._buffer, self._buffer.size)
        except ProtocolError as exc:
            self._fail_loudly(link, ProtocolError(f"damaged record: {exc}"), tell_peer=True)
            return True
        except OSError as exc:
            self._fail_loudly(link, _describe_gone(exc, "reading"), tell_peer=True)
            return True
        done = time.monotonic()
        conn.in_next = done + 2 * (done - polled)  # leave the file server twice as long as the look took
        looked, conn.looked = conn.looked, polled
        if not records:
            if (started - conn.last_seen > self.opts.cool_after and conn.cid not in self._connects
                    and not link.into.unsettled):
                conn.hot = False
            return False
        conn.last_seen = done
        link.ack_soon |= moved
        peer = self._peers.get(conn.peer) if conn.peer else None
        if peer is not None:
            peer.last_seen = max(peer.last_seen, looked)
        try:
            self._on_records(link, records)
        except ProtocolError as exc:
            self._fail_loudly(link, ProtocolError(f"damaged record: {exc}"), tell_peer=True)
        return True

    def _on_records(self, link: Link, records: List[Record]) -> None:
        conn = link.conn
        payloads: List[bytes] = []
        for kind, payload in records:
            if kind is Kind.DATA and not conn.in_eof:
                payloads.append(bytes(payload))  # out of the read buffer, which the next read reuses
                continue
            if kind is Kind.ACK:
                link.out.acked = max(link.out.acked, decode_position(payload))
                continue
            if kind is Kind.NEXT:
                continue
            if payloads:
                self._hand_data(link, payloads)
                payloads = []
            if kind is Kind.EOF and not conn.in_eof:
                conn.in_eof = True
                self.to_loop(conn.transport.deliver_eof)
            elif kind is Kind.CLOSE:
                if not conn.in_eof:
                    conn.in_eof = True
                    self.to_loop(conn.transport.deliver_eof)
                self._end_input(link, last_read=True)
                conn.peer_closed()
            elif kind is Kind.RESET:
                self._on_reset(link, bytes(payload).decode("utf-8", "replace"))
                return
            elif kind in (Kind.ACCEPT, Kind.REFUSE) and conn.cid in self._connects:
                self._on_answer(self._connects[conn.cid], kind, bytes(payload).decode("utf-8", "replace"))
            else:
                raise ProtocolError(f"unexpected {kind.name} record")
        if payloads:
            self._hand_data(link, payloads)

    def _hand_data(self, link: Link, payloads: List[bytes]) -> None:
        link.handed = link.into.pos
        self.to_loop(link.conn.transport.deliver_data, payloads, link.handed)

    # --- ending connections -------------------------------------------------------------
    def _on_reset(self, link: Link, why: str) -> None:
        """The peer reset the connection, and reads our direction no more: remove our
        files (nobody else will), and tell the application why."""
        peer = self._peers.get(link.conn.peer) if link.conn.peer else None
        by = self._describe(peer) if peer is not None else f"the {self.peer_name}"
        if why:  # a failure the peer explains (a plain abort has no reason)
            log.warning("tunnel directory %s: %s reset connection %s: %s", self.tunnel_dir, by, link.conn.cid, why)
        self._end_input(link, last_read=True)  # a RESET is its writer's last record: no next segment
        self._fail(link, PeerLostError(f"connection reset by the other side ({by})" + (f": {why}" if why else "")),
                   tell_peer=False)
        self._remove_output(link)

    def _end_input(self, link: Link, last_read: bool = False) -> None:
        """No more records will be read from the in file: remove it. Unless we read the
        writer's `last_read` record, its next segment may exist too (or appear until
        our RESET reaches it: then the writer removes it, see _on_reset)."""
        if not link.conn.in_done:
            link.conn.in_done = True
            link.into.close()
            for path in [link.into.path] if last_read else link.into.paths():
                TABLE.unlink(path)

    def _remove_output(self, link: Link) -> None:
        """Remove every segment we wrote: the reader has stopped reading, or is gone."""
        for path in link.out.paths():
            TABLE.unlink(path)

    def _fail(self, link: Link, exc: BaseException, tell_peer: bool, why: Optional[str] = None) -> None:
        """End a connection with an error for the application; with `tell_peer`, a
        RESET tells the peer `why` (default: the error)."""
        if tell_peer and self._reset_output(link, str(exc) if why is None else why):
            self._ring(link)
        link.conn.end_output()  # no more writes either way
        self._end_input(link)
        pending = self._connects.get(link.conn.cid)
        if pending is not None:
            self._abandon_connect(pending, exc)
        else:
            self.to_loop(link.conn.transport.deliver_lost, exc)

    def _fail_loudly(self, link: Link, exc: BaseException, tell_peer: bool) -> None:
        """_fail for a cause the user must hear of (a damaged file, a full disk...):
        logged at WARNING on this side, where the broken connection shows up."""
        log.warning("tunnel directory %s: connection %s broken: %s", self.tunnel_dir, link.conn.cid, exc)
        self._fail(link, exc, tell_peer)

    def _reset_output(self, link: Link, reason: str) -> bool:
        """End our direction with a RESET record for the peer; False if it was over already."""
        if not link.conn.end_output() or self.silent:
            return False
        _quietly(link.out.write, link.out.frame(Kind.RESET, reason.encode("utf-8", "replace")))
        return True

    def _forget(self, link: Link) -> None:
        if self._links.pop(link.conn.cid, None) is None:
            return
        peer = self._peers.get(link.conn.peer) if link.conn.peer else None
        if peer is not None:
            peer.conns.discard(link.conn.cid)
        link.close()

    # --- peers and liveness -------------------------------------------------------------
    def _peer(self, eid: str) -> Peer:
        peer = self._peers.get(eid)
        if peer is None:
            if not pointer.EID_RE.match(eid):
                raise ValueError(f"bad endpoint id {eid!r}")
            base = min((_number(cid) for cid, p in self._connects.items() if not p.offered),
                       default=self._next_cid + 1) - 1  # it may take up our connections after this one
            slot = PeerSlot(self.eid, base=base, conns=base, ping=self._pings + 1)
            peer = meet(self.tunnel_dir, eid, slot, self._pings, self._buffer, self._data.direct,
                        self.opts.coherence, self._view)
            self._pings += 1  # that first ping of the meeting is already in our slot
            self._peers[eid] = peer
            self._gone.discard(eid)
            peer.last_ping = time.monotonic()
            peer.tell(self._data.sync)
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
            info = pointer.read(self.tunnel_dir)
        except ProtocolError:  # a connection attempt reports it
            return
        eid = pointer.server_eid(info)
        if eid is None or eid in self._gone or self._leftovers.owner_dead(tunneldir.bell_path(self.tunnel_dir, eid)):
            return
        try:
            self._peer(eid)  # our slot introduces us; its slot in our bell introduces it
        except FileNotFoundError:
            pass

    def _keep_peers(self, now: float) -> None:
        for peer in list(self._peers.values()):
            if now - peer.last_seen > self.opts.liveness_timeout:
                self._peer_lost(peer, f"no sign of life for {self.opts.liveness_timeout:g} s (it crashed, "
                                      f"was stopped, or the shared filesystem stopped answering)", tell=True)
            elif peer.locks_trusted and now >= peer.next_death_check and (
                    peer.conns or any(p.sent_to == peer.eid for p in self._connects.values())):
                peer.next_death_check = now + DEATH_CHECK
                if peer.bell.alive_elsewhere() is False:
                    self._peer_lost(peer, "its process ended (it no longer holds its lock)", ended=True)
            if self._peers.get(peer.eid) is peer and now - peer.last_ping >= peer.ping_interval(self.opts.ping_interval):
                peer.last_ping = now
                self._pings += 1
                peer.slot.ping = self._pings
                try:
                    peer.tell(self._data.sync)
                except OSError as exc:
                    self._peer_lost(peer, f"its bell file is gone ({exc.strerror})")

    def _peer_lost(self, peer: Peer, why: str, tell: bool = False, ended: bool = False) -> None:
        """The peer left (`why` empty) or is gone: end its connections and clear
        the files it cannot. With `tell`, a BYE tells it that we gave up on it, so
        that it ends its side of them too, should it come back. A peer that left or
        whose process `ended` is not asked again, even if the pointer still names it;
        one that is only silent (stalled) is."""
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
        if tell:  # with its last ping we saw: see _on_bye
            _quietly(peer.bye, Reason.NO_LIFE, peer.pings_seen, self._data.sync)
        for cid in list(peer.conns):
            link = self._links.get(cid)
            if link is None:
                continue
            self._fail(link, error, tell_peer=False)
            self._remove_output(link)
            self._forget(link)
        for index, slot in self._slots.items():
            if slot.eid == peer.eid:
                TABLE.unlink(tunneldir.slot_claim_path(self.tunnel_dir, self.eid, index))
        if ended or not why:
            self._gone.add(peer.eid)
        self._drop_peer(peer)
        bell = tunneldir.bell_path(self.tunnel_dir, peer.eid)
        if self._leftovers.owner_dead(bell, peer.locks_trusted):
            TABLE.unlink(bell)


def _run_all(batch: List[Tuple[Callable[..., None], Tuple[object, ...]]]) -> None:
    """On the loop: run what one I/O cycle handed over, in order. A callback that
    raises is reported as the loop reports any callback's error; the others still run."""
    for callback, args in batch:
        try:
            callback(*args)
        except Exception as exc:  # noqa: BLE001 - the loop's handler logs it, as for call_soon
            asyncio.get_running_loop().call_exception_handler(
                {"message": f"Exception in callback {callback!r}", "exception": exc})


def _number(cid: str) -> int:
    """The connection number in a connection id."""
    return int(cid.rsplit("-", 1)[1])


def _quietly(function: Callable[..., object], *args: object) -> None:
    """Best effort, for messages to a peer that may already be gone (a tampered
    directory is not ignored: UnsafeTunnelDirError goes on)."""
    try:
        function(*args)
    except UnsafeTunnelDirError:
        raise
    except OSError as exc:
        log.debug("ignored while ending: %s", exc)
