"""End to end: `fileforward serve` and its requesting processes (-L, -R, -D,
--http-proxy, env, run), as real subprocesses, with real clients (curl, pip, git).

Topology: the internet's stand-ins (tests/net_targets.py) and `fileforward serve`
run on the login node; requesting processes and the clients run on the job node.
On the NFS harness ("nfs") the job node has a network namespace of its own and
cannot reach the login node's loopback: every byte a client gets came through
the tunnel. Locally ("local"), the clients are told to use the proxy (curl -x
with --noproxy '', pip's variables for a 127.0.0.2 index, which NO_PROXY does not
exempt), and the requester's DEBUG lines show the connections it carried.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import pytest

from tests.extras import require_net_clients, require_nfs_harness
from tests.net_targets import WHEEL_NAME, git_repository, package_index, serve_directory
from tests.polling import wait_until
from tests.tunnel_support import Proc, free_port, python, recv_exactly, start_service

INTERNET = "127.0.0.2"  # where the plain-http stand-ins listen (not in NO_PROXY)
BIG_MIB = {"local": 200, "nfs": 16}
CLIENT_TIMEOUT = 90

ECHO_CLIENT = """
import hashlib, os, socket, sys
where, size = sys.argv[1], int(sys.argv[2])
if where.startswith("/"):
    sock = socket.socket(socket.AF_UNIX); sock.connect(where)
else:
    host, port = where.rsplit(":", 1); sock = socket.create_connection((host, int(port)), timeout=60)
data = os.urandom(size)
sock.sendall(data); sock.shutdown(socket.SHUT_WR)
back = bytearray()
while True:
    chunk = sock.recv(1 << 20)
    if not chunk:
        break
    back += chunk
print("ECHO", "ok" if bytes(back) == data else "MISMATCH %d of %d" % (len(back), size))
"""


class Side:
    """One node: where it sees the shared directory, and how to run a command there."""

    def __init__(self, shared: Path, prefix: Sequence[str]) -> None:
        self.shared = shared
        self.prefix = list(prefix)

    def start(self, *argv: str) -> Proc:
        return Proc(list(argv), self.prefix)

    def fileforward(self, *args: str) -> Proc:
        return self.start(*python("-m", "fileforward", *args))

    def run(self, *argv: str, timeout: float = CLIENT_TIMEOUT) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *argv], capture_output=True, text=True, timeout=timeout,
                              env=_without_proxy_variables())


def _without_proxy_variables() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def requester(side: Side, tunnel_dir: Path, *args: str) -> Proc:
    """A requesting process, once it listens (it logs the tunnel it uses last)."""
    proc = side.fileforward("--tunnel-dir", str(tunnel_dir), "-v", *args)
    proc.wait_for(lambda line: "requests go through tunnel" in line, timeout=30)
    return proc


def listening_on(proc: Proc, option: str) -> List[str]:
    """The addresses a requester logged for `option` ("-L", "-D", "--http-proxy")."""
    pattern = re.compile(rf"INFO {re.escape(option)} (\S+): ")
    return [m.group(1) for m in map(pattern.search, proc.lines) if m]


def exports(proc: Proc) -> Dict[str, str]:
    """The variables a requester printed."""
    return dict(line[len("export "):].split("=", 1) for line in proc.lines if line.startswith("export "))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Net:
    """The login node's targets and `serve`, and one requester with authenticated proxies on the job node."""

    def __init__(self, kind: str, login: Side, job: Side, www: Path, stack: contextlib.ExitStack) -> None:
        self.kind, self.login, self.job, self.www = kind, login, job, www
        self.big = www / "big.bin"
        with open(self.big, "wb") as out:
            for _ in range(BIG_MIB[kind]):
                out.write(os.urandom(1 << 20))
        self.big_sha = sha256(self.big)
        self.small = www / "small.bin"
        self.small.write_bytes(os.urandom(8 << 20))
        package_index(www)
        self.repo = git_repository(www)
        http, self.http_port = serve_directory(www, bind=INTERNET)
        stack.callback(http.kill)
        https_root = www / "tls"
        https_root.mkdir()
        (https_root / "hello.txt").write_text("hello over https\n")
        https, self.https_port = serve_directory(https_root, https=True)
        stack.callback(https.kill)
        self.cacert = https_root / "cert.pem"
        if kind == "nfs":  # the job node cannot reach the internet's stand-ins but through the tunnel
            direct = job.run("curl", "-sS", "--noproxy", "*", "--max-time", "5", self.url("simple/"))
            assert direct.returncode != 0, direct.stdout
        self.serve = self.start_serve("net")
        stack.callback(self.serve.kill)
        self.proxy = requester(job, self.job_dir("net"), "-D", "0", "--http-proxy", "0", "--proxy-auth", "auto")
        stack.callback(self.proxy.kill)
        self.proxy.wait_for(lambda line: line.startswith("export no_proxy="))
        self.env = exports(self.proxy)

    def login_dir(self, name: str) -> Path:
        return self.login.shared / name

    def job_dir(self, name: str) -> Path:
        return self.job.shared / name

    def start_serve(self, name: str, *args: str) -> Proc:
        proc = self.login.fileforward("serve", "--tunnel-dir", str(self.login_dir(name)), *args)
        proc.wait_for(lambda line: "INFO serving tunnel" in line)
        return proc

    def url(self, path: str) -> str:
        return f"http://{INTERNET}:{self.http_port}/{path}"

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        """curl on the job node, never bypassing the proxy it is given."""
        return self.job.run("curl", "-sS", "--noproxy", "", "--max-time", str(CLIENT_TIMEOUT - 10), *args)


@pytest.fixture(scope="module", params=["local", "nfs"])
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    require_net_clients()
    with contextlib.ExitStack() as stack:
        if request.param == "local":
            shared = tmp_path_factory.mktemp("shared")
            login, job = Side(shared, []), Side(shared, [])
        else:
            require_nfs_harness()
            from tests.nfs_harness.cluster import start_two_nodes
            pair = stack.enter_context(start_two_nodes(tmp_path_factory.mktemp("nodes")))
            login, job = Side(pair.a, []), Side(pair.b, pair.b_prefix)
        yield Net(request.param, login, job, tmp_path_factory.mktemp("www"), stack)


def test_curl_through_socks_and_http_proxy_plain_and_https(net: Net, tmp_path: Path) -> None:
    """A large file through -D (names resolved on the serve side) and --http-proxy
    (absolute-form http), and https through both (CONNECT), byte for byte."""
    socks, http = net.env["ALL_PROXY"], net.env["HTTP_PROXY"]
    assert socks.startswith("socks5h://ff-") and http.startswith("http://ff-")
    for name, proxy in (("socks", socks), ("http", http)):
        out = tmp_path / f"{name}.bin"
        done = net.curl("-x", proxy, "-o", str(out), net.url(net.big.name))
        assert done.returncode == 0, done.stderr
        assert sha256(out) == net.big_sha
        tls = net.curl("-x", proxy, "--cacert", str(net.www / "tls" / "cert.pem"),
                       f"https://localhost:{net.https_port}/hello.txt")
        assert (tls.returncode, tls.stdout) == (0, "hello over https\n"), tls.stderr
    for option in ("-D", "--http-proxy"):
        for destination in (f"{INTERNET}:{net.http_port}", f"localhost:{net.https_port}"):
            net.proxy.wait_for(lambda line: re.search(rf"DEBUG {option} 127\.0\.0\.1:\d+ to {destination}: "
                                                      rf"connection ended: \d+ bytes", line) is not None)


def test_proxy_credentials_are_required_and_checked(net: Net) -> None:
    http_port = listening_on(net.proxy, "--http-proxy")[0].rsplit(":", 1)[1]
    socks_port = listening_on(net.proxy, "-D")[0].rsplit(":", 1)[1]
    for proxy in (f"http://127.0.0.1:{http_port}", f"http://ff-nobody:wrong@127.0.0.1:{http_port}"):
        refused = net.curl("-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, net.url("simple/"))
        assert refused.stdout == "407", (refused.stdout, refused.stderr)
    wrong = net.curl("-o", "/dev/null", "-x", f"socks5h://ff-nobody:wrong@127.0.0.1:{socks_port}",
                     net.url("simple/"))
    assert wrong.returncode == 97, (wrong.returncode, wrong.stderr)  # CURLE_PROXY: the SOCKS handshake failed
    no_auth = net.curl("-o", "/dev/null", "-x", f"socks5h://127.0.0.1:{socks_port}", net.url("simple/"))
    assert no_auth.returncode == 97, (no_auth.returncode, no_auth.stderr)
    net.proxy.wait_for(lambda line: "WARNING -D" in line and "authentication failed" in line)
    net.proxy.wait_for(lambda line: "WARNING --http-proxy" in line and "answered 407" in line)


def test_pip_install_through_fileforward_run(net: Net, tmp_path: Path) -> None:
    """`fileforward run -- pip install`: the variables lead pip to the HTTP proxy,
    which carried the index and the wheel (its DEBUG lines say so)."""
    target = tmp_path / "site"
    done = net.job.run(*python("-m", "fileforward", "run", "-v", "--tunnel-dir", str(net.job_dir("net")), "--",
                               sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                               "--no-deps", "--target", str(target), "--index-url", net.url("simple"), WHEEL_NAME))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (target / f"{WHEEL_NAME}.py").read_text() == "ANSWER = 42\n"
    carried = re.findall(rf"--http-proxy 127\.0\.0\.1:\d+ to {re.escape(INTERNET)}:{net.http_port}: connection ended",
                         done.stderr)
    assert len(carried) >= 2, done.stderr  # the project page and the wheel


def test_git_clone_through_the_http_proxy(net: Net, tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    done = net.job.run("git", "-c", f"http.proxy={net.env['HTTP_PROXY']}", "clone", "-q", net.url(net.repo),
                       str(clone))
    assert done.returncode == 0, done.stderr
    assert (clone / "README").read_text() == "through the tunnel\n"


def test_local_and_remote_forwards_both_ways_at_once(net: Net, tmp_path: Path) -> None:
    """-L (job -> login) and -R (login -> job), TCP and Unix-socket listeners (mode
    0600), carrying data in both directions at the same time."""
    login_echo, job_echo = free_port(), free_port()
    services = [start_service("echo", login_echo, net.login.prefix), start_service("echo", job_echo, net.job.prefix)]
    l_sock, r_sock = tmp_path / "l.sock", tmp_path / "r.sock"
    proc = requester(net.job, net.job_dir("net"), "-L", f"0:127.0.0.1:{login_echo}",
                     "-L", f"{l_sock}:127.0.0.1:{login_echo}",
                     "-R", f"0:127.0.0.1:{job_echo}", "-R", f"{r_sock}:127.0.0.1:{job_echo}")
    try:
        remote_tcp = proc.wait_for(lambda line: "the serve side listens on 127.0.0.1:" in line)
        proc.wait_for(lambda line: f"the serve side listens on {r_sock}" in line)
        remote_port = int(re.search(r"listens on 127\.0\.0\.1:(\d+)", remote_tcp).group(1))
        for path in (l_sock, r_sock):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        local_tcp = listening_on(proc, "-L")[0]
        size = 4 << 20
        job_side = [net.job.start(*python("-c", ECHO_CLIENT, where, str(size))) for where in (local_tcp, str(l_sock))]
        login_side = [net.login.start(*python("-c", ECHO_CLIENT, where, str(size)))
                      for where in (f"127.0.0.1:{remote_port}", str(r_sock))]
        for client in job_side + login_side:
            client.wait_for(lambda line: line.startswith("ECHO"), timeout=CLIENT_TIMEOUT)
            assert "ECHO ok" in client.output, client.output
    finally:
        assert proc.stop() == 0
        for service in services:
            service.kill()
    net.serve.wait_for(lambda line: "stopped listening on 127.0.0.1:%d" % remote_port in line, timeout=40)


def test_four_requesters_share_one_serve_and_come_and_go(net: Net, tmp_path: Path) -> None:
    """Four -D processes on one serve; one killed and one stopped while another
    downloads; a newcomer works at once; the download and the others are untouched."""
    procs = [requester(net.job, net.job_dir("net"), "-D", "0") for _ in range(4)]
    try:
        ports = [listening_on(p, "-D")[0] for p in procs]
        slow = tmp_path / "slow.bin"
        download = net.job.start("curl", "-sS", "--noproxy", "", "--limit-rate", "2M", "-x", f"socks5h://{ports[1]}",
                                 "-o", str(slow), "-w", "DONE %{http_code}\\n", net.url(net.small.name))
        wait_until(lambda: slow.exists() and slow.stat().st_size > 0, 30, what="the slow download to start")
        procs[0].popen.kill()
        assert procs[2].stop() == 0
        procs.append(requester(net.job, net.job_dir("net"), "-D", "0"))
        for port in (ports[3], listening_on(procs[4], "-D")[0]):
            page = net.curl("-x", f"socks5h://{port}", net.url("simple/"))
            assert page.returncode == 0 and WHEEL_NAME in page.stdout, page.stderr
        download.wait_for(lambda line: line.startswith("DONE"), timeout=CLIENT_TIMEOUT)
        assert "DONE 200" in download.output and sha256(slow) == sha256(net.small)
    finally:
        for proc in procs:
            proc.kill()


def test_env_prints_the_newest_live_proxy(net: Net) -> None:
    def env() -> subprocess.CompletedProcess:
        return net.job.run(*python("-m", "fileforward", "env", "--tunnel-dir", str(net.job_dir("net"))))

    first = env()
    assert first.returncode == 0, first.stderr
    assert f"export HTTP_PROXY={net.env['HTTP_PROXY']}" in first.stdout.splitlines()
    assert "export no_proxy=localhost,127.0.0.1" in first.stdout.splitlines()
    newer = requester(net.job, net.job_dir("net"), "--http-proxy", "0")
    try:
        own = f"export http_proxy=http://{listening_on(newer, '--http-proxy')[0]}"
        assert own in env().stdout.splitlines()
        proxy_files = list(net.job_dir("net").glob(f"proxy-*-{newer.popen.pid}.json"))
        assert len(proxy_files) == 1 and stat.S_IMODE(proxy_files[0].stat().st_mode) == 0o600
    finally:
        assert newer.stop() == 0
    assert not proxy_files[0].exists()
    assert f"export HTTP_PROXY={net.env['HTTP_PROXY']}" in env().stdout.splitlines()


@pytest.mark.parametrize("net", ["local"], indirect=True)  # the NFS harness adds nothing to these cases
def test_permit_refusal_is_an_error_for_the_application_and_logged_on_both_sides(net: Net) -> None:
    serve = net.start_serve("permit", "--permit", f"{INTERNET}:*")
    proc = requester(net.job, net.job_dir("permit"), "-D", "0", "--http-proxy", "0",
                     "-L", f"0:127.0.0.1:{net.https_port}")
    try:
        socks, http, local = (listening_on(proc, option)[0] for option in ("-D", "--http-proxy", "-L"))
        refused = f"https://localhost:{net.https_port}/hello.txt"
        started = time.monotonic()
        by_http = net.curl("-o", "/dev/null", "-w", "%{http_connect}", "-x", f"http://{http}", refused)
        assert by_http.stdout == "403", (by_http.stdout, by_http.stderr)  # the answer to CONNECT
        by_socks = net.curl("-x", f"socks5h://{socks}", refused)
        assert by_socks.returncode == 97 and "(2)" in by_socks.stderr, by_socks.stderr  # "not allowed by ruleset"
        by_forward = net.curl("--cacert", str(net.cacert), f"https://localhost:{local.rsplit(':', 1)[1]}/")
        assert by_forward.returncode in (35, 56), by_forward.stderr  # the connection was reset, not answered
        assert time.monotonic() - started < 30
        allowed = net.curl("-x", f"http://{http}", net.url("simple/"))
        assert allowed.returncode == 0 and WHEEL_NAME in allowed.stdout
        serve.wait_for(lambda line: f"WARNING refused a connection to localhost:{net.https_port}: not permitted"
                       in line)
        proc.wait_for(lambda line: "WARNING -L" in line and "not permitted" in line)
        proc.wait_for(lambda line: "WARNING -D" in line and "not permitted" in line)
    finally:
        proc.kill()
        serve.kill()


@pytest.mark.parametrize("net", ["local"], indirect=True)
def test_a_requester_started_before_serve_gets_its_forwards_and_keeps_them_across_a_restart(net: Net) -> None:
    """-D fails with a SOCKS error and a log line naming the fix while no serve
    runs; -R is asked again until a serve listens, and again after a restart."""
    echo = free_port()
    service = start_service("echo", echo, net.job.prefix)
    proc = requester(net.job, net.job_dir("order"), "--connect-timeout", "2", "-D", "0",
                     "-R", f"0:127.0.0.1:{echo}")
    serve = None
    try:
        socks = listening_on(proc, "-D")[0]
        early = net.curl("-x", f"socks5h://{socks}", net.url("simple/"))
        assert early.returncode == 97, early.stderr
        proc.wait_for(lambda line: "WARNING -D" in line and "no fileforward serve answers" in line)
        proc.wait_for(lambda line: "WARNING -R" in line and "fileforward serve --tunnel-dir" in line)
        for attempt in range(2):  # the first serve, then its successor
            serve = net.start_serve("order")
            line = serve.wait_for(lambda line: "-R: listening on 127.0.0.1:" in line, timeout=30)
            with socket.create_connection(("127.0.0.1", int(line.rsplit(":", 1)[1].split()[0])), timeout=30) as sock:
                sock.sendall(b"ping %d" % attempt)
                sock.shutdown(socket.SHUT_WR)
                assert recv_exactly(sock, 6) == b"ping %d" % attempt
            page = net.curl("-x", f"socks5h://{socks}", net.url("simple/"))
            assert page.returncode == 0 and WHEEL_NAME in page.stdout, page.stderr
            assert serve.stop() == 0
    finally:
        proc.kill()
        service.kill()
        if serve is not None:
            serve.kill()


@pytest.mark.parametrize("net", ["local"], indirect=True)
@pytest.mark.parametrize("command, status", [("import sys; sys.exit(7)", 7),
                                             ("import os; print(os.environ['HTTPS_PROXY'])", 0)])
def test_run_passes_the_exit_status_and_the_variables(net: Net, command: str, status: int) -> None:
    done = net.job.run(*python("-m", "fileforward", "run", "--tunnel-dir", str(net.job_dir("net")),
                               "--", sys.executable, "-c", command))
    assert done.returncode == status, done.stderr
    if status == 0:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+\n", done.stdout)


def test_run_of_a_missing_command_is_127_and_env_without_proxy_is_1(tmp_path: Path) -> None:
    run = subprocess.run(python("-m", "fileforward", "run", "--tunnel-dir", str(tmp_path / "t"), "--",
                                "no-such-command-here"), capture_output=True, text=True, timeout=60)
    assert run.returncode == 127 and "command not found" in run.stderr
    env = subprocess.run(python("-m", "fileforward", "env", "--tunnel-dir", str(tmp_path / "t")),
                         capture_output=True, text=True, timeout=60)
    assert env.returncode == 1 and "no proxy is running" in env.stderr and env.stdout == ""


def readme_block(test_name: str, test_file: str = "test_netforward.py") -> str:
    """The README's bash block marked as covered by `test_name` of `test_file` (default: this file)."""
    marker = f"<!-- covered-by: tests/{test_file}::{test_name} -->"
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    return re.search(re.escape(marker) + r"\n```bash\n(.*?)```", text, flags=re.DOTALL).group(1)


def with_local_internet(block: str, replacements: Dict[str, str]) -> str:
    """The block with the internet's addresses replaced by the stand-ins (each must occur)."""
    for old, new in replacements.items():
        assert old in block, f"the README block no longer contains {old!r}:\n{block}"
        block = block.replace(old, new)
    return block


@pytest.fixture
def home(tmp_path: Path) -> "tuple[Path, List[str]]":
    """A fresh HOME (so the default tunnel directories are new), and an argv prefix
    running a command with it and with this checkout's `fileforward` first on PATH."""
    from tests.tunnel_support import checkout_commands
    bin_dir = checkout_commands(tmp_path / "bin")
    (tmp_path / "home").mkdir()
    path = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    return tmp_path / "home", ["env", f"HOME={tmp_path / 'home'}", f"PATH={path}"]


def default_serve(home: "tuple[Path, List[str]]") -> Proc:
    proc = Proc(["fileforward", "serve", "-v"], home[1])
    proc.wait_for(lambda line: "INFO serving tunnel" in line)
    assert str(home[0] / ".cache" / "fileforward" / "net") in proc.output
    return proc


@pytest.mark.parametrize("net", ["local"], indirect=True)
def test_readme_internet_commands_with_the_default_directory(net: Net, home, tmp_path: Path) -> None:
    """The README's two commands, as written but for the package (numpy -> the
    stand-in index's wheel), meet in the default directory; serve's DEBUG lines
    show it connected to the index for the job."""
    serve_line, run_line = [line.split("#")[0].strip() for line in readme_block(
        "test_readme_internet_commands_with_the_default_directory").splitlines()]
    assert serve_line == "fileforward serve"
    serve = default_serve(home)
    try:
        job = with_local_internet(run_line, {"pip install numpy": (
            f"{sys.executable} -m pip install --no-cache-dir --disable-pip-version-check --target {tmp_path / 'site'} "
            f"--index-url {net.url('simple')} {WHEEL_NAME}")})
        done = subprocess.run([*home[1], "bash", "-c", job], capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                              env=_without_proxy_variables())
        assert done.returncode == 0, done.stdout + done.stderr
        assert (tmp_path / "site" / f"{WHEEL_NAME}.py").read_text() == "ANSWER = 42\n"
        serve.wait_for(lambda line: f"connected to {INTERNET}:{net.http_port} for a requesting process" in line)
    finally:
        serve.kill()


@pytest.mark.parametrize("net", ["local"], indirect=True)
def test_readme_proxy_block_with_credentials(net: Net, home, tmp_path: Path) -> None:
    """The README's long-running proxy block runs (free ports, and the stand-ins for
    PyPI and GitHub): pip, git and curl get through, and `kill %1` stops the proxy."""
    block = with_local_internet(readme_block("test_readme_proxy_block_with_credentials"), {
        "3128": str(free_port()), "1080": str(free_port()),
        "pip install --user requests": f"{sys.executable} -m pip install --target {tmp_path / 'site'} "
                                       f"--no-cache-dir --disable-pip-version-check "
                                       f"--index-url {net.url('simple')} {WHEEL_NAME}",
        "https://github.com/psf/requests.git": net.url(net.repo),
        "https://pypi.org/simple/": net.url("simple/")})
    serve = default_serve(home)
    try:
        done = subprocess.run([*home[1], "bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, capture_output=True,
                              text=True, timeout=CLIENT_TIMEOUT, env=_without_proxy_variables())
        assert done.returncode == 0, done.stdout + done.stderr
        assert "200" in done.stdout.splitlines()
        assert (tmp_path / "site" / f"{WHEEL_NAME}.py").exists(), done.stderr  # --target: works in a venv too
        assert (tmp_path / "repo" / "README").read_text() == "through the tunnel\n"
        carried = serve.output.count(f"connected to {INTERNET}:{net.http_port} for a requesting process")
        assert carried >= 4, serve.output  # pip's page and wheel, git's requests, curl's page
        wait_until(lambda: not list((home[0] / ".cache" / "fileforward" / "net").glob("proxy-*.json")), 10,
                   what="the proxy file to go with the proxy (kill %1)")
    finally:
        serve.kill()
