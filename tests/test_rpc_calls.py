"""Calls through a real server (in this process, on its own loop thread) over real sockets."""
import asyncio
import concurrent.futures as cf
import threading
import time

import pytest

import rpc
from rpc_funcs import BadInit, CustomError
from rpc_helpers import (ServerThread, client, rpc_env, server, sock, sock_dir,  # noqa: F401
                         wait_until)


def test_cancelled_is_false_outside_of_a_cancelled_call(sock):
    srv = ServerThread({"flag": rpc.cancelled}, unix=sock)
    try:
        with rpc.connect(unix=sock) as c:
            assert c.call("flag") is False
        assert rpc.cancelled() is False and rpc.current_call() is None
    finally:
        srv.stop()


def test_plain_coroutine_and_keyword_calls(client):
    assert client.call("echo", b"x") == b"x"
    assert client.call("add", 1, b=2) == 3
    assert client.call("aecho", {"a": [1]}) == {"a": [1]}
    assert client.proxy("add")(40, 2) == 42


def test_tcp_binds_localhost_by_default():
    from rpc_funcs import FUNCTIONS
    srv = ServerThread(FUNCTIONS, tcp=0)
    try:
        [address] = srv.server.addresses
        assert address.startswith("tcp://127.0.0.1:")
        with rpc.connect(tcp=address[len("tcp://"):]) as c:
            assert c.call("echo", "over tcp") == "over tcp"
    finally:
        srv.stop()


def test_unix_socket_is_private(server, sock):
    assert sock.stat().st_mode & 0o777 == 0o600


def test_closing_the_server_drops_clients_and_the_socket(server, client, sock):
    async def close():
        server.server.close()

    assert server.server.is_serving()
    server.run(close())
    assert not server.server.is_serving()
    with pytest.raises(rpc.ConnectionLost):
        client.call("aecho", 1, delay=5)
    assert not sock.exists()


def test_functions_can_be_closures_and_lambdas_travel(sock):
    srv = ServerThread({"apply": lambda f, x: f(x)}, unix=sock)
    try:
        with rpc.connect(unix=sock) as c:
            assert c.call("apply", lambda x: x * 2, 21) == 42
    finally:
        srv.stop()


def test_exception_keeps_type_message_and_remote_traceback(client):
    with pytest.raises(ValueError, match="^bad thing$") as info:
        client.call("boom")
    assert "in boom" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, rpc.RemoteTraceback)
    with pytest.raises(CustomError, match="custom message"):
        client.call("custom")


def test_exception_that_cannot_cross_becomes_runtime_error(client):
    with pytest.raises(RuntimeError, match="^Server-side ValueError: locked$") as info:
        client.call("raise_unpicklable")
    assert "raise_unpicklable" in info.value.remote_traceback
    with pytest.raises(RuntimeError, match=r"^Server-side rpc_funcs\.BadInit: cannot rebuild$"):
        client.call("raise_bad_init")
    assert not issubclass(BadInit, RuntimeError)


def test_unknown_function_lists_the_available_ones(client):
    with pytest.raises(rpc.FunctionNotFoundError, match="available: .*echo"):
        client.call("nope")


def test_unpicklable_result_keeps_the_connection(client):
    with pytest.raises(rpc.RemoteSerializationError, match="unpicklable_result"):
        client.call("unpicklable_result")
    assert client.call("echo", 1) == 1


def test_unpicklable_arguments_fail_before_sending(client, server):
    served = server.stats()["calls_served"]
    with pytest.raises(rpc.SerializationError, match="arguments of echo"):
        client.call("echo", threading.Lock())
    assert client.call("echo", 2) == 2
    assert server.stats()["calls_served"] == served + 1


def test_frame_limits_give_clear_errors_and_keep_the_connection(sock):
    from rpc_funcs import FUNCTIONS
    srv = ServerThread(FUNCTIONS, unix=sock, max_frame=10_000)
    try:
        with rpc.connect(unix=sock, max_frame=5_000) as c:
            with pytest.raises(rpc.ProtocolError, match="frame limit of 10000"):
                c.call("echo", b"x" * 20_000)
            with pytest.raises(rpc.ProtocolError, match="frame limit of 5000"):
                c.call("add", b"x" * 4_000, b"y" * 4_000)
            assert c.call("echo", b"ok") == b"ok"
    finally:
        srv.stop()


def test_many_concurrent_calls_on_one_connection(client):
    futures = [client.submit("aecho", i, delay=(i % 7) / 1000) for i in range(500)]
    futures += [client.submit("add", i, 1) for i in range(500)]
    assert [f.result(30) for f in futures] == list(range(500)) + list(range(1, 501))


def test_threads_share_one_client(client):
    def work(t):
        return all(client.call("echo", (t, i)) == (t, i) for i in range(200))
    with cf.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


def test_threads_sending_large_and_small_frames_never_interleave(client):
    # Over a socket each calling thread writes its own frames, and the server's
    # workers write their replies: a 3 MiB frame must go out whole while other
    # threads send and receive small and 60 KiB ones (partial writes).
    def work(t):
        arg = bytes([t]) * ((3 << 20, 60 << 10, 10)[t % 3])
        return all(client.call("echo", arg) == arg for _ in range(5))
    with cf.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(work, range(6), timeout=60))


def test_replies_reach_futures_and_streams_whoever_reads_the_socket(client):
    # Over a socket a blocking call's thread reads the socket itself; replies for
    # submitted futures and stream items must arrive while it does, and after.
    slow = [client.submit("aecho", i, delay=0.2) for i in range(5)]
    items = client.call("count", 3)
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            assert client.call("echo", b"x") == b"x"
    with cf.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(caller) for _ in range(2)]
        assert [f.result(10) for f in slow] == list(range(5))
        assert list(items) == [0, 1, 2]
        stop.set()
        for f in busy:
            f.result(10)
    assert client.submit("aecho", "after", delay=0.1).result(2) == "after"  # no poll lag


def test_info_reports_the_server(client, server):
    client.call("echo", 1)
    info = client.info()
    assert info["alive"] and info["pid"] == __import__("os").getpid()
    assert info["functions"]["count"]["kind"] == "generator"
    assert info["functions"]["add"]["signature"] == "(a, b=0)"
    assert info["calls_served"] >= 1 and info["in_flight"] == 0
    assert info["versions"]["protocol"] == rpc.PROTOCOL_VERSION
    assert info["uptime_s"] >= 0 and info["hostname"]


def test_status_of_running_and_absent_servers(server, sock, sock_dir):
    info = rpc.status(unix=sock)
    for key in ("alive", "pid", "hostname", "functions", "calls_served", "in_flight",
                "uptime_s", "versions"):
        assert key in info
    assert info["alive"] is True
    absent = rpc.status(unix=sock_dir / "none", connect_timeout=0.2)
    assert absent["alive"] is False and "no RPC server" in absent["error"]


# ---------------------------------------------------------------- streaming

def test_generator_streams_10000_items(client):
    assert list(client.call("count", 10_000)) == list(range(10_000))
    assert list(client.call("acount", 10_000)) == list(range(10_000))


def test_stream_error_and_unpicklable_item(client):
    stream = client.call("fail_after", 3)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CustomError, match="failed after 3"):
        next(stream)
    stream = client.call("unpicklable_item")
    assert next(stream) == 1
    with pytest.raises(rpc.RemoteSerializationError):
        next(stream)
    assert client.call("echo", "still usable") == "still usable"


def test_items_arrive_while_the_generator_runs(sock):
    gate = threading.Event()

    def tokens():
        yield "a"
        assert gate.wait(10)
        yield "b"

    srv = ServerThread({"tokens": tokens}, unix=sock)
    try:
        with rpc.connect(unix=sock) as c:
            stream = c.call("tokens")
            assert next(stream) == "a"  # arrives although the generator is blocked
            gate.set()
            assert list(stream) == ["b"]
    finally:
        srv.stop()


def test_stream_flow_control_bounds_the_server(sock):
    produced, window = [], 4
    overflow = threading.Event()

    def many():
        for i in range(10_000):
            produced.append(i)
            if len(produced) > window + 8 + 2:  # window + thread lookahead + in hand
                overflow.set()
            yield i

    srv = ServerThread({"many": many}, unix=sock)
    try:
        with rpc.connect(unix=sock, stream_window=window) as c:
            stream = c.call("many")
            assert next(stream) == 0
            wait_until(lambda: len(produced) >= window, what="the first window")
            assert not overflow.wait(0.3)  # a negative check: bounded, not a sync
            assert sum(stream) == sum(range(1, 10_000))
    finally:
        srv.stop()


def test_abandoned_stream_is_cancelled_on_the_server(sock):
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    srv = ServerThread({"endless": endless}, unix=sock)
    try:
        with rpc.connect(unix=sock) as c:
            stream = c.call("endless")
            assert next(stream) == 0
            stream.close()
            assert closed.wait(10)
            wait_until(lambda: srv.stats()["in_flight"] == 0, what="no call in flight")
    finally:
        srv.stop()


# ---------------------------------------------------------------- timeouts, cancellation

def _observed_server(sock):
    """A server whose functions report when they see their cancellation."""
    seen = {"thread": threading.Event(), "coro": threading.Event(),
            "polled": threading.Event(), "started": threading.Event()}

    def blocking():
        seen["started"].set()
        if rpc.current_call().wait(30):
            seen["thread"].set()

    async def waiting():
        seen["started"].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["coro"].set()
            raise

    def polling():
        seen["started"].set()
        deadline = time.monotonic() + 30
        while not rpc.cancelled() and time.monotonic() < deadline:
            time.sleep(0.005)  # a served function doing its work in small steps
        if rpc.cancelled():
            seen["polled"].set()

    functions = {"blocking": blocking, "waiting": waiting, "polling": polling}
    return ServerThread(functions, unix=sock), seen


@pytest.mark.parametrize("name, side", [("blocking", "thread"), ("waiting", "coro"),
                                        ("polling", "polled")])
def test_timeout_raises_builtin_timeout_error_and_cancels_remotely(sock, name, side):
    srv, seen = _observed_server(sock)
    try:
        with rpc.connect(unix=sock) as c:
            with pytest.raises(TimeoutError, match="did not return within 0.2 s"):
                c.proxy(name, timeout=0.2)()
            assert seen[side].wait(10)
            wait_until(lambda: srv.stats()["in_flight"] == 0, what="no call in flight")
    finally:
        srv.stop()


def test_future_cancel_raises_cancelled_error_and_cancels_remotely(sock):
    srv, seen = _observed_server(sock)
    try:
        with rpc.connect(unix=sock) as c:
            future = c.submit("blocking")
            assert seen["started"].wait(10)
            assert future.cancel()
            with pytest.raises(cf.CancelledError):
                future.result()
            assert seen["thread"].wait(10)
            assert not c.closed and c.info()["alive"]
    finally:
        srv.stop()


def test_cancelling_an_acall_task_cancels_remotely(sock):
    srv, seen = _observed_server(sock)

    async def main(c):
        task = asyncio.ensure_future(c.acall("waiting"))
        await asyncio.get_running_loop().run_in_executor(None, seen["started"].wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        with rpc.connect(unix=sock) as c:
            asyncio.run(main(c))
            assert seen["coro"].wait(10)
    finally:
        srv.stop()


def test_timeout_of_a_streamed_item(sock):
    gate = threading.Event()

    def slow_stream():
        yield 1
        gate.wait(30)
        yield 2

    srv = ServerThread({"slow_stream": slow_stream}, unix=sock)
    try:
        with rpc.connect(unix=sock, timeout=0.2) as c:
            stream = c.call("slow_stream")
            assert next(stream) == 1
            with pytest.raises(TimeoutError, match="no streamed item arrived within 0.2 s"):
                next(stream)
    finally:
        gate.set()
        srv.stop()


# ---------------------------------------------------------------- event loops

def test_blocking_api_inside_a_running_event_loop(server, sock):
    async def notebook_cell():
        asyncio.get_running_loop()  # as in Jupyter: a loop runs in this very thread
        with rpc.connect(unix=sock) as c:
            direct = c.call("add", 1, 2)
        lazy = rpc.proxy("echo", unix=sock)
        try:
            return direct, lazy("from a loop"), list(rpc.proxy("count", unix=sock)(3))
        finally:
            lazy.close()

    assert asyncio.run(notebook_cell()) == (3, "from a loop", [0, 1, 2])


def test_acall_and_async_streams(client):
    async def main():
        results = await asyncio.gather(*(client.acall("aecho", i) for i in range(50)))
        items = [i async for i in await client.acall("acount", 100)]
        return results, items

    assert asyncio.run(main()) == (list(range(50)), list(range(100)))


def test_module_level_proxy_connects_lazily(server, sock):
    echo = rpc.proxy("echo", unix=sock, timeout=5)
    try:
        assert server.stats()["connections"] == 0
        assert echo("hi") == "hi"
        assert server.stats()["connections"] == 1
    finally:
        echo.close()
