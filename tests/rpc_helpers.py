"""Helpers for the RPC tests: servers in a thread or in a subprocess, raw handshakes."""
import asyncio
import concurrent.futures as cf
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rpc
from rpc import auth, frames, protocol
from rpc.frames import Kind
from tests.polling import wait_until

TESTS = Path(__file__).resolve().parent
FUNCS_SPEC = f"{TESTS / 'rpc_funcs.py'}:FUNCTIONS"


class ServerThread:
    """An RPC server on an event loop in a background thread of the test process."""

    def __init__(self, functions, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(rpc.start_server(functions, **kwargs))

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self):
        return self.run(_info(self.server))

    def stop(self):
        async def close():
            self.server.close()
            await self.server.wait_closed()
        self.run(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _info(server):
    return server.info()


class CliServer:
    """`python -m rpc serve` in a subprocess; waits until it says where it serves.

    ``prefix`` is the argv prefix that runs it on another node (tests/conftest.py Node);
    ``popen`` goes to subprocess.Popen (env, preexec_fn).
    """

    def __init__(self, *transport_args, spec=FUNCS_SPEC, extra=(), prefix=(), **popen):
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "rpc", "serve", spec, *transport_args, *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
        self.log = []
        self.address = None
        self._serving = threading.Event()
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        if not self._serving.wait(30):  # a silent, hung server must not block the test
            self.proc.kill()
            raise AssertionError("server did not start within 30 s:\n" + "".join(self.log))
        if self.address is None:
            raise AssertionError("server did not start:\n" + "".join(self.log))

    def _read_log(self):
        for line in self.proc.stderr:  # the server logs "serving N functions on ADDR"
            self.log.append(line)
            match = self.address is None and re.search(r"serving \d+ functions on (\S+)", line)
            if match:
                self.address = match.group(1)
                self._serving.set()
        self._serving.set()  # the server exited before serving

    @property
    def tcp(self):
        return self.address[len("tcp://"):]

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drain.join(5)
        return "".join(self.log)


#: The transports every deep RPC suite runs over (tests/rpc_fixtures.py `transport`).
TRANSPORTS = ("unix", "tcp", "tunnel", "command")


class Served:
    """The test functions (rpc_funcs.py) served over one transport.

    unix, tcp, tunnel: a server on a loop thread of this process, or with
    ``process=True`` `python -m rpc serve` in a subprocess (to be stopped or
    killed). command: every connection starts its own `python -m rpc serve --stdio`
    and talks over its stdin/stdout. Tests observe the server through calls
    (``events``, ``pid``, ``Client.info``), which answer alike on every transport.
    ``server_kwargs``: rpc.start_server keywords, given as `serve` flags to a subprocess.
    """

    def __init__(self, kind, sock, tunnel_dir, process=False, **server_kwargs):
        self.kind = kind
        self.thread = self.process = None
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in server_kwargs.items()]
        listen = {"unix": {"unix": str(sock)}, "tcp": {"tcp": "127.0.0.1:0"},
                  "tunnel": {"tunnel_dir": str(tunnel_dir)}}.get(kind)
        if kind == "command":
            auth.load_key(create=True)  # as on a cluster: the key exists in the shared home
            self.address = {"command": [sys.executable, "-m", "rpc", "serve", FUNCS_SPEC,
                                        "--stdio", *flags]}
        elif process:
            [(name, value)] = listen.items()
            self.process = CliServer(f"--{name.replace('_', '-')}", value, extra=flags)
            self.address = {"tcp": self.process.tcp} if kind == "tcp" else listen
        else:
            from rpc_funcs import FUNCTIONS
            self.thread = ServerThread(FUNCTIONS, **listen, **server_kwargs)
            self.address = ({"tcp": self.thread.server.addresses[0][len("tcp://"):]}
                            if kind == "tcp" else listen)

    def connect(self, **kwargs):
        """rpc.connect to this server (``kwargs``: its client keywords)."""
        return rpc.connect(**self.address, **kwargs)

    def stop(self):
        if self.thread is not None:
            self.thread.stop()
        if self.process is not None:
            self.process.stop()


def run_json(args, timeout=60, prefix=(), **kwargs):
    """Run a Python command that prints one JSON document; return (code, parsed, stderr).

    ``prefix`` is the argv prefix that runs it on another node (tests/conftest.py Node).
    """
    proc = subprocess.run([*prefix, sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else None), \
        proc.stderr


def client_sigkill_cancels(address, liveness_timeout=15.0, client_address=None, prefix=()):
    """A client process killed mid-call: the server cancels the call and drops it.

    The server runs in this process on ``address``; the client process connects to
    ``client_address`` (default: the same), started under the argv ``prefix`` (to run
    it on another node, which sees a shared tunnel directory under another path).
    """
    client_address = address if client_address is None else client_address
    started, cancelled = threading.Event(), threading.Event()

    def blocking():
        started.set()
        if rpc.current_call().wait(60):
            cancelled.set()

    srv = ServerThread({"blocking": blocking}, liveness_timeout=liveness_timeout, **address)
    client = subprocess.Popen([*prefix, sys.executable, "-c", (
        f"import rpc; rpc.connect(**{client_address!r}, liveness_timeout={liveness_timeout}, "
        f"connect_timeout=30)"
        f".call('blocking')")])
    try:
        assert started.wait(30)
        client.kill()
        client.wait(10)
        assert cancelled.wait(liveness_timeout + 10)
        wait_until(lambda: srv.stats()["in_flight"] == 0 and srv.stats()["connections"] == 0,
                   what="server to drop the dead client")
    finally:
        client.kill()
        srv.stop()


def sigkill_and_restart(start_server, record, log, pending, within=15.0):
    """Kill the server with calls in flight through the lazy proxy ``record``.

    Every pending call must raise ConnectionLost within ``within`` seconds. A call
    made after that, while no server runs, goes to the server started next, through
    the same proxy (give it a ``connect_timeout`` long enough for a server to start);
    and no call ran twice (``log`` counts runs).
    """
    srv = start_server()
    try:
        with cf.ThreadPoolExecutor(pending + 1) as pool:
            calls = [pool.submit(record, str(log), True) for _ in range(pending)]
            wait_until(lambda: log.exists() and log.read_text().count("called") == pending,
                       what="the calls to run")
            srv.kill()
            killed = time.monotonic()
            for future in calls:
                with pytest.raises(rpc.ConnectionLost):
                    future.result(timeout=within + 10)
            assert time.monotonic() - killed < within
            srv.stop()
            after_the_death = pool.submit(record, str(log), False)
            srv = start_server()
            assert after_the_death.result(timeout=60) == "recorded"
        assert log.read_text().count("called") == pending + 1
        assert record(str(log), False) == "recorded"
        assert log.read_text().count("called") == pending + 2
    finally:
        record.close()
        srv.stop()


class FrameStream:
    """A hand-written peer's frames over asyncio streams (for fake servers), through
    the wire codec; its handshake through the protocol core."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.decoder = frames.FrameDecoder(frames.DEFAULT_MAX_FRAME)
        self.frames = []

    async def recv(self):
        """The next frame; ConnectionLost at EOF."""
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                raise rpc.ConnectionLost("the peer closed the stream")
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def send(self, kind, rid=0, payload=b""):
        self.writer.write(frames.encode_frame(kind, rid, payload))

    async def drain(self):
        await self.writer.drain()

    async def server_handshake(self, key):
        """Authenticate the client as a real server does (one frame read at a time,
        so that nothing after the handshake is taken from the stream)."""
        core = protocol.ServerProtocol(key)
        while core.state is protocol.State.HANDSHAKE:
            frame = await self.recv()
            core.receive_data(frames.encode_frame(frame.kind, frame.request_id,
                                                  frame.payload, frame.flags))
            for data in core.data_to_send():
                self.writer.write(data)
        await self.drain()

    async def aclose(self):
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (OSError, asyncio.TimeoutError):
            pass


class RawConnection:
    """A blocking socket speaking frames by hand, through the sans-I/O core."""

    def __init__(self, address):
        """``address``: a Unix socket path, or a TCP (host, port)."""
        tcp = isinstance(address, tuple)
        self.sock = socket.socket(socket.AF_INET if tcp else socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(address if tcp else str(address))
        self.decoder = frames.FrameDecoder(frames.DEFAULT_MAX_FRAME)
        self.frames = []

    def send(self, kind, rid=0, payload=b""):
        self.sock.sendall(frames.encode_frame(kind, rid, payload))

    def recv(self):
        """The next frame, or None at EOF."""
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def closed_by_peer(self):
        """True if the server closes the connection (after any frames it sends)."""
        try:
            while True:
                if self.recv() is None:
                    return True
        except ConnectionResetError:
            return True

    def hello(self, proto=frames.PROTOCOL_VERSION, versions=None):
        nonce = auth.new_nonce()
        body = {"proto": proto, "nonce": nonce, "max_frame": frames.DEFAULT_MAX_FRAME,
                "versions": versions or protocol.versions(), "hostname": "raw"}
        payload = frames.encode_json(body)
        self.sock.sendall(frames.HEADER.pack(len(payload), proto, Kind.HELLO, 0, 0) + payload)
        return nonce

    def authenticate(self, key, versions=None, then=b""):
        """Complete the client side of the handshake by hand; ``then``: bytes sent in
        the same packet as the AUTH frame, before the server has accepted us."""
        nonce_c = self.hello(versions=versions)
        server_hello = frames.decode_json(self.recv().payload)
        self.sock.sendall(frames.encode_frame(Kind.AUTH, 0, frames.encode_json(
            {"mac": auth.answer(key, "client", nonce_c, server_hello["nonce"])})) + then)
        reply = self.recv()
        assert reply.kind is Kind.AUTH_OK, reply

    def close(self):
        self.sock.close()
