"""Run the batch scripts of slurm_examples/ under a real (private, single-node) SLURM.

One cluster serves the whole module (tests/slurm_cluster.py). Each test submits an
example *as written*: the job finds ``fileforward`` and ``python3`` on PATH (a
wrapper directory running this checkout's code) and the checkout on PYTHONPATH
(sbatch exports the submitter's environment). HOME is a per-test directory, so
the examples' ``~/.cache/fileforward/...`` files are private to the test.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlsplit

import pytest

from jupyter_api import JupyterClient
from slurm_cluster import (SlurmCluster, free_port, kill_quietly, poll, process_environ,
                           session_processes)
from tests.extras import require_slurm
from tests.tunnel_support import checkout_commands

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "slurm_examples"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    """A private single-node SLURM cluster, stopped (jobs cancelled) at module end."""
    require_slurm()
    with SlurmCluster() as c:
        yield c


class LoginProcess:
    """A login-node command (connect.sh...) in its own session, output to a file."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def output(self) -> str:
        """Everything it printed so far."""
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> "re.Match[str]":
        """Poll its output for ``pattern``; fail if it exits first."""
        def check() -> Optional["re.Match[str]"]:
            found = re.search(pattern, self.output())
            if found is None and self.proc.poll() is not None:
                raise AssertionError("%s exited %s before printing %r:\n%s" % (
                    self.proc.args[0], self.proc.returncode, pattern, self.output()))
            return found

        return poll(check, timeout, "%r from %s" % (pattern, self.proc.args[0]), interval=0.2)

    def wait_exit(self, timeout: float) -> int:
        """Wait for it to exit; fail if any process of its session is left behind."""
        code = self.proc.wait(timeout)
        try:
            poll(lambda: not session_processes(self.proc.pid), 5,
                 "the login side's processes to exit")
        except TimeoutError:
            raise AssertionError("login-side processes left behind: %s"
                                 % session_processes(self.proc.pid))
        return code

    def kill(self) -> None:
        """Teardown: make sure nothing of it survives the test."""
        for pid in session_processes(self.proc.pid):
            kill_quietly(pid)  # it may exit between the scan and the kill
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Workspace:
    """What a user has: a copy of slurm_examples/ (``examples``), a private HOME, and
    PATH with ``fileforward`` and ``jupyter`` (this interpreter's ``-m fileforward``
    / ``-m jupyter``: this checkout's code) and ``python3`` / ``python`` (this
    interpreter). ``env`` is the login side's environment, and through sbatch the
    job's. Jobs are submitted from ``root``; their output files land there.
    """

    def __init__(self, cluster: SlurmCluster, root: Path) -> None:
        self.root = root
        self.examples = Path(shutil.copytree(EXAMPLES, root / "examples"))
        bin_dir = checkout_commands(root / "bin", ("fileforward", "jupyter"))
        home = root / "home"
        home.mkdir()
        if os.geteuid() == 0:  # the cluster runs jobs as root here; Jupyter wants consent
            (home / ".jupyter").mkdir()
            (home / ".jupyter" / "jupyter_server_config.py").write_text(
                "c.ServerApp.allow_root = True\n")
        self.env = dict(cluster.env, HOME=str(home), PYTHONDONTWRITEBYTECODE="1",
                        PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
        self.jobs_dir = home / ".cache" / "fileforward" / "jobs"
        self._login: List[LoginProcess] = []

    def login(self, script: str, *args: str) -> LoginProcess:
        """Run ``examples/script args`` as on the login node."""
        log = self.root / ("login-%d-%s.log" % (len(self._login), Path(script).stem))
        self._login.append(LoginProcess([str(self.examples / script), *args], self.env, self.root,
                                        log))
        return self._login[-1]

    def close(self) -> None:
        """Kill what is left of the login-side commands."""
        for proc in self._login:
            proc.kill()


@pytest.fixture
def ws(cluster: SlurmCluster, tmp_path: Path) -> Iterator[Workspace]:
    """A fresh user workspace for one test."""
    workspace = Workspace(cluster, tmp_path)
    yield workspace
    workspace.close()


def assert_job_left_nothing(cluster: SlurmCluster, job_id: str, ws: Workspace) -> None:
    """No process of the job is alive, and its per-job directory is gone."""
    cluster.wait_no_job_processes(job_id)
    job_dir = ws.jobs_dir / job_id
    leftovers = sorted(str(p) for p in job_dir.rglob("*")) if job_dir.exists() else []
    assert not job_dir.exists(), "left behind: %s %s" % (job_dir, leftovers)


def submit(cluster: SlurmCluster, ws: Workspace, script: str) -> str:
    """sbatch a script given as text; its job id."""
    path = ws.root / ("job-%d.sh" % len(list(ws.root.glob("job-*.sh"))))
    path.write_text(script)
    return cluster.sbatch(path, options=["-o", str(path.with_suffix(".out"))], env=ws.env,
                          cwd=ws.root)


URL = r"http://localhost:(\d+)(\S*)"


@pytest.fixture(scope="module")
def time_limited_job(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Tuple[Workspace, str, LoginProcess]]:
    """A web_app.sbatch job with the shortest time limit SLURM has (a minute),
    started with the module's first test so that the minute passes alongside the
    others; test_time_limit_leaves_nothing, last, checks how it ended."""
    ws = Workspace(cluster, tmp_path_factory.mktemp("time-limit"))
    (ws.root / "page.txt").write_text("served\n")
    job_id = cluster.sbatch(ws.examples / "web_app.sbatch", "python3", "-m", "http.server",
                            "--bind", "127.0.0.1", "{port}", options=["--time=1"],
                            env=ws.env, cwd=ws.root)
    yield ws, job_id, ws.login("connect.sh", job_id)
    ws.close()


def test_web_app_example_serves_a_directory(time_limited_job: Tuple[Workspace, str, LoginProcess]
                                            ) -> None:
    """web_app.sbatch with `python3 -m http.server ... {port}`: a file comes through."""
    _, _, connect = time_limited_job
    port, path = connect.wait_for(URL, timeout=60).groups()
    assert path == "/"
    page = urllib.request.urlopen("http://127.0.0.1:%s/page.txt" % port, timeout=30).read()
    assert page == b"served\n"


@pytest.mark.parametrize("trap, state", [
    ("trap 'trap \"\" TERM; kill 0; wait' EXIT", "COMPLETED"),  # what the examples do
    ('trap "kill 0" EXIT', "FAILED"),  # FileForward's README: kill 0 kills the batch shell too
])
def test_cleanup_idiom(cluster: SlurmCluster, ws: Workspace, trap: str, state: str) -> None:
    """The examples' EXIT trap ends the job COMPLETED and its background work is gone."""
    job_id = submit(cluster, ws, (
        "#!/bin/bash\n"
        "%s\n"
        "sleep 300 &\n"
        # as the examples do, wait for readiness: a signal that reaches a child
        # between fork and exec is lost (bash's handler is still in place).
        "until [ \"$(ps -o comm= -p $!)\" = sleep ]; do sleep 0.05; done\n"
        "echo started \"$SLURM_JOB_ID\"\n"
    ) % trap)
    job = cluster.wait_finished(job_id, timeout=30)
    assert job.state == state, cluster.describe(job_id)
    assert job.output == "started %s\n" % job_id
    cluster.wait_no_job_processes(job_id)


def test_leftover_setsid_process_is_detected(cluster: SlurmCluster, ws: Workspace) -> None:
    """The fixture itself can see leftovers: a setsid process survives the job end."""
    job_id = submit(cluster, ws, (
        "#!/bin/bash\n"
        "setsid sleep 300 </dev/null >/dev/null 2>&1 &\n"
        "until [ \"$(ps -o sid= -p $! | tr -d ' ')\" = \"$!\" ]; do sleep 0.05; done\n"
    ))
    assert cluster.wait_finished(job_id, timeout=30).state == "COMPLETED"
    with pytest.raises(AssertionError, match="sleep 300"):
        cluster.wait_no_job_processes(job_id, timeout=1)
    for proc in cluster.job_processes(job_id):
        os.kill(proc.pid, signal.SIGKILL)
    cluster.wait_no_job_processes(job_id)


def connect_jupyter(connect: LoginProcess) -> JupyterClient:
    """The JupyterLab connect.sh announces, addressed the way the laptop would."""
    port, path = connect.wait_for(URL, timeout=120).groups()
    assert path.startswith("/lab?token="), path
    return JupyterClient("http://127.0.0.1:%s" % port, parse_qs(urlsplit(path).query)["token"][0])


@pytest.mark.timeout(180)
def test_jupyter_example(cluster: SlurmCluster, ws: Workspace) -> None:
    """jupyter.sbatch + connect.sh: token, /api/status, a kernel computes 1+1 = 2;
    File > Shut Down ends the job COMPLETED and leaves nothing behind."""
    job_id = cluster.sbatch(ws.examples / "jupyter.sbatch", env=ws.env, cwd=ws.root)
    connect = ws.login("connect.sh", job_id)
    client = connect_jupyter(connect)
    assert "started" in client.status()
    with pytest.raises(urllib.error.HTTPError, match="403"):
        JupyterClient(client.base_url, "not-the-token").status()
    kernel = client.start_kernel()
    assert client.execute(kernel, "1+1") == "2"

    client.shutdown()
    job = cluster.wait_finished(job_id, timeout=60)
    assert job.state == "COMPLETED", cluster.describe(job_id)
    assert "JupyterLab is up." in job.output
    assert connect.wait_exit(timeout=30) == 0, connect.output()
    assert "job %s has ended" % job_id in connect.output()
    assert_job_left_nothing(cluster, job_id, ws)


@pytest.mark.timeout(180)
def test_jupyter_example_scancel_with_a_busy_kernel_leaves_nothing(
        cluster: SlurmCluster, ws: Workspace) -> None:
    """scancel of a running jupyter.sbatch: CANCELLED, and no process (not even the
    kernel, which Jupyter starts in a session of its own) or tunnel file is left."""
    job_id = cluster.sbatch(ws.examples / "jupyter.sbatch", env=ws.env, cwd=ws.root)
    connect = ws.login("connect.sh", job_id)
    client = connect_jupyter(connect)
    kernel = client.start_kernel()
    started = "import subprocess; subprocess.Popen(['sleep', '300']).pid > 0"
    assert client.execute(kernel, started) == "True"
    assert any(p.cmdline == "sleep 300" for p in cluster.job_processes(job_id))

    cluster.run(["scancel", job_id])
    assert cluster.wait_finished(job_id, timeout=60).state == "CANCELLED"
    assert_job_left_nothing(cluster, job_id, ws)
    assert connect.wait_exit(timeout=30) == 0, connect.output()


APP = """\
# A user's web app: serves one page on 127.0.0.1:PORT (PORT from its command line);
# GET /quit ends it.
import http.server, os, sys, threading

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from job %s, PORT=%s\\n" % (os.environ["SLURM_JOB_ID"], os.environ["PORT"])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/quit":
            threading.Thread(target=server.shutdown).start()

server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.serve_forever()
"""


def test_web_app_example(cluster: SlurmCluster, ws: Workspace) -> None:
    """web_app.sbatch runs the given command with {port} filled in; the page comes
    through connect.sh's port; Ctrl-C on connect.sh leaves the job running, and a
    second connect.sh reaches it again; the app's own exit ends the job COMPLETED,
    with fileforward stopped by the job's trap (not killed), and nothing left."""
    (ws.root / "app.py").write_text(APP)
    # (an argument with slashes: the script must still find its helpers)
    job_id = cluster.sbatch(ws.examples / "web_app.sbatch", "python3", str(ws.root / "app.py"),
                            "{port}", env=ws.env, cwd=ws.root)
    first = ws.login("connect.sh", job_id)
    port, path = first.wait_for(URL, timeout=60).groups()
    assert path == "/"
    page = urllib.request.urlopen("http://127.0.0.1:%s/" % port, timeout=30).read().decode()
    assert re.fullmatch(r"hello from job %s, PORT=\d+\n" % job_id, page), page

    os.killpg(first.proc.pid, signal.SIGINT)  # Ctrl-C
    assert first.wait_exit(timeout=30) == 130, first.output()
    assert cluster.state(job_id) == "RUNNING"
    assert (ws.jobs_dir / job_id / "service.info").exists()

    second = ws.login("connect.sh", job_id, str(free_port()))
    port = second.wait_for(URL, timeout=60).group(1)
    assert urllib.request.urlopen("http://127.0.0.1:%s/" % port, timeout=30).read().decode() == page
    urllib.request.urlopen("http://127.0.0.1:%s/quit" % port, timeout=30).read()

    job = cluster.wait_finished(job_id, timeout=30)
    assert job.state == "COMPLETED", cluster.describe(job_id)
    assert re.search(r"fileforward\[\d+\] INFO stopped", job.output), job.output
    assert second.wait_exit(timeout=30) == 0, second.output()
    assert_job_left_nothing(cluster, job_id, ws)


def test_web_app_example_whose_service_fails_to_start(cluster: SlurmCluster, ws: Workspace) -> None:
    """A service that exits at once: the job ends FAILED saying so, connect.sh gives
    up with a message instead of waiting forever, and nothing is left."""
    job_id = cluster.sbatch(ws.examples / "web_app.sbatch", "python3", "-c", "raise SystemExit(3)",
                            "{port}", env=ws.env, cwd=ws.root)
    connect = ws.login("connect.sh", job_id)
    job = cluster.wait_finished(job_id, timeout=60)
    assert job.state == "FAILED", cluster.describe(job_id)
    assert "exited before listening on port" in job.output
    assert connect.wait_exit(timeout=30) == 1
    assert "job %s is not running" % job_id in connect.output()
    assert_job_left_nothing(cluster, job_id, ws)


class Internet:
    """Stands in for the internet the login node reaches: a web page and an
    OpenAI-compatible chat endpoint on 127.0.0.1, answering with a per-test nonce."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.api_key = "key-" + secrets.token_hex(8)
        self.requests: List[Tuple[str, Optional[str]]] = []
        self.finish = threading.Event()
        internet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                internet.requests.append((self.path, None))
                if self.path == "/slow":  # answers when the test ends
                    internet.finish.wait(60)
                if self.path != "/page.html":
                    return self.send_error(404)
                self.reply("text/html", "<html><body>page %s</body></html>" % internet.nonce)

            def do_POST(self) -> None:
                internet.requests.append((self.path, self.headers.get("Authorization")))
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or \
                        self.headers.get("Authorization") != "Bearer " + internet.api_key:
                    return self.send_error(403)
                question = request["messages"][-1]["content"]
                content = "%s answers %s to %r" % (internet.nonce, request["model"], question[-40:])
                self.reply("application/json", json.dumps({
                    "object": "chat.completion", "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}]}))

            def reply(self, content_type: str, body: str) -> None:
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self) -> Dict[str, str]:
        """What the login node's rpc_server.completion() reads."""
        return {"LLM_BASE_URL": self.url + "/v1", "LLM_API_KEY": self.api_key,
                "LLM_MODEL": "test-model"}

    def close(self) -> None:
        self.finish.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def internet(ws: Workspace) -> Iterator[Internet]:
    """A fake internet on 127.0.0.1; the login side's LLM settings point to it."""
    net = Internet()
    ws.env.update(net.env())
    yield net
    net.close()


def test_rpc_job_example(cluster: SlurmCluster, ws: Workspace, internet: Internet) -> None:
    """run_with_rpc.sh rpc_job.py: the job prints what the login node's functions
    fetched and computed, and the login node's ValueError, as a ValueError."""
    runner = ws.login("run_with_rpc.sh", str(ws.examples / "rpc_job.py"),
                      internet.url + "/page.html")
    job_id = runner.wait_for(r"job (\d+) released", timeout=60).group(1)
    assert runner.wait_exit(timeout=60) == 0, runner.output()
    assert "job %s has ended (1 COMPLETED)" % job_id in runner.output()

    job = cluster.wait_finished(job_id, timeout=10)
    assert job.state == "COMPLETED", cluster.describe(job_id)
    assert (ws.root / ("rpc-demo-%s.out" % job_id)).read_text() == job.output
    page = "<html><body>page %s</body></html>" % internet.nonce
    assert job.output.splitlines() == [
        "fetched %s/page.html: %d characters" % (internet.url, len(page)),
        "summary: %s answers test-model to %r" % (internet.nonce, page[-40:]),
        "the login node refused as expected: ValueError: fetch() takes http:// or https:// "
        "URLs, not 'file:///etc/passwd'",
    ], job.output
    assert internet.requests == [("/page.html", None),
                                 ("/v1/chat/completions", "Bearer " + internet.api_key)]
    assert_job_left_nothing(cluster, job_id, ws)


def test_rpc_ctrl_c_on_the_login_node_cancels_the_job(
        cluster: SlurmCluster, ws: Workspace, internet: Internet) -> None:
    """Ctrl-C to run_with_rpc.sh during a call: the job is cancelled (it cannot
    work without its server), and nothing of either side is left. (And the job
    never saw the LLM API key.)"""
    runner = ws.login("run_with_rpc.sh", str(ws.examples / "rpc_job.py"), internet.url + "/slow")
    job_id = runner.wait_for(r"job (\d+) released", timeout=60).group(1)
    poll(lambda: ("/slow", None) in internet.requests, 60,
         "the job's fetch() to reach the internet")
    job_envs = [process_environ(p.pid) for p in cluster.job_processes(job_id)]
    assert job_envs and all("SLURM_JOB_ID" in env for env in job_envs)
    assert not any("LLM_API_KEY" in env for env in job_envs)  # stays on the login node

    os.killpg(runner.proc.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
    # (the server's worker is stuck in fetch(): run_with_rpc.sh kills it after 10 s)
    assert runner.wait_exit(timeout=30) == 130, runner.output()
    assert "cancelling job %s" % job_id in runner.output()
    assert cluster.wait_finished(job_id, timeout=30).state == "CANCELLED"
    assert_job_left_nothing(cluster, job_id, ws)


def test_rpc_array_example(cluster: SlurmCluster, ws: Workspace, internet: Internet) -> None:
    """run_with_rpc.sh rpc_array.py: all four tasks get their answer from one server."""
    questions = ["question %d of %s" % (i, internet.nonce) for i in range(4)]
    runner = ws.login("run_with_rpc.sh", str(ws.examples / "rpc_array.py"), *questions)
    job_id = runner.wait_for(r"job (\d+) released", timeout=60).group(1)
    assert runner.wait_exit(timeout=90) == 0, runner.output()
    assert "job %s has ended (4 COMPLETED)" % job_id in runner.output()

    assert set(cluster.array_states(job_id).values()) == {"COMPLETED"}
    for task, question in enumerate(questions):
        output = (ws.root / ("rpc-array-%s_%d.out" % (job_id, task))).read_text()
        assert output == "task %d asked %r; answer: %s answers test-model to %r\n" % (
            task, question, internet.nonce, question), output
    assert len(internet.requests) == 4
    assert_job_left_nothing(cluster, job_id, ws)


@pytest.mark.timeout(180)
def test_time_limit_leaves_nothing(cluster: SlurmCluster,
                                   time_limited_job: Tuple[Workspace, str, LoginProcess]) -> None:
    """The time-limited web_app.sbatch job ends TIMEOUT, and leaves no process or
    tunnel file behind; connect.sh notices and exits."""
    ws, job_id, connect = time_limited_job
    job = cluster.wait_finished(job_id, timeout=150)
    assert job.state == "TIMEOUT", cluster.describe(job_id)
    assert_job_left_nothing(cluster, job_id, ws)
    assert connect.wait_exit(timeout=30) == 0, connect.output()


def test_jupyter_client_drives_a_local_jupyterlab(tmp_path: Path) -> None:
    """The Jupyter test tooling itself, against a JupyterLab started here (no SLURM)."""
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, HOME=str(tmp_path), JUPYTER_TOKEN=token)
    with open(tmp_path / "jupyter.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
             "--port=%d" % port, "--ServerApp.port_retries=0", "--allow-root"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = JupyterClient("http://127.0.0.1:%d" % port, token)
        wait_jupyter(client, server, tmp_path / "jupyter.log")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            JupyterClient(client.base_url, "wrong-token").status()
        kernel = client.start_kernel()
        assert client.execute(kernel, "1+1") == "2"
        client.shutdown()
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def wait_jupyter(client: JupyterClient, server: subprocess.Popen, log: Path,
                 timeout: float = 60) -> dict:
    """Poll GET /api/status until it answers; fail early if the server died."""
    def check() -> dict:
        if server.poll() is not None:
            raise AssertionError("jupyter exited %s:\n%s" % (server.returncode, log.read_text()))
        try:
            return client.status()
        except (OSError, urllib.error.URLError):
            return None

    return poll(check, timeout, "JupyterLab at %s" % client.base_url, interval=0.2)
