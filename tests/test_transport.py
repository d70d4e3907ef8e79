"""The transport's asyncio API, in one process: stream semantics, errors, flow
control, damaged records, cleanup. (Cross-process behaviour: test_cli_e2e.py.)"""
from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fileforward
from fileforward import records, tunneldir
from fileforward.chunks import DAMAGE_GRACE
from tests.polling import async_wait_until
from tests.tunnel_support import tunnel_files

FAST = dict(liveness_timeout=2.0, connect_timeout=2.0, poll_max=0.1)


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await reader.read()  # until the peer closes
    writer.close()


def test_stream_api_matches_asyncio(tunnel_dir):
    async def main():
        async def handler(reader, writer):
            line = await reader.readline()
            exact = await reader.readexactly(5)
            until = await reader.readuntil(b"!")
            writer.writelines([line.upper(), exact[::-1], until])
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()

        async with await fileforward.start_server(handler, tunnel_dir, **FAST) as server:
            assert server.is_serving() and server.sockets == ()
            reader, writer = await fileforward.open_connection(tunnel_dir, **FAST)
            assert writer.can_write_eof()
            assert writer.get_extra_info("tunnel_dir") == str(tunnel_dir)
            writer.write(b"hello\nabcdeuntil!")
            await writer.drain()
            assert await reader.read() == b"HELLO\nedcbauntil!"
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()
            assert writer.is_closing()
    run(main())


class Collecting(asyncio.Protocol):
    """A protocol that records what the transport calls, and echoes on request."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.transport = None
        self.received = bytearray()
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.received += data
        if self.echo:
            self.transport.write(data)

    def eof_received(self):
        self.eof.set_result(bytes(self.received))
        if self.echo:  # everything echoed, then done (as a TCP echo server closes)
            self.transport.write_eof()
            self.transport.close()
        return True  # the other direction stays open until closed

    def connection_lost(self, exc):
        self.lost.set_result(exc)


def test_protocol_api_matches_the_loops_create_connection_and_create_server(tunnel_dir):
    """create_connection / create_server drive a connection with a protocol, as the
    loop's methods do for TCP: data_received, eof_received, connection_lost, in order."""
    async def main():
        served = []

        def serving():
            served.append(Collecting(echo=True))
            return served[-1]

        server = await fileforward.create_server(serving, tunnel_dir, **FAST)
        try:
            transport, client = await fileforward.create_connection(Collecting, tunnel_dir, **FAST)
            assert client.transport is transport and transport.can_write_eof()
            transport.write(b"x" * 300_000)
            transport.write_eof()
            assert await asyncio.wait_for(client.eof, 20) == b"x" * 300_000
            assert await asyncio.wait_for(served[0].eof, 20) == b"x" * 300_000
            transport.close()
            assert await asyncio.wait_for(client.lost, 20) is None
            assert await asyncio.wait_for(served[0].lost, 20) is None
        finally:
            await server.shutdown()
    run(main())


def test_a_side_with_a_short_liveness_timeout_keeps_an_idle_connection_to_a_patient_one(tunnel_dir):
    """Each side judges the other with its own liveness timeout, so each must ping as
    often as the other needs: a client that gives up after 2 s of silence keeps an
    idle connection to a server that would wait 60 s (which pings every 12 s for
    itself)."""
    client_liveness = 2.0

    async def main():
        async with await fileforward.start_server(echo, tunnel_dir, liveness_timeout=60.0, poll_max=0.1):
            reader, writer = await fileforward.open_connection(
                tunnel_dir, liveness_timeout=client_liveness, poll_max=0.1)
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"
            await asyncio.sleep(3 * client_liveness)  # idle: only pings cross
            writer.write(b"after")
            assert await reader.readexactly(5) == b"after"
            writer.close()
    run(main())


def test_written_buffers_are_sent_as_they_were_when_written(tunnel_dir):
    """write() keeps views of bytes without a copy (they cannot change) and copies
    mutable buffers, which the caller may reuse at once, as asyncio's transports do."""
    async def main():
        async with await fileforward.start_server(echo, tunnel_dir, **FAST):
            reader, writer = await fileforward.open_connection(tunnel_dir, **FAST)
            reused = bytearray(b"first")
            writer.write(reused)
            reused[:] = b"XXXXX"
            writer.write(memoryview(b"--second--")[2:-2])
            writer.write(memoryview(bytearray(b"third")))
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 20) == b"firstsecondthird"
            writer.close()
    run(main())


def test_half_close_keeps_the_other_direction_flowing(tunnel_dir):
    async def main():
        async def handler(reader, writer):
            received = await reader.read()  # until the client's write_eof
            for _ in range(3):
                writer.write(received[:10])
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.close()

        async with await fileforward.start_server(handler, tunnel_dir, **FAST):
            reader, writer = await fileforward.open_connection(tunnel_dir, **FAST)
            writer.write(os.urandom(1 << 20))
            writer.write_eof()
            with pytest.raises(RuntimeError):
                writer.write(b"after eof")
            assert len(await reader.read()) == 30
            writer.close()
    run(main())


def test_no_server_fails_within_the_connect_timeout(tunnel_dir):
    async def main():
        started = time.monotonic()
        with pytest.raises(fileforward.NoServerError) as info:
            await fileforward.open_connection(tunnel_dir, connect_timeout=1.0)
        assert 1.0 <= time.monotonic() - started < 3.0
        assert str(tunnel_dir) in str(info.value) and "fileforward --client" in str(info.value)
        assert isinstance(info.value, ConnectionRefusedError)
    run(main())
    assert tunnel_files(tunnel_dir) == []


def test_abort_is_a_reset_on_the_other_side(tunnel_dir):
    async def main():
        aborted = asyncio.Event()

        async def handler(reader, writer):
            await reader.readexactly(3)
            writer.transport.abort()
            aborted.set()

        async with await fileforward.start_server(handler, tunnel_dir, **FAST):
            reader, writer = await fileforward.open_connection(tunnel_dir, **FAST)
            writer.write(b"abc")
            await aborted.wait()
            with pytest.raises(ConnectionResetError, match="reset by the other side"):
                await reader.read()
            writer.close()
    run(main())


def test_a_slow_reader_bounds_disk_use_and_blocks_the_writer(tunnel_dir):
    window = 1 << 20

    async def main():
        go = asyncio.Event()
        received = []

        async def handler(reader, writer):
            await go.wait()
            received.append(len(await reader.read()))
            writer.close()

        async with await fileforward.start_server(handler, tunnel_dir, window=window, **FAST):
            reader, writer = await fileforward.open_connection(tunnel_dir, window=window, **FAST)
            total = 0
            peak = 0

            async def write_all():
                nonlocal total
                for _ in range(40):
                    writer.write(b"z" * 262144)
                    await writer.drain()
                    total += 262144

            writing = asyncio.ensure_future(write_all())
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                on_disk = 0
                for path in tunnel_dir.glob("*.c2s*"):
                    try:
                        on_disk += path.stat().st_size
                    except FileNotFoundError:
                        pass
                peak = max(peak, on_disk)
                await asyncio.sleep(0.01)
            assert not writing.done(), "drain() should block while the reader does not read"
            # in flight at most: a window on disk, one drained window in the reader's
            # memory, the writer's 1 MiB buffer (asyncio's high-water mark) and one write
            assert total <= 2 * window + (1 << 20) + 262144
            # on disk: what was read stays until the segment is full (then the reader
            # removes it), and at most a window unread beyond it. The paused reader
            # reads on (for the ACKs of its own direction) but acknowledges only what
            # its application took, so the window bounds disk and memory together
            assert peak <= fileforward.Options(window=window).segment_bytes + window + 64
            go.set()
            await writing
            writer.write_eof()
            await reader.read()
            writer.close()
            assert received == [40 * 262144]
    run(main())


@pytest.mark.parametrize("damage", [b"garbage that is not a record", records.encode(records.Kind.DATA, b"xy", 1)[:-1],
                                    records.encode(records.Kind.DATA, b"xy", 0),
                                    struct.pack(">2sBBIII", b"FF", 99, 1, 0, 1, 0)])
def test_a_damaged_record_breaks_only_its_own_connection(tunnel_dir, damage):
    """Garbage, a record that never completes, a duplicate (a number already
    delivered), another format version: the reader never delivers it, and resets
    that connection only (a torn record is given DAMAGE_GRACE to heal)."""
    async def main():
        async with await fileforward.start_server(echo, tunnel_dir, **FAST):
            async with fileforward.Connector(tunnel_dir, **FAST) as connector:
                victim = await connector.open_connection()
                bystander = await connector.open_connection()
                for reader, writer in (victim, bystander):
                    writer.write(b"hi")
                    assert await reader.readexactly(2) == b"hi"
                cid = victim[1].get_extra_info("connection_id")
                to_server, _ = tunneldir.chunk_paths(Path(victim[1].get_extra_info("tunnel_dir")), cid)
                fd = os.open(to_server, os.O_WRONLY)
                try:
                    os.pwrite(fd, damage, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(victim[0].read(), DAMAGE_GRACE + 10)
                bystander[1].write(b"still fine")
                assert await bystander[0].readexactly(10) == b"still fine"
    run(main())


def test_a_second_server_is_refused_and_force_takes_over(tunnel_dir):
    async def main():
        first = await fileforward.start_server(echo, tunnel_dir, **FAST)
        with pytest.raises(fileforward.ServerAlreadyRunningError, match="--force"):
            await fileforward.start_server(echo, tunnel_dir, **FAST)
        second = await fileforward.start_server(echo, tunnel_dir, force=True, **FAST)
        await asyncio.wait_for(first.wait_closed(), 5)
        assert first.stepped_down_for and not first.is_serving()
        reader, writer = await fileforward.open_connection(tunnel_dir, **FAST)
        writer.write(b"to the new one")
        assert await reader.readexactly(14) == b"to the new one"
        writer.close()
        await first.shutdown()
        await second.shutdown()
    run(main())


def test_clients_survive_a_server_restart(tunnel_dir):
    async def main():
        async with fileforward.Connector(tunnel_dir, **FAST) as connector:
            for _ in range(2):
                server = await fileforward.start_server(echo, tunnel_dir, **FAST)
                reader, writer = await connector.open_connection()
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                await server.shutdown()
                with pytest.raises(ConnectionResetError):
                    await reader.read()
    run(main())
    assert tunnel_files(tunnel_dir) == []


def test_files_are_removed_after_a_clean_close(tunnel_dir):
    async def main():
        server = await fileforward.start_server(echo, tunnel_dir, **FAST)
        for _ in range(3):
            reader, writer = await fileforward.open_connection(tunnel_dir, **FAST)
            writer.write(b"abc")
            writer.write_eof()
            assert await reader.read() == b"abc"
            writer.close()
            await writer.wait_closed()
        server_bell = tunneldir.bell_path(server.tunnel_dir, server._endpoint.eid).name
        await async_wait_until(lambda: set(os.listdir(tunnel_dir)) == {"server", server_bell}, 5,
                               what="the connection files and the clients' bells to go")
        await server.shutdown()
    run(main())
    assert tunnel_files(tunnel_dir) == []


LIVE_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1 << 40, 0)
print("held", flush=True)
time.sleep(60)
"""


def test_files_of_crashed_endpoints_are_cleared_but_live_ones_kept(tunnel_dir):
    tunnel_dir.mkdir(mode=0o700)
    dead, live = "a" * 16, "b" * 16
    names = [f"{eid}{suffix}" for eid in (dead, live) for suffix in (".bell", "-1.c2s", "-1.s2c")]
    for name in names + [f"{'c' * 16}-7.c2s"]:  # the last one has no bell: its owner is gone
        os.close(os.open(tunnel_dir / name, os.O_CREAT | os.O_WRONLY, 0o600))  # as endpoints make them
    (tunnel_dir / ".nfs000000000001").write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", LIVE_HOLDER, str(tunnel_dir / f"{live}.bell")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"

        async def main():
            server = await fileforward.start_server(echo, tunnel_dir, **FAST)
            left = set(os.listdir(tunnel_dir))
            await server.shutdown()
            return left
        left = run(main())
        assert not any(n.startswith(dead) or n.startswith("c" * 16) for n in left)
        assert {f"{live}.bell", f"{live}-1.c2s", f"{live}-1.s2c", ".nfs000000000001"} <= left
    finally:
        holder.kill()
        holder.wait()


def test_unsafe_directory_is_refused_by_the_api(tmp_path):
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    os.chmod(unsafe, 0o770)

    async def main():
        with pytest.raises(fileforward.UnsafeTunnelDirError, match="chmod 700"):
            await fileforward.start_server(echo, unsafe)
        with pytest.raises(fileforward.UnsafeTunnelDirError):
            await fileforward.open_connection(unsafe)
    run(main())


def test_default_tunnel_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FILEFORWARD_TUNNEL_DIR", str(tmp_path / "env"))
    assert fileforward.default_tunnel_dir() == tmp_path / "env"
    monkeypatch.delenv("FILEFORWARD_TUNNEL_DIR")
    assert fileforward.default_tunnel_dir() == Path.home() / ".cache" / "fileforward" / "tunnel"


def test_options_are_validated():
    with pytest.raises(ValueError, match="liveness_timeout"):
        fileforward.Options(liveness_timeout=1, poll_max=0.5)
    with pytest.raises(ValueError, match="window"):
        fileforward.Options(window=1000, chunk=4096)


def test_records_round_trip_and_reject_damage():
    blob = records.encode(records.Kind.DATA, b"abc", 0) + records.encode(records.Kind.EOF, b"", 1)
    assert [(k, bytes(p)) for k, p in records.decode(blob)] == [(records.Kind.DATA, b"abc"), (records.Kind.EOF, b"")]
    flipped = bytearray(blob)
    flipped[records.HEADER_SIZE] ^= 1
    for damaged, message in [(blob[:-1], "truncated"), (b"XX" + blob[2:], "magic"),
                             (bytes(flipped), "checksum"),
                             (records.encode(records.Kind.DATA, b"abc", 1), "number 1 where 0 was due"),
                             (records.encode(records.Kind.DATA, b"abc", 0) * 2, "duplicate"),
                             (records.encode(records.Kind.DATA, b"abc", 0) + records.encode(records.Kind.EOF, b"", 2),
                              "a gap"),
                             (records.encode(77, b"", 0), "unknown record kind"),
                             (struct.pack(">2sBBIII", b"FF", 2, 1, 1 << 31, 0, 0), "exceeds")]:
        with pytest.raises(fileforward.ProtocolError, match=message):
            records.decode(damaged)


def test_a_torn_record_is_waited_for_and_a_complete_one_is_delivered():
    """A reader may look while a write is still arriving: what it cannot decode yet
    is left for the next look, never skipped."""
    decoder = records.StreamDecoder()
    whole = records.encode(records.Kind.DATA, b"hello", 0) + records.encode(records.Kind.DATA, b"world", 1)
    got, used, problem = decoder.decode(memoryview(whole[:-3]))
    assert [bytes(p) for _, p in got] == [b"hello"] and problem is None
    torn = whole[:used] + bytes(len(whole) - used)  # the second record's bytes not there yet
    got, used2, problem = decoder.decode(memoryview(torn[used:]))
    assert got == [] and used2 == 0 and problem is not None and not problem.fatal
    got, _, problem = decoder.decode(memoryview(whole[used:]))
    assert [bytes(p) for _, p in got] == [b"world"] and problem is None
