"""Calls through a real server over every transport (unix, tcp, tunnel, command).

The deep cases (errors, streams and their credit, timeouts, cancellation, `acall`,
threads, large frames) take the ``remote`` or ``served`` fixture, and so run over
each transport (tests/rpc_fixtures.py); the server is observed through calls, which
answer alike whether it runs in this process or is a `--stdio` subprocess.
"""
import asyncio
import concurrent.futures as cf
import os
import socket
import threading
import time
import uuid

import pytest

import rpc
from rpc_funcs import BadInit, CustomError
from rpc_helpers import ServerThread
from tests.polling import async_wait_until, wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")


def new_tag():
    """A name for one call, to ask the server about it (rpc_funcs.events)."""
    return uuid.uuid4().hex


def wait_for_event(client, tag, event):
    wait_until(lambda: event in client.call("events", tag), 15, what=f"the call to be {event}")


def wait_none_in_flight(client):
    wait_until(lambda: client.info()["in_flight"] == 0, 15, what="no call in flight")


def test_cancelled_is_false_outside_of_a_cancelled_call(sock):
    srv = ServerThread({"flag": rpc.cancelled}, unix=sock)
    try:
        with rpc.connect(unix=sock) as c:
            assert c.call("flag") is False
        assert rpc.cancelled() is False and rpc.current_call() is None
    finally:
        srv.stop()


def test_plain_coroutine_and_keyword_calls(remote):
    assert remote.call("echo", b"x") == b"x"
    assert remote.call("add", 1, b=2) == 3
    assert remote.call("aecho", {"a": [1]}) == {"a": [1]}
    assert remote.proxy("add")(40, 2) == 42


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


def test_exception_keeps_type_message_and_remote_traceback(remote):
    with pytest.raises(ValueError, match="^bad thing$") as info:
        remote.call("boom")
    assert "in boom" in info.value.remote_traceback
    assert isinstance(info.value.__cause__, rpc.RemoteTraceback)
    with pytest.raises(CustomError, match="custom message"):
        remote.call("custom")


def test_exception_that_cannot_cross_becomes_runtime_error(remote):
    with pytest.raises(RuntimeError, match="^Server-side ValueError: locked$") as info:
        remote.call("raise_unpicklable")
    assert "raise_unpicklable" in info.value.remote_traceback
    with pytest.raises(RuntimeError, match=r"^Server-side rpc_funcs\.BadInit: cannot rebuild$"):
        remote.call("raise_bad_init")
    assert not issubclass(BadInit, RuntimeError)


def test_unknown_function_lists_the_available_ones(remote):
    with pytest.raises(rpc.FunctionNotFoundError, match="available: .*echo"):
        remote.call("nope")


def test_unpicklable_result_keeps_the_connection(remote):
    with pytest.raises(rpc.RemoteSerializationError, match="unpicklable_result"):
        remote.call("unpicklable_result")
    assert remote.call("echo", 1) == 1


def test_unpicklable_arguments_fail_before_sending(remote):
    served = remote.info()["calls_served"]
    with pytest.raises(rpc.SerializationError, match="arguments of echo"):
        remote.call("echo", threading.Lock())
    assert remote.call("echo", 2) == 2
    assert remote.info()["calls_served"] == served + 1


def test_frame_limits_give_clear_errors_and_keep_the_connection(serve):
    with serve(max_frame=10_000).connect(max_frame=5_000) as c:
        with pytest.raises(rpc.ProtocolError, match="frame limit of 10000"):
            c.call("echo", b"x" * 20_000)
        with pytest.raises(rpc.ProtocolError, match="frame limit of 5000"):
            c.call("add", b"x" * 4_000, b"y" * 4_000)
        assert c.call("echo", b"ok") == b"ok"


def test_many_concurrent_calls_on_one_connection(remote):
    futures = [remote.submit("aecho", i, delay=(i % 7) / 1000) for i in range(500)]
    futures += [remote.submit("add", i, 1) for i in range(500)]
    assert [f.result(30) for f in futures] == list(range(500)) + list(range(1, 501))


def test_threads_share_one_client(remote):
    def work(t):
        return all(remote.call("echo", (t, i)) == (t, i) for i in range(200))
    with cf.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


def test_threads_sending_large_and_small_frames_never_interleave(remote):
    # Over a socket each calling thread writes its own frames, and the server's
    # workers write their replies: a 3 MiB frame must go out whole while other
    # threads send and receive small and 60 KiB ones (partial writes).
    def work(t):
        arg = bytes([t]) * ((3 << 20, 60 << 10, 10)[t % 3])
        return all(remote.call("echo", arg) == arg for _ in range(5))
    with cf.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(work, range(6), timeout=60))


def test_a_32_mib_argument_and_result_arrive_intact(remote):
    payload = os.urandom(32 << 20)
    result = remote.call("echo", payload)
    assert len(result) == len(payload) and result == payload


def test_replies_reach_futures_and_streams_whoever_reads_the_socket(remote):
    # Over a socket a blocking call's thread reads the socket itself; replies for
    # submitted futures and stream items must arrive while it does, and after.
    slow = [remote.submit("aecho", i, delay=0.2) for i in range(5)]
    items = remote.call("count", 3)
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            assert remote.call("echo", b"x") == b"x"
    with cf.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(caller) for _ in range(2)]
        assert [f.result(10) for f in slow] == list(range(5))
        assert list(items) == [0, 1, 2]
        stop.set()
        for f in busy:
            f.result(10)
    assert remote.submit("aecho", "after", delay=0.1).result(2) == "after"  # no poll lag


def test_info_reports_the_server(client, server):
    client.call("echo", 1)
    info = client.info()
    assert info["alive"] and info["pid"] == os.getpid()
    assert info["functions"]["count"]["kind"] == "generator"
    assert info["functions"]["add"]["signature"] == "(a, b=0)"
    assert info["calls_served"] >= 1 and info["in_flight"] == 0
    assert info["versions"]["protocol"] == rpc.PROTOCOL_VERSION
    assert info["uptime_s"] >= 0 and info["hostname"]


def test_status_of_running_and_absent_servers(server, client, sock, sock_dir):
    """rpc.status reports this process's server, counting the calls made so far,
    and the one still running; for no server, every value is None and the error
    names the fix."""
    from rpc_funcs import FUNCTIONS
    for i in range(3):
        assert client.call("echo", i) == i
    info = rpc.status(unix=sock)
    assert (info["alive"], info["pid"], info["hostname"]) == (True, os.getpid(),
                                                              socket.gethostname())
    assert sorted(info["functions"]) == sorted(FUNCTIONS)
    assert (info["calls_served"], info["in_flight"]) == (3, 0)  # status itself is no call
    assert info["versions"]["protocol"] == rpc.PROTOCOL_VERSION
    assert 0 <= info["uptime_s"] < 600
    tag = new_tag()
    pending = client.submit("blocking", tag)
    wait_for_event(client, tag, "started")
    assert rpc.status(unix=sock)["in_flight"] == 1
    pending.cancel()
    wait_for_event(client, tag, "cancelled")
    absent = rpc.status(unix=sock_dir / "none", connect_timeout=0.2)
    assert absent["alive"] is False
    assert all(absent[key] is None for key in ("pid", "hostname", "calls_served", "in_flight",
                                                "uptime_s", "versions")), absent
    assert f"python -m rpc serve MODULE:ATTR --unix {sock_dir / 'none'}" in absent["error"]


# ---------------------------------------------------------------- streaming

def test_generator_streams_10000_items(remote):
    assert list(remote.call("count", 10_000)) == list(range(10_000))
    assert list(remote.call("acount", 10_000)) == list(range(10_000))


def test_stream_error_and_unpicklable_item(remote):
    stream = remote.call("fail_after", 3)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CustomError, match="failed after 3"):
        next(stream)
    stream = remote.call("unpicklable_item")
    assert next(stream) == 1
    with pytest.raises(rpc.RemoteSerializationError):
        next(stream)
    assert remote.call("echo", "still usable") == "still usable"


def test_items_arrive_while_the_generator_runs(remote):
    tag = new_tag()
    stream = remote.call("gated", tag)
    assert next(stream) == "a"  # arrives although the generator is blocked
    remote.call("release", tag)
    assert list(stream) == ["b"]


def test_stream_flow_control_bounds_the_server(served):
    window, tag = 4, new_tag()
    with served.connect(stream_window=window) as c:
        stream = c.call("many", tag, 10_000)
        assert next(stream) == 0
        wait_until(lambda: c.call("produced", tag) >= window, what="the first window")
        time.sleep(0.3)  # a negative check: the window in which it could overrun
        assert c.call("produced", tag) <= window + 8 + 2  # + thread lookahead + in hand
        assert sum(stream) == sum(range(1, 10_000))
        assert c.call("produced", tag) == 10_000


def test_a_slow_server_stops_reading_a_fast_clients_calls(tmp_path, monkeypatch):
    """Reading back-pressure (asyncio driver, over the tunnel): while the one worker
    is stuck, a client that fires 24 calls of 1 MiB gets only as many read as the
    held limit (4 MiB here) allows, not all of them; released, every call returns."""
    from rpc import aio
    monkeypatch.setattr(aio, "HOLD_LIMIT", 4 << 20)
    gate = threading.Event()
    srv = ServerThread({"slow": lambda data: gate.wait(60) and len(data)}, workers=1,
                       tunnel_dir=tmp_path / "tunnel")
    try:
        with rpc.connect(tunnel_dir=tmp_path / "tunnel") as c:
            futures = [c.submit("slow", bytes([i]) * (1 << 20)) for i in range(24)]
            wait_until(lambda: srv.server.in_flight >= 4, 30, what="the held limit reached",
                       seen=lambda: f"{srv.server.in_flight} calls in flight")
            time.sleep(1.0)  # a negative check: the window in which the rest could be read
            assert srv.server.in_flight <= 8  # 4 pass the limit, + what was on its way
            gate.set()
            assert [f.result(60) for f in futures] == [1 << 20] * 24
    finally:
        gate.set()
        srv.stop()


def test_abandoned_stream_is_cancelled_on_the_server(remote):
    tag = new_tag()
    stream = remote.call("endless", tag)
    assert next(stream) == 0
    stream.close()
    wait_for_event(remote, tag, "closed")
    wait_none_in_flight(remote)


# ---------------------------------------------------------------- timeouts, cancellation

@pytest.mark.parametrize("name", ["blocking", "waiting", "polling"])
def test_timeout_raises_builtin_timeout_error_and_cancels_remotely(remote, name):
    """A plain function (waiting on its cancellation, or polling for it) and a
    coroutine, called with a 0.2 s timeout."""
    tag = new_tag()
    with pytest.raises(TimeoutError, match="did not return within 0.2 s"):
        remote.proxy(name, timeout=0.2)(tag)
    wait_for_event(remote, tag, "cancelled")
    wait_none_in_flight(remote)


def test_future_cancel_raises_cancelled_error_and_cancels_remotely(remote):
    tag = new_tag()
    future = remote.submit("blocking", tag)
    wait_for_event(remote, tag, "started")
    assert future.cancel()
    with pytest.raises(cf.CancelledError):
        future.result()
    wait_for_event(remote, tag, "cancelled")
    assert not remote.closed and remote.info()["alive"]


def test_cancelling_an_acall_task_cancels_remotely(remote):
    tag = new_tag()

    async def main():
        task = asyncio.ensure_future(remote.acall("waiting", tag))
        await async_wait_until(lambda: "started" in remote.call("events", tag), 15,
                               what="the call to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_for_event(remote, tag, "cancelled")
    wait_none_in_flight(remote)


def test_timeout_of_a_streamed_item(served):
    tag = new_tag()
    with served.connect(timeout=0.2) as c:
        stream = c.call("gated", tag)
        assert next(stream) == "a"
        with pytest.raises(TimeoutError, match="no streamed item arrived within 0.2 s"):
            next(stream)
        c.call("release", tag)  # the connection still serves calls
        wait_none_in_flight(c)


# ---------------------------------------------------------------- event loops

def test_blocking_api_inside_a_running_event_loop(served):
    async def notebook_cell():
        asyncio.get_running_loop()  # as in Jupyter: a loop runs in this very thread
        with served.connect() as c:
            direct = c.call("add", 1, 2)
        lazy = rpc.proxy("echo", **served.address)
        try:
            return direct, lazy("from a loop"), list(rpc.proxy("count", **served.address)(3))
        finally:
            lazy.close()

    assert asyncio.run(notebook_cell()) == (3, "from a loop", [0, 1, 2])


def test_acall_and_async_streams(remote):
    async def main():
        results = await asyncio.gather(*(remote.acall("aecho", i) for i in range(50)))
        items = [i async for i in await remote.acall("acount", 100)]
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
