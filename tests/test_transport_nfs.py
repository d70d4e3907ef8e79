"""Transport behaviour that needs the emulated NFS nodes of tests/nfs_harness."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import fileforward
from tests.polling import async_wait_until
from tests.test_transport import echo, run


def test_a_hung_filesystem_is_reported_and_the_loop_stays_responsive(two_nodes, caplog):
    caplog.set_level(logging.WARNING, logger="fileforward")
    tunnel_dir = two_nodes.a / "tunnel"
    daemon = two_nodes.daemons["a"]
    knobs = dict(slow_call_warning=1.0, poll_max=0.1)

    async def wait_for_log(text: str, timeout: float) -> None:
        await async_wait_until(lambda: any(text in r.getMessage() for r in caplog.records),
                               timeout, what=f"a log line with {text!r}")

    gaps = []

    async def longest_tick_gap() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - before)

    async def main():
        server = await fileforward.start_server(echo, tunnel_dir, **knobs)
        try:
            reader, writer = await fileforward.open_connection(tunnel_dir, **knobs)
            os.kill(daemon.pid, signal.SIGSTOP)  # the mount stops answering, like a hung NFS server
            try:
                writer.write(b"sent while hung")
                ticking = asyncio.ensure_future(longest_tick_gap())
                await wait_for_log("has not returned", 5.0)
                ticking.cancel()
                assert gaps and max(gaps) < 0.5  # the event loop itself never blocked
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            assert await asyncio.wait_for(reader.readexactly(15), 10) == b"sent while hung"
            await wait_for_log("answers again", 5.0)
            writer.close()
            await writer.wait_closed()
        finally:
            await server.shutdown()  # before the fixture unmounts
    run(main())


def test_a_filesystem_without_locks_works_lock_free(make_two_nodes, caplog):
    """Locks refused (ENOLCK, NFSv3 without its lock daemon): data never depended on
    them, so the tunnel works, byte-exact, and says which mode it chose and why."""
    caplog.set_level(logging.INFO, logger="fileforward")
    pair = make_two_nodes(locks_available=False)
    payload = os.urandom(3 << 20)

    async def main():
        async with await fileforward.start_server(echo, pair.a / "tunnel", liveness_timeout=4):
            reader, writer = await fileforward.open_connection(pair.b / "tunnel", liveness_timeout=4)
            writer.write(payload)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 60) == payload
            writer.close()
    run(main())
    modes = [r.getMessage() for r in caplog.records if "appeared; coherence" in r.getMessage()]
    assert len(modes) == 2 and all("coherence lock-free (the filesystem refuses locks)" in m for m in modes), modes


def test_a_mount_that_dies_fails_every_connection_and_close_returns(two_nodes):
    """Node B's mount dies (its FUSE daemon is killed: every call fails with ENOTCONN,
    as on a broken NFS client). Each of several connections must end with an error,
    not wait forever, and closing the connector must return, although closing the
    files fails too."""
    server_dir, client_dir = two_nodes.a / "tunnel", two_nodes.b / "tunnel"

    async def main():
        async with await fileforward.start_server(echo, server_dir, liveness_timeout=2):
            connector = fileforward.Connector(client_dir, liveness_timeout=2)
            streams = [await connector.open_connection() for _ in range(3)]
            for reader, writer in streams:  # each connection works before the mount dies
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 20) == b"ping"
            two_nodes.daemons["b"].kill()
            two_nodes.daemons["b"].wait(10)
            for reader, _ in streams:
                try:
                    data = await asyncio.wait_for(reader.read(), 10)
                except ConnectionError:
                    continue
                raise AssertionError(f"a connection on a dead mount ended cleanly with {data!r}")
            await asyncio.wait_for(connector.close(), 10)
    run(main())
