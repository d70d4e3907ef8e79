"""The `fileforward` command as a user meets it: flags, errors, `--job`, `demo`,
signals, what it logs. Real subprocesses of the real CLI, on a local tunnel directory."""
from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.polling import wait_until
from tests.tunnel_support import (Proc, free_port, one_line_error, python, recv_exactly, start_cli, start_service,
                                  tunnel_files)

LOWERED_SOFT_LIMIT = 256


def fileforward(*args: str, prefix=()) -> Proc:
    return Proc(python("-m", "fileforward", *args), prefix)


def open_file_limits(pid: int) -> "tuple[int, int]":
    """(soft, hard) RLIMIT_NOFILE of a running process, as the kernel reports it."""
    text = Path(f"/proc/{pid}/limits").read_text()
    soft, hard = re.search(r"^Max open files\s+(\S+)\s+(\S+)", text, re.M).groups()
    return int(soft), int(hard)


def lowered_limit() -> "list[str]":
    """A command prefix that starts the process with a soft descriptor limit of 256."""
    _, hard = open_file_limits(os.getpid())
    if hard <= LOWERED_SOFT_LIMIT:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise")
    return ["prlimit", f"--nofile={LOWERED_SOFT_LIMIT}:{hard}", "--"]


def wait_until_main_runs(proc: Proc) -> None:
    """Until the process (started with lowered_limit()) has raised its descriptor
    limit, the first thing main() does."""
    def raised() -> bool:
        # Until prlimit's exec (and before it, the fork's), the limit is ours; so the
        # command line is read first: once it is fileforward's, the limit read next is too.
        cmdline = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes()
        soft, hard = open_file_limits(proc.popen.pid)
        return b"fileforward" in cmdline and b"prlimit" not in cmdline and soft == hard

    wait_until(raised, 15, what=f"{proc.argv} to raise its open-file limit", interval=0.005)


# --- flags -------------------------------------------------------------------------------

def test_a_mistyped_flag_is_named_with_a_suggestion():
    line = one_line_error(fileforward("--sever", "--port", "8888"))
    assert "--sever" in line and "did you mean --server?" in line


def test_help_shows_the_hyphenated_spelling_and_every_default():
    """Every flag that takes a value states its default (switches are off unless given)."""
    for argv in (["--help"], ["demo", "--help"]):
        proc = fileforward(*argv)
        assert proc.popen.wait(15) == 0
        options = proc.output.split("options:", 1)[1].split("\n\n")[0]
        blocks = re.split(r"\n  (?=-)", options.strip())
        assert len(blocks) >= 4
        takes_a_value = [b for b in blocks if re.match(r"(-\w, )?--[\w-]+ [\[{A-Z]", b)]
        assert len(takes_a_value) >= 2
        for block in takes_a_value:
            assert "default" in block, f"{argv}: no default stated in: {block}"
    assert "--tunnel_dir" not in proc.output and "--log_level" not in proc.output


def test_both_spellings_of_a_flag_work_and_debug_logs_one_line_per_connection(tmp_path):
    """`--log_level DEBUG` (underscore) on one side, `-v` on the other: each logs one
    line per connection with the bytes each way and its duration."""
    service_port, port = free_port(), free_port()
    service = start_service("echo", service_port)
    job_side = start_cli("client", service_port, tmp_path / "t", "--log_level", "DEBUG")
    login_side = Proc(python("-m", "fileforward", "--server", "--port", str(port), "--tunnel-dir",
                             str(tmp_path / "t"), "-v"))
    try:
        login_side.wait_for(lambda l: "forwarding" in l)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"x" * 1000)
            assert recv_exactly(sock, 1000) == b"x" * 1000
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
        for side in (login_side, job_side):
            side.wait_for(lambda l: "1000 bytes to the service, 1000 bytes back" in l)
            lines = [l for l in side.lines if "bytes to the service" in l]
            assert len(lines) == 1 and "DEBUG" in lines[0] and lines[0].endswith(" s, closed"), side.output
    finally:
        for proc in (login_side, job_side, service):
            proc.kill()


def test_descriptor_limit_is_raised_to_the_hard_limit(tmp_path):
    proc = start_cli("server", free_port(), tmp_path / "t", prefix=lowered_limit())
    try:
        soft, hard = open_file_limits(proc.popen.pid)
        assert soft == hard > LOWERED_SOFT_LIMIT
    finally:
        proc.kill()


@pytest.mark.parametrize("argv, words", [
    (["--server", "--port", "70000"], "between 1 and 65535"),
    (["--client", "--port", "1", "--window", "0.5"], "--window must be at least 1 MiB"),
    (["--client"], "--port is required"),
    ([], "give --server"),
    (["--server", "--port", "1", "--tunnel-dir", "/tmp/x", "--job", "7"], "not allowed with"),
    (["demo", "--size", "0"], "--size must be"),
])
def test_bad_input_is_one_line_without_traceback(argv, words):
    assert words in one_line_error(fileforward(*argv))


# --- the tunnel directory ----------------------------------------------------------------

def test_a_new_tunnel_directory_is_announced_once(tmp_path):
    where = tmp_path / "new" / "tunnel"
    first = start_cli("client", free_port(), where)
    second = start_cli("server", free_port(), where)
    try:
        line = first.wait_for(lambda l: "created" in l)
        assert f"INFO created tunnel directory {where}; the other side must use the same path" in line
        assert "created" not in second.output
    finally:
        first.kill()
        second.kill()


def test_a_tunnel_directory_that_cannot_be_created_names_itself():
    line = one_line_error(start_cli("server", free_port(), Path("/proc/nope/tunnel"), ready=False))
    assert "cannot create tunnel directory /proc/nope/tunnel: No such file or directory" in line
    assert "Errno" not in line


def test_job_selects_the_jobs_tunnel_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("FILEFORWARD_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    expected = tmp_path / "jobs" / "4242" / "tunnel"
    service_port, port = free_port(), free_port()
    service = start_service("echo", service_port)
    login_side = fileforward("--server", "--port", str(port), "--job", "4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the job side takes its own job id
    job_side = fileforward("--client", "--port", str(service_port), "--job")
    try:
        line = login_side.wait_for(lambda l: "forwarding" in l)
        assert f"-> tunnel {expected} " in line and "fileforward --client --port %d --job 4242)" % port in line
        line = job_side.wait_for(lambda l: "forwarding" in l)
        assert f"forwarding tunnel {expected} ->" in line and "fileforward --server --port %d --job 4242)" % service_port in line
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"through the job's tunnel")
            assert recv_exactly(sock, 24) == b"through the job's tunnel"
    finally:
        for proc in (login_side, job_side, service):
            proc.kill()


def test_job_without_id_outside_a_job_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    line = one_line_error(fileforward("--server", "--port", "8888", "--job"))
    assert "$SLURM_JOB_ID is not set" in line and "--job 12345" in line


# --- demo --------------------------------------------------------------------------------

def test_demo_measures_the_tunnel_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the demo's temporary directory goes
    proc = fileforward("demo", "--size", "2")
    assert proc.popen.wait(120) == 0, proc.output
    text = proc.output
    assert re.search(r"first page, new connection: \d+ bytes, time to first byte [\d.]+ ms", text), text
    assert re.search(r"round trip .*: [\d.]+ ms", text), text
    assert re.search(r"download: 2097152 bytes \(2 MiB\) in [\d.]+ s = [\d.]+ MiB/s, every byte checked", text), text
    assert "Traceback" not in text and "WARNING" not in text
    assert os.listdir(tmp_path) == []


def test_demo_failure_is_one_line_and_nonzero():
    line = one_line_error(fileforward("demo", "--dir", "/proc"))
    assert line.startswith("fileforward demo: FAILED:") and "/proc/fileforward-demo-" in line


# --- signals: no traceback, ever ---------------------------------------------------------

@pytest.mark.parametrize("argv, status", [
    (["--server", "--port", "PORT"], 0),
    (["--client", "--port", "PORT"], 0),
    (["demo", "--size", "64"], 130),
])
def test_sigint_during_startup_stops_without_traceback(tmp_path, monkeypatch, argv, status):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the demo's temporary directory goes
    argv = [str(free_port()) if a == "PORT" else a for a in argv]
    if argv[0] != "demo":
        argv += ["--tunnel-dir", str(tmp_path / "t")]
    proc = fileforward(*argv, prefix=lowered_limit())
    wait_until_main_runs(proc)
    proc.signal(signal.SIGINT)
    assert proc.popen.wait(30) == status, proc.output
    assert "Traceback" not in proc.output
    assert tunnel_files(tmp_path / "t") == [] and os.listdir(tmp_path / "tmp") == []


def test_signals_during_shutdown_print_no_traceback(tmp_path):
    proc = start_cli("server", free_port(), tmp_path / "t")
    for signum in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
        proc.signal(signum)
    assert proc.popen.wait(15) == 0, proc.output
    assert "Traceback" not in proc.output and "stopped" in proc.output
    assert tunnel_files(tmp_path / "t") == []
