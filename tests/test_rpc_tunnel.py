"""RPC over the fileforward file transport: no port at all, clients in other processes.

Most tests run across `nodes` (tests/conftest.py): the server on the login node, the
clients on the job node, either both on this machine ("local") or on the two emulated
NFS nodes ("nfs": the job node has its own mount and cannot reach our network).
"""
import textwrap

import pytest

import rpc
from rpc_helpers import TESTS, CliServer, client_sigkill_cancels, run_json, sigkill_and_restart

pytestmark = pytest.mark.usefixtures("rpc_env")


FAST = ("--liveness_timeout", "2")


def start_login_server(login):
    """The test functions served by `python -m rpc serve` on the login node."""
    return CliServer("--tunnel_dir", str(login.tunnel_dir), extra=FAST, prefix=login.prefix)


@pytest.fixture
def login_server(nodes):
    srv = start_login_server(nodes[0])
    yield srv
    srv.stop()


def on_job_node(job, script, *args, timeout=90):
    """Run a Python script on the job node; it prints one JSON document, returned here."""
    code, out, err = run_json(["-c", textwrap.dedent(script), *map(str, args)],
                              timeout=timeout, prefix=job.prefix)
    assert code == 0, err
    return out


JOB_CALLS = """
    import hashlib, json, os, sys
    import rpc
    digest = lambda b: hashlib.sha256(b).hexdigest()
    big = os.urandom(3 << 20)
    mib = [os.urandom(1 << 20) for _ in range(4)]
    with rpc.connect(tunnel_dir=sys.argv[1], connect_timeout=30) as c:
        echoed = c.call("echo", big)
        together = [f.result(60) for f in [c.submit("echo", m) for m in mib]]
        try:
            c.call("boom")
            error = None
        except ValueError as exc:
            error = str(exc)
        print(json.dumps({
            "add": c.call("add", 1, b=2),
            "big": [len(echoed), digest(echoed) == digest(big)],
            "concurrent": [digest(t) for t in together] == [digest(m) for m in mib],
            "stream": list(c.call("count", 10_000)) == list(range(10_000)),
            "error": error,
            "server": [c.call("pid"), c.info()["addresses"]],
        }))
"""


def test_job_node_calls_the_login_node(nodes, login_server):
    """The use case, with integrity checks: a job that cannot reach the login node's
    network calls functions there (large arguments and results, concurrent calls, a
    stream of 10,000 items, an exception) through the shared directory."""
    login, job = nodes
    assert on_job_node(job, JOB_CALLS, job.tunnel_dir) == {
        "add": 3, "big": [3 << 20, True], "concurrent": True, "stream": True,
        "error": "bad thing",
        "server": [login_server.proc.pid, [f"tunnel:{login.tunnel_dir}"]]}


def test_10_client_processes_on_the_job_node(nodes, login_server):
    login, job = nodes
    code, result, err = run_json([str(TESTS / "rpc_fanout.py"), "--tunnel_dir",
                                  str(job.tunnel_dir), "--procs", "10", "--calls", "100"],
                                 timeout=110, prefix=job.prefix)
    assert (code, result) == (0, {"ok": 10, "failed": 0}), err
    assert rpc.status(login.tunnel_dir)["calls_served"] >= 1000


def test_server_sigkill_then_restart(nodes, tmp_path):
    """Calls pending on the job node (this process, through the job node's mount) when
    the login node's server dies fail with ConnectionLost; the next call through the
    same proxy, made while no server runs, reaches the restarted server; none runs
    twice."""
    login, job = nodes
    sigkill_and_restart(lambda: start_login_server(login),
                        rpc.proxy("record", tunnel_dir=job.tunnel_dir, liveness_timeout=2,
                                  connect_timeout=60),
                        tmp_path / "calls.log", pending=2, within=2 + 8)


def test_client_sigkill_on_the_job_node(nodes):
    login, job = nodes
    client_sigkill_cancels({"tunnel_dir": str(login.tunnel_dir)}, liveness_timeout=2,
                           client_address={"tunnel_dir": str(job.tunnel_dir)},
                           prefix=job.prefix)


def test_no_server_seen_from_the_job_node(nodes):
    """Nothing served yet, then a server SIGKILLed (its files left behind): a client on
    the job node gets ServerNotRunningError, `rpc status` says not alive (exit 1)."""
    login, job = nodes

    def assert_no_server():
        with pytest.raises(rpc.ServerNotRunningError):
            rpc.connect(tunnel_dir=job.tunnel_dir, connect_timeout=0.5)
        code, info, err = run_json(["-m", "rpc", "status", "--tunnel_dir", str(job.tunnel_dir),
                                    "--connect_timeout", "0.5"], prefix=job.prefix)
        assert (code, info["alive"]) == (1, False), err

    assert_no_server()
    srv = start_login_server(login)
    srv.kill()
    srv.stop()
    assert_no_server()


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
