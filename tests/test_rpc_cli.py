"""`python -m rpc` as a user meets it: flag spellings, help, --job, error paths, log lines."""
import argparse
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import rpc
from rpc.cli import build_parser
from rpc_helpers import TESTS, CliServer, RawConnection, run_json
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")

README = TESTS.parent / "README.md"
LOWERED_SOFT_LIMIT = 256


def run_rpc(*args, timeout=60, **kwargs):
    return subprocess.run([sys.executable, "-m", "rpc", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


# ---------------------------------------------------------------- flags and help


@pytest.mark.parametrize("spelling", ["hyphens", "underscores"])
def test_both_flag_spellings_are_the_same_flag(spelling, tmp_path):
    flags = ["--tunnel-dir", "--key-file", "--connect-timeout"]
    if spelling == "underscores":
        flags = [flag.replace("-", "_").replace("__", "--", 1) for flag in flags]
    args = build_parser().parse_args(["status", flags[0], "D", flags[1], "K", flags[2], "0.5"])
    assert (args.tunnel_dir, args.key_file, args.connect_timeout) == ("D", "K", 0.5)
    serve = build_parser().parse_args(["serve", "m:F", "--max_frame=1000", "--liveness-timeout", "3"])
    assert (serve.max_frame, serve.liveness_timeout) == (1000, 3.0)


def test_the_real_cli_accepts_underscores_and_help_shows_hyphens(tmp_path):
    proc = run_rpc("status", "--tunnel_dir", str(tmp_path / "t"), "--connect_timeout", "0.3")
    assert proc.returncode == 1 and '"alive": false' in proc.stdout, proc.stderr
    for command in ("serve", "status"):
        help_text = run_rpc(command, "--help").stdout
        assert "--tunnel-dir" in help_text and "--key-file" in help_text
        assert "_" not in "".join(re.findall(r"--[\w-]+", help_text)), help_text


def test_a_mistyped_flag_gets_did_you_mean():
    proc = run_rpc("serve", "mod:F", "--wrkers", "3")
    assert proc.returncode == 2
    assert "did you mean --workers?" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_works_before_and_after_the_subcommand(where, sock_dir):
    status = ["status", "--unix", str(sock_dir / "none"), "--connect-timeout", "0.2"]
    args = ["-v", *status] if where == "before" else [*status, "-v"]
    assert build_parser().parse_args(args).verbose is True
    assert " DEBUG " in run_rpc(*args).stderr
    assert " DEBUG " not in run_rpc(*status).stderr


def test_log_level_after_the_subcommand_silences_info(sock_dir):
    proc = run_rpc("status", "--unix", str(sock_dir / "none"), "--connect-timeout", "0.2",
                   "--log-level", "ERROR", "-v")
    assert " DEBUG " in proc.stderr  # -v wins over --log-level, as --help says
    assert build_parser().parse_args(["status", "--log-level", "ERROR"]).log_level == "ERROR"


def test_every_option_states_its_default():
    parser = build_parser()
    for name, sub in [("", parser), *subcommands(parser).items()]:
        formatter = sub._get_formatter()
        for action in sub._actions:
            # -v is cliargs' shared switch (both CLIs): off unless given
            if action.option_strings and action.dest not in ("help", "verbose"):
                text = formatter._get_help_string(action) or ""
                assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"


def test_help_describes_the_tool_and_module_attr():
    top = run_rpc("--help")
    assert top.returncode == 0 and "``" not in top.stdout
    assert "python -m rpc serve" in top.stdout and "status" in top.stdout
    serve = run_rpc("serve", "--help").stdout
    assert re.search(r"MODULE:ATTR\s+the functions to serve", serve), serve


def _readme_cli_block():
    text = README.read_text()
    return re.search(r"\*\*CLI\.\*\*\n\n```\n(.*?)```", text, re.S).group(1)


def test_readme_cli_block_matches_help():
    block = _readme_cli_block()
    parser = build_parser()
    documented = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", block)) - {"-m", "--x_y", "--x-y"}
    offered = {s for sub in subcommands(parser).values() for a in sub._actions
               for s in a.option_strings if s not in ("-h", "--help", "--verbose")}
    assert documented == offered
    for sub in subcommands(parser).values():  # "[--workers 4]": the default of the code
        for action in sub._actions:
            for flag, number in re.findall(r"\[(--[\w-]+) (\d+(?:\.\d+)?)\]", block):
                if flag in action.option_strings:
                    assert float(number) == action.default, flag


def test_status_connect_timeout_default_is_the_library_default():
    status = subcommands(build_parser())["status"]
    default = next(a.default for a in status._actions if a.dest == "connect_timeout")
    assert default == rpc.blocking.DEFAULT_CONNECT_TIMEOUT == 10.0
    assert "[--connect-timeout 10]" in _readme_cli_block()


# ---------------------------------------------------------------- --job


def test_job_selects_the_jobs_rpc_directory(tmp_path):
    env = {**os.environ, "FILEFORWARD_JOBS_DIR": str(tmp_path / "jobs")}
    env.pop("SLURM_JOB_ID", None)
    srv = CliServer("--job", "4242", env=env)
    try:
        assert srv.address == f"tunnel:{tmp_path / 'jobs' / '4242' / 'rpc'}"
        code, info, err = run_json(["-m", "rpc", "status", "--job"],
                                   env={**env, "SLURM_JOB_ID": "4242"})  # inside the job
        assert code == 0 and info["pid"] == srv.proc.pid, err
    finally:
        srv.stop()


def test_job_without_id_outside_a_job_is_one_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    proc = run_rpc("status", "--job", env=env)
    assert proc.returncode == 2 and "SLURM_JOB_ID" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_job_excludes_the_other_transports():
    proc = run_rpc("serve", "mod:F", "--job", "1", "--tcp", "127.0.0.1:0")
    assert proc.returncode == 2 and "not allowed with argument --job" in proc.stderr


# ---------------------------------------------------------------- serving


def _lower_soft_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOWERED_SOFT_LIMIT, hard))


def test_serve_raises_the_open_file_limit(sock):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard <= LOWERED_SOFT_LIMIT:
        pytest.skip(f"hard RLIMIT_NOFILE is {hard}: no room to lower the soft limit below it")
    srv = CliServer("--unix", str(sock), preexec_fn=_lower_soft_nofile)
    try:
        limits = Path(f"/proc/{srv.proc.pid}/limits").read_text()
        soft, hard_seen = re.search(r"Max open files\s+(\d+)\s+(\d+)", limits).groups()
        assert int(soft) == int(hard_seen) == hard
    finally:
        srv.stop()


def test_serve_names_a_bad_entry_in_one_line(tmp_path, sock):
    module = tmp_path / "badfuncs.py"
    module.write_text("def ok():\n    return 1\n\nFUNCS = {'ok': ok, 'three': 3}\n")
    proc = run_rpc("serve", f"{module}:FUNCS", "--unix", str(sock))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "'three' is 3 (int), not a function" in lines[0], proc.stderr


@pytest.mark.parametrize("transport", ["unix", "tunnel"])
def test_cli_start_line_names_transport_and_functions(transport, sock, tmp_path):
    if transport == "unix":
        srv, where = CliServer("--unix", str(sock)), f"unix:{sock}"
    else:  # a relative tunnel directory is shown as the absolute path it is
        srv, where = CliServer("--tunnel-dir", "t", cwd=tmp_path), f"tunnel:{tmp_path / 't'}"
    try:
        line = next(line for line in srv.log if "serving" in line)
        assert f"on {where} (" in line and " INFO " in line
        assert "(acount, add, aecho, " in line  # the functions, sorted
    finally:
        srv.stop()


def test_rpc_serve_in_a_script_logs_its_start_line(sock):
    script = textwrap.dedent(f"""
        import rpc
        def add(a, b):
            return a + b
        def echo(x):
            return x
        rpc.serve({{"echo": echo, "add": add}}, unix={str(sock)!r})
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    log = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
    reader.start()
    try:  # the server's socket appears once it serves; it logs before that
        wait_until(lambda: sock.exists() or proc.poll() is not None, timeout=30,
                   what="the script's server to start")
    finally:
        proc.terminate()
        proc.wait(10)
        reader.join(10)
    start = [line for line in log if "serving" in line]  # the script set up no logging
    assert len(start) == 1 and " INFO " in start[0], log
    assert f"serving 2 functions on unix:{sock} (add, echo)" in start[0]


# ---------------------------------------------------------------- clients coming and going


def _lines_about_clients(srv, count):
    def lines():
        return [line for line in srv.log if re.search(r"\bclient \S+ .*connected|client \S+ lost", line)]
    wait_until(lambda: len(lines()) >= count, timeout=30, what=f"{count} log lines about clients")
    return lines()


def test_a_job_that_ends_normally_is_a_normal_disconnect(tmp_path):
    tunnel = tmp_path / "t"
    srv = CliServer("--tunnel-dir", str(tunnel))
    try:
        job = (f"import rpc; assert rpc.proxy('add', tunnel_dir={str(tunnel)!r}, "
               f"connect_timeout=30)(2, 3) == 5")  # never closes: the job just ends
        subprocess.run([sys.executable, "-c", job], check=True, timeout=60)
        connected, left = _lines_about_clients(srv, 2)
        assert " INFO " in connected and "connected" in connected
        assert " INFO " in left and left.rstrip().endswith("disconnected"), left
        assert not any("WARNING" in line for line in srv.log), srv.log
    finally:
        srv.stop()


@pytest.mark.parametrize("how", ["reset", "mid-frame"])
def test_a_client_that_breaks_off_is_a_warning_with_its_cause(how):
    srv = CliServer("--tcp", "127.0.0.1:0")
    try:
        host, port = srv.tcp.rsplit(":", 1)
        raw = RawConnection((host, int(port)))
        raw.authenticate(rpc.auth.load_key())
        if how == "reset":  # closing with SO_LINGER 0 sends a TCP RST
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            raw.sock.sendall(b"\x00\x00\x01\x00")  # a frame header cut short
        raw.close()
        wait_until(lambda: any(" WARNING " in line for line in srv.log), timeout=30,
                   what="a warning about the connection")
        warning = next(line for line in srv.log if " WARNING " in line)
        cause = "Connection reset by peer" if how == "reset" else "middle of a frame"
        assert "127.0.0.1:" in warning and cause in warning, warning
        assert not any("disconnected" in line for line in srv.log), srv.log
    finally:
        srv.stop()


# ---------------------------------------------------------------- status


def test_server_not_running_names_the_rpc_fix(tmp_path, sock_dir):
    with pytest.raises(rpc.ServerNotRunningError) as tunnel:
        rpc.connect(tunnel_dir=tmp_path / "t", connect_timeout=0.5)
    message = str(tunnel.value)
    assert "fileforward --client" not in message
    assert f"python -m rpc serve MODULE:ATTR --tunnel-dir {tmp_path / 't'}" in message
    with pytest.raises(rpc.ServerNotRunningError,
                       match=f"python -m rpc serve MODULE:ATTR --unix {sock_dir / 'none'}"):
        rpc.connect(unix=sock_dir / "none", connect_timeout=0.2)


@pytest.mark.parametrize("transport", ["tunnel", "unix"])
def test_ctrl_c_during_status_is_quiet(transport, tmp_path, sock_dir):
    tunnel = tmp_path / "t"
    where = (["--tunnel-dir", str(tunnel)] if transport == "tunnel"
             else ["--unix", str(sock_dir / "none"), "-v"])
    proc = subprocess.Popen([sys.executable, "-m", "rpc", "status", *where,
                             "--connect-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = ""
    try:
        if transport == "tunnel":  # it has asked for a connection in the tunnel
            wait_until(lambda: tunnel.is_dir() and any(tunnel.iterdir()), timeout=30,
                       what="status to start connecting")
        else:  # it says so (then retries until the timeout: nobody listens)
            started = proc.stderr.readline()
            assert "connecting to unix:" in started, started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        err = started + err
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert out == "" and "Traceback" not in err and "Task was destroyed" not in err, err


def test_a_tunnel_that_fails_for_good_stops_the_server_with_one_line(tmp_path):
    """Finding 3 / 2 for RPC: the tunnel directory opened to everyone under a live
    `python -m rpc serve` makes its tunnel fail for good; the server says so in one
    ERROR line and exits 1, instead of staying up unable to serve."""
    tunnel = tmp_path / "t"
    srv = CliServer("--tunnel-dir", str(tunnel))
    try:
        os.chmod(tunnel, 0o777)
        assert srv.proc.wait(30) == 1, "".join(srv.log)
        srv._drain.join(10)
        errors = [line for line in srv.log if " ERROR " in line]
        assert len(errors) == 1 and f"chmod 700 {tunnel}" in errors[0], "".join(srv.log)
        assert not any("Traceback" in line for line in srv.log), "".join(srv.log)
    finally:
        srv.stop()


def test_coherence_is_chosen_on_both_sides_of_an_rpc_tunnel(tmp_path, caplog):
    """`serve --coherence lock-free` and `rpc.connect(coherence=...)` reach the
    transport: on one machine, auto would choose locks; each side logs the mode
    it was told, and calls work in it."""
    tunnel = tmp_path / "t"
    srv = CliServer("--tunnel-dir", str(tunnel), "--coherence", "lock-free")
    try:
        with caplog.at_level("INFO", logger="fileforward"):
            with rpc.connect(tunnel_dir=tunnel, coherence="lock-free", connect_timeout=30) as client:
                assert client.call("add", 2, 3) == 5
        assert any("coherence lock-free (chosen with --coherence lock-free)" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        wait_until(lambda: any("coherence lock-free (chosen with --coherence lock-free)" in line
                               for line in srv.log), timeout=30, what="the server's line on the mode",
                   seen=lambda: srv.log)
    finally:
        srv.stop()


def test_coherence_is_refused_for_a_socket_in_one_line(sock):
    proc = run_rpc("status", "--unix", str(sock), "--coherence", "locks")
    assert proc.returncode == 2
    assert "coherence: for the file transport (a tunnel directory) only, not unix" in proc.stderr
    assert "Traceback" not in proc.stderr
