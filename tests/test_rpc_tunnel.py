"""RPC over the fileforward file transport: no port at all, clients in other processes."""
import json
import subprocess
import sys

import pytest

import rpc
from rpc_helpers import (TESTS, CliServer, client_sigkill_cancels, rpc_env,  # noqa: F401
                         run_json, sigkill_and_restart)


FAST = ("--liveness_timeout", "2")


@pytest.fixture
def tunnel_server(tunnel_dir):
    srv = CliServer("--tunnel_dir", str(tunnel_dir), extra=FAST)
    yield srv
    srv.stop()


def test_calls_streams_and_errors_through_the_tunnel(tunnel_server, tunnel_dir):
    with rpc.connect(tunnel_dir=tunnel_dir) as c:
        assert c.call("add", 1, b=2) == 3
        assert c.call("echo", b"\x07" * (3 << 20)) == b"\x07" * (3 << 20)
        assert list(c.call("count", 10_000)) == list(range(10_000))
        with pytest.raises(ValueError, match="bad thing"):
            c.call("boom")
        assert c.info()["addresses"] == [f"tunnel:{tunnel_dir}"]


def test_default_tunnel_dir_comes_from_the_environment(rpc_env):
    default = rpc_env / "rpc-tunnel"
    assert rpc.default_tunnel_dir() == default
    srv = CliServer(extra=FAST)
    try:
        assert srv.address == f"tunnel:{default}"
        echo = rpc.proxy("echo")
        try:
            assert echo("default dir") == "default dir"
        finally:
            echo.close()
        assert rpc.status()["pid"] == srv.proc.pid
    finally:
        srv.stop()


def test_no_server_in_the_tunnel_dir(tunnel_dir):
    with pytest.raises(rpc.ServerNotRunningError):
        rpc.connect(tunnel_dir=tunnel_dir, connect_timeout=0.5)
    assert rpc.status(tunnel_dir, connect_timeout=0.5)["alive"] is False


def test_10_client_processes_through_the_tunnel(tunnel_server, tunnel_dir):
    code, result, err = run_json([str(TESTS / "rpc_fanout.py"), "--tunnel_dir",
                                  str(tunnel_dir), "--procs", "10", "--calls", "100"])
    assert (code, result) == (0, {"ok": 10, "failed": 0}), err


def test_server_sigkill_through_the_tunnel_then_restart(tunnel_dir, tmp_path):
    sigkill_and_restart(lambda: CliServer("--tunnel_dir", str(tunnel_dir), extra=FAST),
                        rpc.proxy("record", tunnel_dir=tunnel_dir, liveness_timeout=2),
                        tmp_path / "calls.log", pending=2, within=2 + 3)


def test_client_sigkill_through_the_tunnel(tunnel_dir):
    client_sigkill_cancels({"tunnel_dir": str(tunnel_dir)}, liveness_timeout=2)


def test_job_node_calls_the_login_node(nodes):
    """The use case: a job that cannot reach the login node's network calls a function
    there through the shared directory (on "nfs", through two emulated NFS mounts)."""
    login, job = nodes
    srv = CliServer("--tunnel_dir", str(login.tunnel_dir), extra=FAST)
    script = (
        "import json, rpc\n"
        f"with rpc.connect(tunnel_dir={str(job.tunnel_dir)!r}, connect_timeout=30) as c:\n"
        "    print(json.dumps([c.call('add', 1, b=2), sum(c.call('count', 1000)),\n"
        "                      len(c.call('echo', b'x' * (2 << 20))), c.call('pid')]))\n")
    try:
        proc = subprocess.run([*job.prefix, sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == [3, sum(range(1000)), 2 << 20, srv.proc.pid]
    finally:
        srv.stop()
