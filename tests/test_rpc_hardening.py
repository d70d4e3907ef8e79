"""Failures found by an adversarial run of the RPC layer (issue "Hardening"), one test each.

Each test is named after its finding; each failed before its fix.
"""
import asyncio
import concurrent.futures as cf
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import rpc
from rpc import auth, frames
from rpc.frames import Kind
from rpc_helpers import FrameStream, RawConnection, ServerThread
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")


def echo(x):
    return x


FUNCTIONS = {"echo": echo}


@pytest.fixture
def thread_crashes(monkeypatch):
    """Exceptions that escaped a thread of this process during the test."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    return crashes


@pytest.fixture
def rpc_log(caplog):
    caplog.set_level(logging.INFO, logger="rpc")
    return caplog


def logged(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---------------------------------------------------------------- a server in a subprocess

SERVER_SCRIPT = """
import asyncio, ctypes, logging, os, resource, sys
import rpc
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

def hold_gil(seconds):
    return ctypes.PyDLL(None).sleep(seconds)  # a C call that keeps the GIL (PyDLL: not released)

async def main():
    server = await rpc.start_server({"echo": lambda x: x, "pid": os.getpid,
                                     "hold_gil": hold_gil}, **eval(sys.argv[2]))
    print(server.addresses[0].partition("tcp://")[2], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


class ServerProcess:
    """An RPC server in a subprocess, with a descriptor limit and start_server keywords."""

    def __init__(self, fd_limit=0, **kwargs):
        kwargs = kwargs or {"tcp": "127.0.0.1:0"}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(fd_limit),
                                      repr(kwargs)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        started = self.proc.stdout.readline()
        assert started, self.stop()
        self.tcp = started.strip()  # empty for other transports

    def descriptors(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        """Stop it; returns its log."""
        self.proc.terminate()
        try:
            return self.proc.communicate(timeout=10)[1]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[1]


# ---------------------------------------------------------------- finding 8

# Not over "command": there each connection starts a server of its own, so no other
# client shares the stalled one's server.
@pytest.mark.parametrize("transport", ["unix", "tcp", "tunnel"])
def test_finding8_stalled_streams_hold_no_worker(served):
    """More streams than workers (4), each with a client that stopped reading it:
    plain calls, large and small, and new streams, from another client still run."""
    with served.connect(timeout=20) as stalled, served.connect(timeout=20) as other:
        streams = [stalled.call("count", 10**9) for _ in range(6)]
        assert [next(stream) for stream in streams] == [0] * 6  # then never read again
        wait_until(lambda: other.info()["in_flight"] == 6, what="the streams to be served")
        for _ in range(3):
            assert other.call("echo", "small") == "small"
            large = b"x" * (1 << 20)  # not run by a reading thread (over TCP)
            assert other.call("echo", large) == large
            assert list(other.call("count", 3)) == [0, 1, 2]
        for stream in streams:
            stream.close()
        wait_until(lambda: other.info()["in_flight"] == 0, what="the streams to be cancelled")


# ---------------------------------------------------------------- finding 9

def test_finding9_unprintable_exception_is_answered(remote, thread_crashes):
    """(thread_crashes sees the server's threads only where it runs in this process.)"""
    for _ in range(3):  # more than once: the connection and its threads survive
        with pytest.raises(RuntimeError) as info:
            remote.call("raise_unprintable")
        assert str(info.value) == "Server-side rpc_funcs.Unprintable: <unprintable>"
        assert "raise_unprintable" in info.value.remote_traceback
    assert remote.call("echo", "still answering") == "still answering"
    wait_until(lambda: remote.info()["in_flight"] == 0, what="in_flight back to 0")
    assert remote.info()["calls_served"] == 4
    assert not thread_crashes


# ---------------------------------------------------------------- finding 10

def test_finding10_call_blocked_sending_to_a_stopped_server_raises_connection_lost():
    server = ServerProcess()
    try:
        with rpc.connect(tcp=server.tcp, liveness_timeout=2) as c:
            assert c.call("echo", 1) == 1
            server.proc.send_signal(signal.SIGSTOP)
            with cf.ThreadPoolExecutor(1) as pool:
                # far more than the socket buffers hold: sendall blocks for good
                call = pool.submit(c.call, "echo", b"x" * (64 << 20))
                try:
                    with pytest.raises(rpc.ConnectionLost):
                        call.result(timeout=30)
                finally:
                    server.proc.send_signal(signal.SIGCONT)
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


# ---------------------------------------------------------------- finding 11

class LoopThread:
    """An event loop in a daemon thread, for hand-written servers."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.run(_cancel_other_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _cancel_other_tasks():
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


SLOW_PIECE = 1 << 16


async def slow_but_alive(reader, writer):
    """A server that takes its time: it reads a call's argument, and writes its result,
    a piece at a time, and never answers a PING (it is busy with the transfer)."""
    channel = FrameStream(reader, writer)
    try:
        await channel.server_handshake(auth.load_key())
        length, _, _, _, request_id = frames.HEADER.unpack(await reader.readexactly(16))
        while length:
            length -= len(await reader.read(min(length, 8 * SLOW_PIECE)))
            await asyncio.sleep(0.05)
        result = frames.dumps(b"r" * (40 * SLOW_PIECE))
        writer.write(frames.encode_header(Kind.RESULT, request_id, len(result)))
        for start in range(0, len(result), SLOW_PIECE):
            writer.write(result[start:start + SLOW_PIECE])
            await writer.drain()
            await asyncio.sleep(0.1)
        await reader.read()  # until the client closes
    finally:
        await channel.aclose()


def test_finding11_a_function_holding_the_gil_cuts_off_no_client(tmp_path):
    """Served with the default liveness timeout, a function holds the GIL for 20 s
    (longer than the former default of 15 s): its caller and an idle client of the
    tunnel both carry on."""
    tunnel = str(tmp_path / "rpc-tunnel")
    server = ServerProcess(tunnel_dir=tunnel)
    try:
        with rpc.connect(tunnel_dir=tunnel) as caller, rpc.connect(tunnel_dir=tunnel) as idle:
            assert idle.call("echo", 1) == 1
            assert caller.call("hold_gil", 20) == 0
            assert idle.call("echo", 2) == 2
            assert caller.call("echo", 3) == 3
    finally:
        server.stop()


@pytest.mark.parametrize("transport", ["tcp", "tunnel"])
def test_finding11_bytes_of_a_large_transfer_count_as_life(tmp_path, transport):
    """About 5 s to take a 48 MiB argument, then 4 s to send a 2.5 MiB result, with a
    liveness timeout of 2 s: the server is slow, not dead.

    (Small buffers: once the client has sent all, the server must take the rest of
    the argument within the timeout, as it answers no PING until then.)"""
    auth.load_key(create=True)
    loop = LoopThread()
    try:
        if transport == "tcp":
            listening = socket.socket()
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            listening.bind(("127.0.0.1", 0))
            listener = loop.run(asyncio.start_server(slow_but_alive, sock=listening,
                                                          limit=1 << 20))
            address = {"tcp": "127.0.0.1:%d" % listening.getsockname()[1]}
        else:
            import fileforward
            listener = loop.run(fileforward.start_server(slow_but_alive, tmp_path / "t",
                                                         liveness_timeout=2))
            address = {"tunnel_dir": str(tmp_path / "t")}
        with rpc.connect(**address, liveness_timeout=2) as c:
            started = time.monotonic()
            assert c.call("echo", b"a" * (768 * SLOW_PIECE)) == b"r" * (40 * SLOW_PIECE)
            assert time.monotonic() - started > 4  # the transfer did outlast the timeout
        listener.close()
        loop.run(listener.wait_closed())
    finally:
        loop.stop()


# ---------------------------------------------------------------- finding 12

def closed_by_peer(conn):
    """Whether the peer has closed ``conn`` (which never receives data); never blocks."""
    conn.setblocking(False)
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False


def idle_connections(tcp, count):
    """``count`` TCP connections to ``tcp`` that never say anything."""
    host, port = tcp.rsplit(":", 1)
    return [socket.create_connection((host, int(port)), timeout=10) for _ in range(count)]


def test_finding12_unauthenticated_connections_cost_one_descriptor():
    server = ServerProcess()
    idle = []
    try:
        before = server.descriptors()
        idle = idle_connections(server.tcp, 40)
        with rpc.connect(tcp=server.tcp) as c:  # accepted after all of them
            assert c.call("echo", 1) == 1
            growth = server.descriptors() - before
        # 40 idle sockets, plus the client's (socket, its duplicate, an epoll)
        assert growth <= 40 + 3 + 2, growth
    finally:
        for conn in idle:
            conn.close()
        server.stop()


def test_finding12_pending_handshakes_are_capped():
    server = ServerProcess(tcp="127.0.0.1:0", max_pending_handshakes=16)
    idle = []
    try:
        before = server.descriptors()
        idle = idle_connections(server.tcp, 100)
        with rpc.connect(tcp=server.tcp, connect_timeout=10) as c:
            assert c.call("echo", 1) == 1
            # the dropped ones are closed by the server's loop soon after: allow it that
            wait_until(lambda: server.descriptors() - before <= 16 + 3 + 2, 10,
                       what="the server to hold at most 16 pending handshakes' descriptors",
                       seen=lambda: f"{server.descriptors() - before} more descriptors than before")
        wait_until(lambda: sum(map(closed_by_peer, idle)) >= 100 - 16, 10,
                   what="the server to close all but the 16 newest pending handshakes",
                   seen=lambda: f"{sum(map(closed_by_peer, idle))} closed")
    finally:
        for conn in idle:
            conn.close()
        log = server.stop()
    assert "more than 16 handshakes were pending" in log, log
    assert log.count("dropped unauthenticated") <= 2, log  # counted, not one per connection


def test_finding12_accept_errors_are_logged_counted():
    server = ServerProcess(fd_limit=40)
    idle = []
    try:
        idle = idle_connections(server.tcp, 80)  # the backlog holds what is not accepted
        time.sleep(4)  # not a synchronisation: the window in which failures are counted
        # (asyncio retries accept() once a second)
    finally:
        for conn in idle:
            conn.close()
        log = server.stop()
    lines = [line for line in log.splitlines() if "Too many open files" in line]
    assert len(lines) == 1, log
    assert "accepting connections on tcp://" in lines[0] and "time" in lines[0], lines[0]
    assert "Traceback" not in log, log


# ---------------------------------------------------------------- finding 14

@pytest.mark.parametrize("hello, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "malformed handshake"),
    ({"versions": ["not", "a", "dict"]}, "bad versions"),
], ids=["deeply-nested-json", "versions-not-a-dict"])
def test_finding14_malformed_hello_gets_a_reject(sock, rpc_log, hello, reason):
    srv = ServerThread(FUNCTIONS, unix=sock)
    try:
        raw = RawConnection(sock)
        if isinstance(hello, dict):
            body = {"proto": frames.PROTOCOL_VERSION, "nonce": auth.new_nonce(),
                    "max_frame": 1 << 20, "hostname": "raw", **hello}
            hello = frames.encode_json(body)
        raw.send(Kind.HELLO, 0, hello[:frames.HANDSHAKE_MAX_FRAME])
        received = []
        while True:
            frame = raw.recv()
            if frame is None:
                break
            received.append(frame)
        assert received and received[-1].kind is Kind.REJECT, received
        assert reason in frames.decode_json(received[-1].payload)["reason"]
        raw.close()
        wait_until(lambda: logged(rpc_log, "rejected connection"), what="the log line")
        assert not logged(rpc_log, "Unhandled exception")
        assert not [r for r in rpc_log.records if r.exc_info], "a traceback was logged"
        with rpc.connect(unix=sock) as c:
            assert c.call("echo", 1) == 1
    finally:
        srv.stop()


def test_finding14_handshake_timeout_is_logged_with_its_reason(sock, rpc_log):
    srv = ServerThread(FUNCTIONS, unix=sock)
    srv.server.handshake_timeout = 0.5
    try:
        raw = RawConnection(sock)  # connects, then says nothing
        wait_until(lambda: logged(rpc_log, "rejected connection"), what="the log line")
        [line] = logged(rpc_log, "rejected connection")
        assert "no handshake within 0.5 s" in line, line
        raw.close()
    finally:
        srv.stop()


def test_finding14_oversized_result_gets_an_error_that_fits(served):
    with served.connect(max_frame=256, timeout=20) as c:
        with pytest.raises((rpc.ProtocolError, RuntimeError), match="frame limit"):
            c.call("echo", "x" * 10_000)
        assert c.call("echo", "small") == "small"
    if served.thread is not None:  # (over command, the server left with its one client)
        wait_until(lambda: served.thread.stats()["in_flight"] == 0, what="in_flight back to 0")


def test_finding14_proxy_reconnects_over_tcp_after_a_clean_restart():
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % port.getsockname()[1]
    port.close()
    pid = rpc.proxy("pid", tcp=address, timeout=20)
    server = ServerProcess(tcp=address)
    try:
        assert pid() == server.proc.pid
        server.stop()  # SIGTERM: the server closes its connections cleanly
        server = ServerProcess(tcp=address)
        assert pid() == server.proc.pid  # the first call after the restart
    finally:
        pid.close()
        server.stop()


def test_finding14_a_failed_write_is_logged_as_a_warning(sock, rpc_log):
    srv = ServerThread(FUNCTIONS, unix=sock)
    try:
        raw = RawConnection(sock)
        raw.authenticate(auth.load_key())
        head, args = frames.encode_call("echo", (b"x" * (32 << 20),), {})
        raw.send(Kind.CALL, 1, head + args)
        raw.sock.recv(16)  # the result has started: leave in the middle of it
        raw.close()
        wait_until(lambda: logged(rpc_log, "writing to"), what="the log line")
        [record] = [r for r in rpc_log.records if "writing to" in r.getMessage()]
        assert record.levelno == logging.WARNING and "failed" in record.getMessage()
    finally:
        srv.stop()
