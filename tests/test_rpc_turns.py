"""The server's reading threads on TCP and Unix sockets (the sync driver, rpc/sync.py):
the thread that reads a plain function's call runs it, while another one reads on."""
import fcntl
import struct
import termios
import threading
import time

import pytest

import rpc
from rpc import auth, frames, sync
from rpc.frames import Kind
from rpc.server import WORKER_THREAD_PREFIX
from rpc_helpers import RawConnection, ServerThread
from tests.polling import wait_until

pytestmark = [pytest.mark.usefixtures("rpc_env"), pytest.mark.timeout(60)]


def connection_threads():
    """The server's per-connection reading threads (named after their peer)."""
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX + " ")]


class Gate:
    """Plain functions that block until released or cancelled, and count how many
    run at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.cancelled = []

    def hold(self, name, seconds=10.0):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if rpc.current_call().wait(seconds):
                self.cancelled.append(name)
            return name
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_running_call_does_not_hold_up_the_connection(sock, transport):
    gate = Gate()
    srv = ServerThread({"hold": gate.hold, "echo": lambda x: x},
                       **({"unix": sock} if transport == "unix" else {"tcp": 0}))
    address = ({"unix": sock} if transport == "unix"
               else {"tcp": srv.server.addresses[0][len("tcp://"):]})
    try:
        with rpc.connect(**address) as client:
            held = client.submit("hold", "first")
            wait_until(lambda: gate.running == 1, what="the first call to start")
            started = time.monotonic()
            assert client.call("echo", "next") == "next"
            assert time.monotonic() - started < 5
            held.cancel()  # read by another thread while the first one is busy
            wait_until(lambda: gate.cancelled == ["first"], what="the cancellation")
            wait_until(lambda: srv.stats()["in_flight"] == 0, what="the call to end")
    finally:
        srv.stop()


def test_no_more_than_workers_plain_functions_run_at_once(sock):
    gate = Gate()
    srv = ServerThread({"hold": gate.hold}, unix=sock, workers=2)
    try:
        with rpc.connect(unix=sock) as one, rpc.connect(unix=sock) as two:
            futures = [c.submit("hold", i, 0.2) for i in range(3) for c in (one, two)]
            assert sorted(f.result(30) for f in futures) == [0, 0, 1, 1, 2, 2]
        assert gate.most == 2
    finally:
        srv.stop()


def test_threads_of_a_burst_leave_when_idle_and_all_leave_with_the_client(sock, monkeypatch):
    monkeypatch.setattr(sync, "IDLE_THREAD_LIFETIME", 0.2)
    gate = Gate()
    srv = ServerThread({"hold": gate.hold}, unix=sock, workers=8)
    try:
        with rpc.connect(unix=sock) as client:
            futures = [client.submit("hold", i, 0.3) for i in range(20)]
            assert [f.result(30) for f in futures] == list(range(20))
            assert gate.most == 8  # the worker slots bound the threads running calls
            assert len(connection_threads()) <= 8 + 2
            wait_until(lambda: len(connection_threads()) == 1,
                       what="idle threads to leave but one")
            assert client.call("hold", "again", 0) == "again"
        wait_until(lambda: not connection_threads(), what="the threads to leave with the client")
    finally:
        srv.stop()


def test_a_call_sent_with_the_authentication_is_not_lost(sock, rpc_env):
    srv = ServerThread({"echo": lambda x: x}, unix=sock)
    try:
        raw = RawConnection(sock)
        head, args = frames.encode_call("echo", ("pipelined",), {})
        raw.authenticate(auth.load_key(), then=frames.encode_frame(Kind.CALL, 1, head + args))
        reply = raw.recv()
        assert (reply.kind, reply.request_id) == (Kind.RESULT, 1)
        assert frames.loads(reply.payload) == "pipelined"
        raw.close()
    finally:
        srv.stop()


def test_a_refused_frame_after_a_call_in_one_packet_leaks_no_worker_slot(sock, rpc_env):
    srv = ServerThread({"echo": lambda x: x}, unix=sock, workers=1)
    try:
        raw = RawConnection(sock)
        raw.authenticate(auth.load_key())
        head, args = frames.encode_call("echo", ("lost",), {})
        call = frames.encode_frame(Kind.CALL, 1, head + args)
        raw.sock.sendall(call + call)  # the same request id twice: refused
        assert raw.closed_by_peer()
        raw.close()
        wait_until(lambda: srv.stats()["in_flight"] == 0, what="the call to be dropped")
        with rpc.connect(unix=sock, timeout=10) as client:  # needs the one worker slot
            assert [client.call("echo", i) for i in range(3)] == [0, 1, 2]
    finally:
        srv.stop()


@pytest.mark.parametrize("transport", ["tcp", "tunnel"])  # tunnel: the same books, kept by the asyncio side
def test_mixed_calls_and_cancellations_from_many_threads_leave_the_books_clean(transport, tmp_path):
    gate = Gate()

    async def aecho(x):
        return x

    def count(n):
        yield from range(n)

    listen = {"tcp": 0} if transport == "tcp" else {"tunnel_dir": tmp_path / "t"}
    srv = ServerThread({"hold": gate.hold, "echo": lambda x: x, "aecho": aecho,
                        "count": count}, workers=2, **listen)
    address = ({"tcp": srv.server.addresses[0][len("tcp://"):]} if transport == "tcp"
               else listen)
    errors = []
    try:
        with rpc.connect(**address) as shared, rpc.connect(**address) as other:
            def caller(client, seed):
                try:
                    for i in range(60):
                        step = (seed + i) % 4
                        if step == 0:
                            assert client.call("echo", (seed, i)) == (seed, i)
                        elif step == 1:
                            assert client.call("aecho", i) == i
                        elif step == 2:
                            assert list(client.call("count", 5)) == list(range(5))
                        else:  # a call the client gives up on: cancelled on the server
                            with pytest.raises(TimeoutError):
                                client.proxy("hold", timeout=0.01)(f"{seed}-{i}", 5)
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=caller, args=(c, n))
                       for n, c in enumerate([shared] * 6 + [other] * 2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(50)
            assert not errors, errors
            assert not any(thread.is_alive() for thread in threads)
            wait_until(lambda: srv.stats()["in_flight"] == 0 and gate.running == 0,
                       what="every call to end")
            gate.most = 0  # both worker slots are free again: two calls run side by side
            held = [shared.submit("hold", n, 0.5) for n in range(2)]
            wait_until(lambda: gate.most == 2, what="both slots to be used")
            assert sorted(f.result(10) for f in held) == [0, 1]
    finally:
        srv.stop()


def unread_bytes(sock):
    """How many bytes wait in ``sock``'s receive buffer."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def test_clients_that_stop_reading_hold_up_their_own_connections_only(sock, rpc_env):
    # What the loop sends on a socket (an async generator's items) is written by a
    # thread; ten clients that stop reading a stream block ten such writes, and a
    # coroutine call on another connection is still answered.
    async def chunks():
        while True:
            yield b"x" * (1 << 20)

    async def aecho(x):
        return x

    srv = ServerThread({"chunks": chunks, "aecho": aecho}, unix=sock)
    stalled = []
    try:
        for _ in range(10):
            raw = RawConnection(sock)
            raw.authenticate(auth.load_key())
            head, args = frames.encode_call("chunks", (), {})
            raw.send(Kind.CALL, 1, head + args)
            assert raw.recv().kind is Kind.RESULT  # the stream begins
            raw.send(Kind.CREDIT, 1, frames.encode_credit(1000))
            stalled.append(raw)
        for raw in stalled:  # the server has filled what the socket holds
            wait_until(lambda: unread_bytes(raw.sock) >= 1 << 17, what="the socket to fill")
        with rpc.connect(unix=sock, timeout=20) as client:
            assert client.call("aecho", "still answered") == "still answered"
    finally:
        for raw in stalled:
            raw.close()
        srv.stop()
