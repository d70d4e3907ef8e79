"""`fileforward status` against a real `serve` and real requesting processes
carrying real traffic (curl through -D, a socket through -L to an echo service)."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from fileforward import statusfile
from tests.extras import require_net_clients
from tests.net_targets import serve_directory
from tests.polling import wait_until
from tests import test_netforward
from tests.test_netforward import Side, listening_on, readme_block, requester, with_local_internet
from tests.tunnel_support import Proc, free_port, python, recv_exactly, start_service

PAGE = 300_000  # bytes of the file fetched through -D
ECHOED = 50_000  # bytes sent through -L and echoed back, on a connection left open
HERE = Side(Path("/"), [])  # one machine plays both nodes
home = test_netforward.home  # the fixture: a fresh HOME, this checkout's fileforward on PATH


@pytest.fixture(autouse=True)
def net_clients() -> None:
    """curl carries the traffic these tests count (skips, or fails under CI, without it)."""
    require_net_clients()


def status(tunnel_dir: Path, *args: str, prefix: List[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *python("-m", "fileforward", "status", "--tunnel-dir", str(tunnel_dir), *args)],
                          capture_output=True, text=True, timeout=60)


def report(tunnel_dir: Path) -> Dict[str, Any]:
    done = status(tunnel_dir, "--json")
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def by_role(document: Dict[str, Any], role: str) -> List[Dict[str, Any]]:
    return [p for p in document["processes"] if p["role"] == role]


def forward(process: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return next(f for f in process["forwards"] if f["name"].startswith(prefix))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Proc]:
    proc = Proc(python("-m", "fileforward", "serve", "--tunnel-dir", str(tmp_path / "net")))
    proc.wait_for(lambda line: "INFO serving tunnel" in line)
    yield proc
    proc.kill()


def test_status_shows_both_sides_their_forwards_and_the_bytes_of_real_traffic(serve: Proc, tmp_path: Path) -> None:
    tunnel_dir = tmp_path / "net"
    www = tmp_path / "www"
    www.mkdir()
    (www / "page.bin").write_bytes(b"x" * PAGE)
    http, http_port = serve_directory(www)
    echo_port = free_port()
    echo = start_service("echo", echo_port)
    proc = requester(HERE, tunnel_dir, "-D", "0", "-L", f"0:127.0.0.1:{echo_port}")
    try:
        socks, local = listening_on(proc, "-D")[0], listening_on(proc, "-L")[0]
        fetched = subprocess.run(["curl", "-sS", "--noproxy", "", "-x", f"socks5h://{socks}", "-o", "/dev/null",
                                  "-w", "%{size_download}", f"http://127.0.0.1:{http_port}/page.bin"],
                                 capture_output=True, text=True, timeout=60)
        assert fetched.stdout == str(PAGE), fetched.stderr
        host, port = local.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=30) as held:
            held.sendall(b"e" * ECHOED)
            assert recv_exactly(held, ECHOED) == b"e" * ECHOED

            def settled() -> Dict[str, Any]:
                document = report(tunnel_dir)
                mine, serving = by_role(document, "requester"), by_role(document, "serve")
                if len(mine) == len(serving) == 1 and forward(mine[0], "-L")["from_destination"] == ECHOED and \
                        forward(mine[0], "-D")["open"] == 0 and forward(mine[0], "-D")["from_destination"] > PAGE \
                        and forward(serving[0], "out")["open"] == 1:  # each process publishes on its own tick
                    return document
                return {}

            document = wait_until(settled, 20, what="status to show the traffic")
            assert document["running"] == 2
            ours, = by_role(document, "requester")
            serving, = by_role(document, "serve")
            assert (ours["pid"], ours["host"], ours["state"]) == (proc.popen.pid, socket.gethostname(), "alive")
            assert (serving["pid"], serving["state"]) == (serve.popen.pid, "alive")
            assert ours["last_sign_of_life_s"] is not None and ours["last_sign_of_life_s"] < 30
            through_l, through_d = forward(ours, "-L"), forward(ours, "-D")
            assert through_l["name"] == f"-L {local}" and through_d["name"] == f"-D {socks}"
            assert (through_l["open"], through_l["connections"], through_l["to_destination"]) == (1, 1, ECHOED)
            assert (through_d["connections"], through_d["failed"]) == (1, 0)
            assert 0 < through_d["to_destination"] < 1000  # curl's GET request
            assert PAGE < through_d["from_destination"] < PAGE + 1000  # the page and its headers
            out = forward(serving, "out")  # the serve side carried both connections
            assert (out["connections"], out["open"]) == (2, 1)
            assert out["to_destination"] == through_l["to_destination"] + through_d["to_destination"]
            assert out["from_destination"] == through_l["from_destination"] + through_d["from_destination"]
            table = status(tunnel_dir)
            assert table.returncode == 0, table.stderr
            for expected in (f"requester  {proc.popen.pid}", f"serve      {serve.popen.pid}", f"-L {local}",
                             f"-D {socks}", "alive"):
                assert expected in table.stdout, table.stdout
        assert proc.stop() == 0
        assert by_role(report(tunnel_dir), "requester") == []  # removed at exit: no listing delay on one host
        assert not list(tunnel_dir.glob(f"*{statusfile.PREFIX}*-{proc.popen.pid}*"))
    finally:
        proc.kill()
        echo.kill()
        http.kill()
    assert serve.stop() == 0
    nothing = status(tunnel_dir)
    assert (nothing.returncode, nothing.stdout.startswith(f"tunnel {tunnel_dir}: nothing")) == (1, True), nothing


def killed_requester(tunnel_dir: Path) -> Path:
    """A requester killed with SIGKILL once it published: its status file, left behind."""
    killed = requester(HERE, tunnel_dir, "-D", "0")
    leftover = tunnel_dir / statusfile.file_name(socket.gethostname(), killed.popen.pid)
    wait_until(leftover.exists, 10, what="the requester's status file")
    killed.kill()  # no chance to remove its file
    assert leftover.exists()
    return leftover


def test_a_killed_requester_is_stale_from_another_host_then_dead_here(serve: Proc, tmp_path: Path) -> None:
    """From another host (this one, renamed in a UTS namespace), a process is judged
    by whether its sequence number moves: an idle serve moves it within its heartbeat,
    a SIGKILLed requester never. On its own host, by its pid: the requester is dead,
    and its file is removed."""
    tunnel_dir = tmp_path / "net"
    leftover = killed_requester(tunnel_dir)
    pid = int(leftover.name[:-len(statusfile.SUFFIX)].rsplit("-", 1)[1])
    other_host = subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode == 0
    if other_host:
        elsewhere = ["unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$@"', "sh"]
        remote = status(tunnel_dir, "--json", "--wait", str(statusfile.HEARTBEAT + 2), prefix=elsewhere)
        assert remote.returncode == 0, remote.stderr
        states = {p["role"]: p for p in json.loads(remote.stdout)["processes"]}
        assert states["requester"]["state"] == "stale" and "did not change" in states["requester"]["judged_by"], \
            states
        assert states["serve"]["state"] == "alive" and states["serve"]["last_sign_of_life_s"] is not None, states
        assert leftover.exists()  # another host's process is marked, not removed: its node may only be slow
    document = report(tunnel_dir)
    dead, = by_role(document, "requester")
    assert dead["pid"] == pid and dead["state"] == "dead" and "does not run on this host" in dead["judged_by"], dead
    assert document["running"] == 1 and by_role(document, "serve")[0]["state"] == "alive"
    assert not leftover.exists()
    table = status(tunnel_dir)
    assert table.returncode == 0 and f" {pid} " not in table.stdout, table.stdout  # gone once removed
    if not other_host:
        pytest.skip("unshare --uts is not permitted here: the other-host half (stale, not removed) was not run")


def test_readme_status_block(home, tmp_path: Path) -> None:
    """The README's status example, on free ports, with the default directory: the
    table shows both processes and the forward, which carried the one connection."""
    web, local = free_port(), free_port()
    block = with_local_internet(readme_block("test_readme_status_block", "test_status.py"),
                                {"8000": str(web), "8080": str(local)})
    done = subprocess.run([*home[1], "bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tunnel {home[0] / '.cache' / 'fileforward' / 'net'}" in done.stdout
    rows = {fields[0]: fields for fields in map(str.split, done.stdout.splitlines())
            if len(fields) > 1 and fields[1].replace(":", "").replace(".", "").isdigit()}
    assert rows["serve"][5] == rows["requester"][5] == "alive", done.stdout  # the date is two fields
    forward_row = rows["-L"]
    assert forward_row[1] == f"127.0.0.1:{local}" and forward_row[3:5] == ["1", "0"], done.stdout  # CONNS, FAILED
