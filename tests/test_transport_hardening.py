"""Transport hardening (issue 11, findings 2, 3, 13 and 15): a tampered, broken or
deleted tunnel directory, filesystem errors, and descriptor leaks.

Errors are real wherever the machine can produce them: symbolic links and
permission changes made by the test, a full tmpfs (ENOSPC), a read-only tmpfs
mounted over the directory's parent (EROFS), a descriptor limit (EMFILE), a
squatted file name (EEXIST). Mounting needs root; those tests say so when skipped.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

import fileforward
from fileforward import tunneldir
from tests.polling import async_wait_until
from tests.tunnel_support import (CraftedPeer, Proc, free_port, python, recv_exactly, server_eid, start_cli,
                                   start_service)

FAST = dict(liveness_timeout=2.0, connect_timeout=3.0, poll_max=0.1)
IOV_MAX = os.sysconf("SC_IOV_MAX")
DETECT = 10.0  # the bound for noticing a changed or deleted directory
SLACK = 10.0  # a loaded machine


def run(coro, timeout: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(1 << 16)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()


async def round_trip(connector: fileforward.Connector, payload: bytes = b"ping") -> bytes:
    reader, writer = await connector.open_connection()
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def descriptors_in(directory: Path) -> int:
    """How many of our open descriptors are files in `directory`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"{directory}/")
    return count


def open_fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def delete_live_dir(path: Path) -> None:
    """rm -rf a directory an endpoint is using (its files may vanish while we remove them)."""
    def vanished(function, name, exc_info) -> None:
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]
    shutil.rmtree(path, onerror=vanished)


def error_lines(text: str) -> List[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


@contextlib.contextmanager
def mounted(target: Path, *options: str) -> Iterator[Path]:
    """A tmpfs mounted on `target` for the duration (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (for a real ENOSPC / EROFS)")
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("mode=700",) + options), "tmpfs", str(target)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def fill(directory: Path) -> Path:
    """Write into `directory` until its filesystem is full (ENOSPC)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC, full.value
    return filler


# --- finding 2: the tunnel directory is trusted after start; files opened through symlinks --

def _link_over(path: Path, target: Path, how: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    if how == "symlink":
        os.symlink(target, temporary)
    else:
        os.link(target, temporary)
    os.rename(temporary, path)


@pytest.mark.parametrize("how, refusal", [("symlink", "symbolic link"), ("hardlink", "2 hard links")])
def test_finding2_linked_chunk_files_are_refused_and_their_targets_untouched(tmp_path, how, refusal):
    """Chunk files swapped for links to a file of ours (0600) before the server
    accepts: the server opens no symbolic link (O_NOFOLLOW) and keeps no file with
    another name (fstat: one link), truncates and writes nothing, stops with one
    ERROR line naming the fix, and exits non-zero."""
    tunnel_dir = tmp_path / "tunnel"
    victims = []
    for name in ("passwd-copy-1", "passwd-copy-2"):
        victim = tmp_path / name
        shutil.copyfile("/etc/passwd", victim)
        os.chmod(victim, 0o600)
        victims.append(victim)
    original = victims[0].read_bytes()

    async def main():
        async with fileforward.Connector(tunnel_dir, connect_timeout=60, liveness_timeout=10) as connector:
            attempt = asyncio.ensure_future(connector.open_connection())  # no server yet: it waits
            await async_wait_until(lambda: len([n for n in os.listdir(tunnel_dir) if n.endswith((".c2s", ".s2c"))]) == 2,
                                   20, what="the connection's chunk files")
            for name in sorted(os.listdir(tunnel_dir)):
                if name.endswith(".c2s"):
                    _link_over(tunnel_dir / name, victims[0], how)
                elif name.endswith(".s2c"):
                    _link_over(tunnel_dir / name, victims[1], how)
            server = start_cli("client", free_port(), tunnel_dir)
            try:
                line = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: server.wait_for(lambda line: " ERROR " in line, timeout=30))
                status = await asyncio.get_running_loop().run_in_executor(None, lambda: server.popen.wait(30))
            finally:
                server.kill()
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt
            return line, status, server.output

    line, status, output = run(main())
    assert refusal in line and f"chmod 700 {tunnel_dir}" in line, line
    assert len(error_lines(output)) == 1, output
    assert status != 0, output
    assert victims[0].read_bytes() == original, "the server truncated or wrote into a symlink's target"
    assert victims[1].read_bytes() == original, "the server wrote into a symlink's target"


@pytest.mark.parametrize("role", ["client", "server"])
def test_finding2_chmod_777_on_a_live_tunnel_dir_stops_the_endpoint(nodes, role):
    """A live directory opened to everyone (from the other node): either side notices
    within 10 s by itself, logs one ERROR line naming `chmod 700 DIR` (and nothing
    repeating it), and exits non-zero."""
    login, job = nodes
    service_port = free_port()
    service = start_service("echo", service_port, job.prefix)
    if role == "client":
        side, other = job, login
        proc = start_cli("client", service_port, job.tunnel_dir, prefix=job.prefix)
    else:
        side, other = login, job
        proc = start_cli("server", free_port(), login.tunnel_dir, prefix=login.prefix)
    try:
        os.chmod(other.tunnel_dir, 0o777) if not other.prefix else \
            subprocess.run([*other.prefix, "chmod", "777", str(other.tunnel_dir)], check=True, timeout=30)
        line = proc.wait_for(lambda line: " ERROR " in line, timeout=DETECT + SLACK)
        assert f"chmod 700 {side.tunnel_dir}" in line, line
        assert proc.popen.wait(SLACK) == 1, proc.output
        assert len(error_lines(proc.output)) == 1, proc.output
        assert "fileforward: error:" not in proc.output and "Traceback" not in proc.output, proc.output
    finally:
        proc.kill()
        service.kill()


def test_finding2_connect_right_after_chmod_777_is_not_accepted(tmp_path):
    """The directory is checked before accepting, not only every few seconds: a
    CONNECT written by a neighbour right after `chmod 777` gets no ACCEPT."""
    tunnel_dir = tmp_path / "tunnel"
    server = start_cli("client", free_port(), tunnel_dir)
    try:
        intruder = CraftedPeer(tunnel_dir, "f" * 16)
        _, _, to_client = intruder.connection(1)
        os.chmod(tunnel_dir, 0o777)
        intruder.say(server_eid(tunnel_dir), conns=1)
        line = server.wait_for(lambda line: " ERROR " in line, timeout=DETECT + SLACK)
        assert f"chmod 700 {tunnel_dir}" in line, line
        assert server.popen.wait(SLACK) != 0, server.output
        assert to_client.stat().st_size == 0, "the server accepted a connection in an unsafe directory"
    finally:
        server.kill()


# --- finding 3: an unexpected OSError kills the I/O thread ----------------------------------

def test_finding3_enospc_on_connect_ends_only_that_connection(tmp_path):
    """A full filesystem fails the connection being made, with its cause; once space
    is freed, the next connection works (the endpoint did not die)."""
    with mounted(tmp_path / "small", "size=1m") as mount:
        tunnel_dir = mount / "tunnel"

        async def main():
            async with await fileforward.start_server(echo, tunnel_dir, **FAST):
                async with fileforward.Connector(tunnel_dir, **FAST) as connector:
                    filler = fill(mount)
                    with pytest.raises(OSError) as failed:
                        await round_trip(connector)
                    filler.unlink()
                    return failed.value, await round_trip(connector, b"after")

        error, answer = run(main())
        assert "No space left on device" in str(error), error
        assert answer == b"after"


def test_finding3_emfile_on_accept_ends_only_that_connection(tmp_path):
    """Out of descriptors while accepting: that connection fails, the process stays
    up and serves again once descriptors are free."""
    tunnel_dir = tmp_path / "tunnel"
    service_port = free_port()
    service = start_service("echo", service_port)
    limit = 64
    server = Proc(python("-c", f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
                               f"from fileforward.cli import main; "
                               f"main(['--client', '--port', '{service_port}', '--tunnel_dir', '{tunnel_dir}'])"))
    try:
        server.wait_for(lambda line: "forwarding" in line)

        async def main():
            # the connection the server cannot accept fails after connect_timeout
            async with fileforward.Connector(tunnel_dir, connect_timeout=FAST["connect_timeout"]) as connector:
                held, failure = [], None
                for _ in range(limit):
                    try:
                        held.append(await connector.open_connection())
                    except OSError as exc:
                        failure = exc
                        break
                for _, writer in held:
                    writer.close()
                await async_wait_until(lambda: open_fds_of(server.popen.pid) < limit // 2, 30, what="the server's descriptors freed")
                return failure, len(held), await round_trip(connector, b"again")

        failure, opened, answer = run(main(), timeout=120)
        assert failure is not None, f"{opened} connections opened under a limit of {limit}"
        assert answer == b"again"
        assert server.popen.poll() is None, server.output
        assert "cannot accept connection" in server.output and "Too many open files" in server.output, server.output
    finally:
        server.kill()
        service.kill()


def test_finding3_persistent_endpoint_error_fails_the_server(tmp_path, caplog):
    """An endpoint-wide error (the directory is gone and cannot be made again: EROFS)
    is logged at WARNING and retried; after give_up_after the endpoint fails and
    Server.serve_forever() raises it, so a program does not stay up unable to serve."""
    parent = tmp_path / "parent"
    tunnel_dir = parent / "tunnel"

    async def main():
        server = await fileforward.start_server(echo, tunnel_dir, give_up_after=3.0, **FAST)
        delete_live_dir(tunnel_dir)
        with mounted(parent, "ro"):
            with pytest.raises(fileforward.EndpointFailedError) as failed:
                await asyncio.wait_for(server.serve_forever(), DETECT + 3.0 + SLACK)
        assert server.failure is not None and not server.is_serving()
        return failed.value

    with caplog.at_level(logging.WARNING, logger="fileforward"):
        failure = run(main())
    assert "Read-only file system" in str(failure), failure
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Read-only" in r.getMessage()]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "fileforward stopped" in r.getMessage()]
    assert warnings and len(errors) == 1, caplog.text


def test_finding3_endpoint_error_that_clears_is_survived(tmp_path, caplog):
    """The same error, cleared before give_up_after: the endpoint recovers by itself."""
    parent = tmp_path / "parent"
    tunnel_dir = parent / "tunnel"

    async def main():
        async with await fileforward.start_server(echo, tunnel_dir, **FAST) as server:
            delete_live_dir(tunnel_dir)
            with mounted(parent, "ro"):
                await async_wait_until(lambda: "Read-only file system" in caplog.text, DETECT + SLACK, what="the WARNING")
            await async_wait_until(lambda: "works again" in caplog.text, 20, what="the recovery")
            assert server.is_serving()
            async with fileforward.Connector(tunnel_dir, **FAST) as connector:
                return await round_trip(connector, b"recovered")

    with caplog.at_level(logging.WARNING, logger="fileforward"):
        assert run(main()) == b"recovered"


# --- finding 13: a tunnel directory deleted while running ------------------------------------

def test_finding13_deleted_tunnel_dir_is_made_again_and_serves(nodes):
    """Both CLI sides notice the deletion within 10 s (ERROR), make the directory again
    (0700), and new connections work without restarting either side."""
    login, job = nodes
    service_port, port = free_port(), free_port()
    service = start_service("echo", service_port, job.prefix)
    job_side = start_cli("client", service_port, job.tunnel_dir, prefix=job.prefix)
    login_side = start_cli("server", port, login.tunnel_dir, prefix=login.prefix)
    try:
        assert _echo_through(port, b"before") == b"before"
        delete_live_dir(login.tunnel_dir)
        for side in (login_side, job_side):
            line = side.wait_for(lambda line: " ERROR " in line and "deleted" in line, timeout=DETECT + SLACK)
            assert str(login.tunnel_dir.name) in line, line
        answer = None
        for _ in range(60):
            try:
                answer = _echo_through(port, b"after")
                break
            except OSError:
                continue
        assert answer == b"after", f"no connection worked again\n{login_side.output}\n{job_side.output}"
        assert (os.stat(login.tunnel_dir).st_mode & 0o777) == 0o700
        assert login_side.popen.poll() is None and job_side.popen.poll() is None
    finally:
        for proc in (login_side, job_side, service):
            proc.kill()


def _echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


# --- finding 15: descriptor limits and leaks -------------------------------------------------

def test_finding15_failed_second_open_leaks_no_descriptor_nor_file(tunnel_dir):
    """_begin_connect: when the second chunk file cannot be made (here its name is
    taken, EEXIST), the first one is closed and removed."""
    attempts = 13

    async def main():
        async with fileforward.Connector(tunnel_dir, **FAST) as connector:
            endpoint = connector._endpoint
            base = endpoint._next_cid
            for n in range(1, attempts + 1):  # squat the names the next connections will use
                _, to_client = tunneldir.chunk_paths(connector.tunnel_dir, f"{endpoint.eid}-{base + n}")
                os.close(os.open(to_client, os.O_CREAT | os.O_WRONLY, 0o600))
            before = descriptors_in(connector.tunnel_dir)
            for _ in range(attempts):
                with pytest.raises(FileExistsError):
                    await connector.open_connection()
            return before, descriptors_in(connector.tunnel_dir), sorted(os.listdir(connector.tunnel_dir))

    before, after, names = run(main())
    assert after == before, f"{after - before} descriptors leaked"
    assert not [n for n in names if n.endswith(".c2s")], names


def test_finding15_one_write_needing_more_than_iov_max_buffers(tunnel_dir):
    """One flush can carry more records than IOV_MAX buffers (pwritev says EINVAL):
    with 1 KiB records in a 600 KiB window, a 700 KiB write needs ~1,200 buffers."""
    chunk, window = 1024, 600 * 1024
    assert 2 * window // chunk > IOV_MAX, "the test must exceed IOV_MAX"
    payload = os.urandom(700 * 1024)

    async def main():
        knobs = dict(FAST, chunk=chunk, window=window)
        async with await fileforward.start_server(echo, tunnel_dir, **knobs):
            async with fileforward.Connector(tunnel_dir, **knobs) as connector:
                return await round_trip(connector, payload)

    assert run(main()) == payload


def test_finding13_a_directory_deleted_with_its_parent_is_not_made_again(tmp_path):
    """A finished job removes its whole directory while a login-side process still
    runs: the deleted tunnel directory is reported, but the tree is not brought back
    (only a directory whose parent still exists is made again)."""
    job_dir = tmp_path / "jobs" / "42"
    proc = start_cli("client", free_port(), job_dir / "tunnel")
    try:
        shutil.rmtree(job_dir)
        line = proc.wait_for(lambda l: "deleted with its parent" in l, timeout=DETECT + SLACK)
        assert "not making them again" in line, line
        assert not job_dir.exists(), "the finished job's directory was made again"
    finally:
        proc.kill()
