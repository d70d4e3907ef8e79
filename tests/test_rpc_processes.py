"""End to end with real processes: the CLI server, stdio, many clients, SIGKILL, 256 MiB."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import rpc
from rpc_funcs import FUNCTIONS
from rpc_helpers import (FUNCS_SPEC, TESTS, CliServer, run_json, client_sigkill_cancels,
                         sigkill_and_restart)
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")


@pytest.fixture
def cli_server(sock):
    srv = CliServer("--unix", str(sock))
    yield srv
    srv.stop()


def test_cli_serves_over_tcp_and_status_reports_it():
    srv = CliServer("--tcp", "127.0.0.1:0")
    try:
        assert srv.address.startswith("tcp://127.0.0.1:")
        with rpc.connect(tcp=srv.tcp) as c:
            assert c.call("add", 2, 3) == 5
            assert c.call("pid") == srv.proc.pid
        code, info, err = run_json(["-m", "rpc", "status", "--tcp", srv.tcp])
        assert code == 0, err
        assert (info["alive"], info["pid"], info["hostname"]) == (True, srv.proc.pid,
                                                                  socket.gethostname())
        assert sorted(info["functions"]) == sorted(FUNCTIONS)
        assert info["functions"]["add"]["signature"] == "(a, b=0)"
        assert info["functions"]["count"]["kind"] == "generator"
        assert (info["calls_served"], info["in_flight"]) == (2, 0)  # status itself is no call
        assert info["versions"]["protocol"] == rpc.PROTOCOL_VERSION
    finally:
        srv.stop()


def test_cli_status_without_server(sock_dir):
    code, info, _ = run_json(["-m", "rpc", "status", "--unix", str(sock_dir / "none"),
                              "--connect_timeout", "0.2"])
    assert code == 1 and info["alive"] is False and info["pid"] is None
    assert f"python -m rpc serve MODULE:ATTR --unix {sock_dir / 'none'}" in info["error"]


def test_sigterm_stops_the_cli_server_and_removes_its_socket(cli_server, sock):
    with rpc.connect(unix=sock) as client:
        assert client.call("echo", 1) == 1
        cli_server.proc.send_signal(signal.SIGTERM)
        assert cli_server.proc.wait(10) == 0
        with pytest.raises(rpc.ConnectionLost):  # the client sees the server gone
            client.call("echo", 2)
    assert not sock.exists()
    log = cli_server.stop()
    assert "closing connection from" in log and "Traceback" not in log, log
    assert rpc.status(unix=sock, connect_timeout=0.2)["alive"] is False


def test_sigterm_stops_the_cli_server_even_with_a_call_that_ignores_cancellation(cli_server, sock):
    with rpc.connect(unix=sock) as client:
        client.submit("stubborn", 60)
        wait_until(lambda: client.info()["in_flight"] == 1, what="the call to start")
        cli_server.proc.send_signal(signal.SIGTERM)
        assert cli_server.proc.wait(10) == 0
    cli_server.stop()  # collects the rest of its log
    assert any("still running" in line for line in cli_server.log)


def test_stdio_subprocess_server():
    rpc.auth.load_key(create=True)  # as on a cluster: the key exists in the shared home
    command = [sys.executable, "-m", "rpc", "serve", FUNCS_SPEC,
               "--stdio"]
    with rpc.connect(command=command) as c:
        assert c.call("noisy", "clean") == "clean"  # its print() goes to stderr
        assert c.call("echo", b"\x00" * 3_000_000) == b"\x00" * 3_000_000
        assert list(c.call("count", 5)) == [0, 1, 2, 3, 4]
        server_pid = c.call("pid")
        assert server_pid != os.getpid()
    wait_until(lambda: not os.path.exists(f"/proc/{server_pid}"), what="server exit")


def test_command_that_fails_is_server_not_running():
    with pytest.raises(rpc.ServerNotRunningError, match="exit code 3"):
        rpc.connect(command=[sys.executable, "-c", "import sys; sys.exit(3)"])


def test_10_processes_x_100_calls(cli_server, sock):
    code, result, err = run_json([str(TESTS / "rpc_fanout.py"), "--unix", str(sock),
                                  "--procs", "10", "--calls", "100"])
    assert (code, result) == (0, {"ok": 10, "failed": 0}), err
    assert rpc.status(unix=sock)["calls_served"] >= 1000


def test_50_client_processes_at_once(cli_server, sock):
    code, result, err = run_json([str(TESTS / "rpc_fanout.py"), "--unix", str(sock),
                                  "--procs", "50", "--calls", "2", "--barrier"])
    assert (code, result) == (0, {"ok": 50, "failed": 0}), err


def test_server_sigkill_mid_call_then_restart(sock, tmp_path):
    """Pending calls fail with ConnectionLost; the next call, made while no server
    runs, reaches the restarted one; none runs twice."""
    sigkill_and_restart(lambda: CliServer("--unix", str(sock)),
                        rpc.proxy("record", unix=sock, connect_timeout=60),
                        tmp_path / "calls.log", pending=3)


def test_client_sigkill_cancels_its_calls(sock):
    client_sigkill_cancels({"unix": str(sock)})


def _vm(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_256_mib_argument_and_result_within_3x_memory(cli_server, sock):
    script = textwrap.dedent(f"""
        import json, rpc, sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_rpc_processes import _vm
        size = 256 << 20
        with rpc.connect(unix={str(sock)!r}, timeout=120) as c:
            server = c.call("pid")
            base = {{"client": _vm("self", "VmRSS"), "server": _vm(server, "VmRSS")}}
            payload = b"\\x01" * size
            result = c.call("echo", payload)
            ok = len(result) == size and result == payload
            peak = {{"client": _vm("self", "VmHWM"), "server": _vm(server, "VmHWM")}}
        print(json.dumps({{"ok": ok, "base": base, "peak": peak, "size": size}}))
        """)
    code, out, err = run_json(["-c", script], timeout=110)
    assert code == 0 and out["ok"], err
    for side in ("client", "server"):
        growth = out["peak"][side] - out["base"][side]
        assert growth <= 3.1 * out["size"], (side, growth / out["size"])
    print(json.dumps({side: round((out["peak"][side] - out["base"][side]) / out["size"], 2)
                      for side in ("client", "server")}))


def short_liveness(transport):
    """A liveness timeout that fails fast: the file transport needs at least 2 s
    (4x its longest poll interval); 1 s elsewhere."""
    return 2.0 if transport == "tunnel" else 1.0


def test_silent_server_is_declared_lost_within_the_liveness_timeout(serve, transport):
    """A frozen server (SIGSTOP: its socket, pipe or tunnel files stay open) must not
    hang the caller."""
    liveness = short_liveness(transport)
    with serve(process=True).connect(liveness_timeout=liveness) as c:
        server_pid = c.call("pid")
        future = c.submit("wait_cancelled", 30)
        wait_until(lambda: c.info()["in_flight"] == 1, what="the call to start")
        os.kill(server_pid, signal.SIGSTOP)
        try:
            # the RPC client's own words, or the file transport's (which notices first)
            with pytest.raises(rpc.ConnectionLost, match="presumed dead|no sign of life"):
                future.result(timeout=liveness + 10)
        finally:
            os.kill(server_pid, signal.SIGCONT)


def test_pings_keep_a_long_call_alive(served, transport):
    liveness = short_liveness(transport)
    with served.connect(liveness_timeout=liveness) as c:
        # ran to its end, not cancelled, though it outlasted the liveness timeout
        assert c.call("wait_cancelled", liveness + 1.0) is False


def test_lazy_proxy_reconnects_in_a_forked_child(cli_server, sock):
    script = textwrap.dedent(f"""
        import json, os, rpc
        pid = rpc.proxy("pid", unix={str(sock)!r})
        server_pid = pid()
        child = os.fork()
        if child == 0:
            os._exit(0 if pid() == server_pid else 1)
        child_ok = os.waitpid(child, 0)[1] == 0
        print(json.dumps({{"child_ok": child_ok, "parent_ok": pid() == server_pid}}))
        """)
    code, out, err = run_json(["-c", script])
    assert code == 0 and out == {"child_ok": True, "parent_ok": True}, err


def test_cli_errors_are_one_clear_line(sock):
    proc = subprocess.run([sys.executable, "-m", "rpc", "serve", "no_such_module:F",
                           "--unix", str(sock)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot load no_such_module:F" in proc.stderr
    assert "Traceback" not in proc.stderr
