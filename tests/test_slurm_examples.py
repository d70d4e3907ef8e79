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
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlsplit

import pytest

from jupyter_api import JupyterClient
from rpc.poolstatus import pool_status
from slurm_cluster import (Job, SlurmCluster, free_port, kill_quietly, process_environ,
                           session_processes)
from tests.extras import require_net_clients, require_slurm
from tests.net_targets import WHEEL_NAME, git_repository, package_index, serve_directory
from tests.polling import WaitTimeout, wait_until
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

        return wait_until(check, timeout, what="%r from %s" % (pattern, self.proc.args[0]), interval=0.2)

    def wait_exit(self, timeout: float) -> int:
        """Wait for it to exit; fail if any process of its session is left behind."""
        code = self.proc.wait(timeout)
        try:
            wait_until(lambda: not session_processes(self.proc.pid), 5,
                       what="the login side's processes to exit")
        except WaitTimeout:
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
    job's. Jobs are submitted from ``root``; their output files land there. The
    login-side scripts ask squeue about their job every POLL_SECONDS, not every 5 s
    (the default): a test waits less for them to see a job start or end.
    """

    POLL_SECONDS = "0.5"

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
                        FILEFORWARD_POLL_SECONDS=self.POLL_SECONDS,
                        PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))
        self.jobs_dir = home / ".cache" / "fileforward" / "jobs"
        self.logins: List[LoginProcess] = []

    def login(self, script: str, *args: str) -> LoginProcess:
        """Run ``examples/script args`` as on the login node."""
        log = self.root / ("login-%d-%s.log" % (len(self.logins), Path(script).stem))
        self.logins.append(LoginProcess([str(self.examples / script), *args], self.env, self.root,
                                        log))
        return self.logins[-1]

    def close(self) -> None:
        """Kill what is left of the login-side commands."""
        for proc in self.logins:
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
    others (and ends at its limit, not at slurmctld's next check up to 30 s later);
    test_time_limit_leaves_nothing, last, checks how it ended."""
    ws = Workspace(cluster, tmp_path_factory.mktemp("time-limit"))
    (ws.root / "page.txt").write_text("served\n")
    job_id = cluster.sbatch(ws.examples / "web_app.sbatch", "python3", "-m", "http.server",
                            "--bind", "127.0.0.1", "{port}", options=["--time=1"],
                            env=ws.env, cwd=ws.root)
    cluster.time_limit_checks_after_start(job_id)
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


# -- slurm_examples/pool_map.py on the login node, pool_worker.sbatch workers --

#: The shortest time limit SLURM has is a minute; slurmctld enforces it at its next
#: periodic check, up to 30 s later (a second or two once restarted at the job's start).
TIME_LIMIT_END = 60 + 30 + 30  # and a margin for a loaded machine


def start_map(ws: Workspace, key: str, *flags: str) -> Tuple[LoginProcess, Path]:
    """pool_map.py as on the login node; returns it once its pool has made the key."""
    pool_dir = ws.root / "pool"
    login = LoginProcess([sys.executable, str(ws.examples / "pool_map.py"), "--pool",
                          str(pool_dir), "--key-file", key, *flags], ws.env, ws.root,
                         ws.root / "pool_map.log")
    ws.logins.append(login)
    wait_until(lambda: Path(key).exists() and (pool_dir / "server").exists(), 60,
               what="the pool to start")
    return login, pool_dir


def start_workers(cluster: SlurmCluster, ws: Workspace, pool_dir: Path, key: str, *options: str,
                  threads: int = 1) -> str:
    return cluster.sbatch(ws.examples / "pool_worker.sbatch", "--pool", str(pool_dir),
                          "--key-file", key, "--threads", str(threads), options=list(options),
                          env=ws.env, cwd=ws.root)


def when_both_work(pool_dir: Path, key: str, completed: int) -> dict:
    """The pool's info once two array tasks are attached and ``completed`` tasks done."""
    def check() -> Optional[dict]:
        info = pool_status(pool_dir, key_file=key)
        return info if len(info["workers"]) == 2 and info["completed"] >= completed else None
    return wait_until(check, 120, what="two workers mid-map", interval=0.5)


def kill_array_task(cluster: SlurmCluster, job_id: str, task: int) -> None:
    """As a node failure would: SIGKILL, no grace."""
    cluster.run(["scancel", "--batch", "--signal=KILL", f"{job_id}_{task}"])


class TimeLimitedPool:
    """pool_map.py --retries 1 with a two-task worker array under a 1-minute time limit."""

    def __init__(self, ws: Workspace, key: str, login: LoginProcess, pool_dir: Path,
                 array: str) -> None:
        self.ws, self.key, self.login, self.pool_dir, self.array = ws, key, login, pool_dir, array


@pytest.fixture(scope="module")
def time_limited_pool(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[TimeLimitedPool]:
    """pool_map.py (--retries 1) and a pool_worker.sbatch array of two tasks with the
    shortest time limit, started with the module's first tests so that the minute
    passes alongside the others: task 0 is SIGKILLed mid-map, task 1 runs until its
    time limit (SIGTERM, no lead). test_pool_map_completes_right_..., near the end,
    checks how it ended."""
    ws = Workspace(cluster, tmp_path_factory.mktemp("time-limited-pool"))
    key = str(ws.root / "rpc.key")
    login, pool_dir = start_map(ws, key, "--retries", "1", "--seconds", "0.15")
    array = start_workers(cluster, ws, pool_dir, key, "--array=0-1", "--time=1",
                          "--signal=B:TERM@0")  # no lead: the time limit's own SIGTERM
    cluster.time_limit_checks_after_start(array)
    when_both_work(pool_dir, key, completed=20)
    kill_array_task(cluster, array, 0)
    yield TimeLimitedPool(ws, key, login, pool_dir, array)
    ws.close()


def test_pool_map_runs_again_the_task_of_a_killed_array_task(time_limited_pool: TimeLimitedPool
                                                             ) -> None:
    """Task 0 of the time-limited array, SIGKILLed mid-map as a node failure would:
    the pool says it lost the worker's task, and runs it again."""
    login = time_limited_pool.login
    login.wait_for(r"was lost while running task", timeout=60)
    login.wait_for(r"running it again \(attempt 2 of 2\)", timeout=60)


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


PORT_RANGE = (40000, 41000)


def test_web_app_example(cluster: SlurmCluster, ws: Workspace) -> None:
    """web_app.sbatch runs the given command with {port} filled in, a port of
    FILEFORWARD_PORT_RANGE like connect.sh's; the page comes through connect.sh's
    port; Ctrl-C on connect.sh leaves the job running, and a
    second connect.sh reaches it again; the app's own exit ends the job COMPLETED,
    with fileforward stopped by the job's trap (not killed), and nothing left."""
    (ws.root / "app.py").write_text(APP)
    ws.env["FILEFORWARD_PORT_RANGE"] = "%d-%d" % PORT_RANGE  # the job's port and connect.sh's
    # (an argument with slashes: the script must still find its helpers)
    job_id = cluster.sbatch(ws.examples / "web_app.sbatch", "python3", str(ws.root / "app.py"),
                            "{port}", env=ws.env, cwd=ws.root)
    first = ws.login("connect.sh", job_id)
    port, path = first.wait_for(URL, timeout=60).groups()
    assert path == "/"
    page = urllib.request.urlopen("http://127.0.0.1:%s/" % port, timeout=30).read().decode()
    job_port = re.fullmatch(r"hello from job %s, PORT=(\d+)\n" % job_id, page)
    assert job_port, page
    assert all(PORT_RANGE[0] <= int(p) <= PORT_RANGE[1] for p in (port, job_port.group(1))), page

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


@pytest.mark.parametrize("llm", ["configured", "none"])
def test_rpc_job_example(cluster: SlurmCluster, ws: Workspace, internet: Internet,
                         llm: str) -> None:
    """run_with_rpc.sh rpc_job.py: the job prints what the login node's functions
    fetched and computed (the LLM's summary; without an LLM configured there, one
    line saying so), and the login node's ValueError, as a ValueError. The job ends
    COMPLETED either way."""
    page = "<html><body>page %s</body></html>" % internet.nonce
    summary = "summary: %s answers test-model to %r" % (internet.nonce, page[-40:])
    if llm == "none":
        for name in internet.env():
            del ws.env[name]
        summary = NO_LLM
    job = run_to_completion(cluster, ws, "rpc-demo", "run_with_rpc.sh",
                            str(ws.examples / "rpc_job.py"), internet.url + "/page.html")
    assert job.output.splitlines() == [
        "fetched %s/page.html: %d characters" % (internet.url, len(page)),
        summary,
        "the login node refused as expected: ValueError: fetch() takes http:// or https:// "
        "URLs, not 'file:///etc/passwd'",
    ], job.output
    asked = [("/v1/chat/completions", "Bearer " + internet.api_key)] if llm == "configured" else []
    assert internet.requests == [("/page.html", None)] + asked
    assert_job_left_nothing(cluster, job.job_id, ws)


def run_to_completion(cluster: SlurmCluster, ws: Workspace, output_prefix: str, script: str,
                      *args: str) -> Job:
    """Run a login-side script that submits a job and serves it until it ends
    (run_with_rpc.sh, run_with_service.sh); check that the job and the script
    succeed and that the job's output file is OUTPUT_PREFIX-JOBID.out; the job."""
    runner = ws.login(script, *args)
    job_id = runner.wait_for(r"job (\d+) released", timeout=60).group(1)
    assert runner.wait_exit(timeout=90) == 0, runner.output()
    assert "job %s has ended (1 COMPLETED)" % job_id in runner.output()
    job = cluster.wait_finished(job_id, timeout=10)
    assert job.state == "COMPLETED", cluster.describe(job_id)
    assert (ws.root / ("%s-%s.out" % (output_prefix, job_id))).read_text() == job.output
    return job


NO_LLM = ("no summary: no LLM is configured on the login node (set LLM_API_KEY, or "
          "LLM_BASE_URL for a local server, before run_with_rpc.sh)")


def test_rpc_ctrl_c_on_the_login_node_cancels_the_job(
        cluster: SlurmCluster, ws: Workspace, internet: Internet) -> None:
    """Ctrl-C to run_with_rpc.sh during a call: the job is cancelled (it cannot
    work without its server), and nothing of either side is left. (And the job
    never saw the LLM API key.)"""
    runner = ws.login("run_with_rpc.sh", str(ws.examples / "rpc_job.py"), internet.url + "/slow")
    job_id = runner.wait_for(r"job (\d+) released", timeout=60).group(1)
    wait_until(lambda: ("/slow", None) in internet.requests, 60,
               what="the job's fetch() to reach the internet")
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


def test_reverse_example_reaches_a_login_node_service(
        cluster: SlurmCluster, ws: Workspace, internet: Internet) -> None:
    """run_with_service.sh PORT reverse.sbatch curl ...: curl in the job gets the
    login node's page through fileforward --server (job) and --client (login);
    the job ends COMPLETED, the login side reports it, and nothing is left."""
    job = run_to_completion(cluster, ws, "reverse", "run_with_service.sh",
                            str(urlsplit(internet.url).port), str(ws.examples / "reverse.sbatch"),
                            "curl", "-sS", "http://127.0.0.1:{port}/page.html")
    assert "<html><body>page %s</body></html>" % internet.nonce in job.output
    assert re.search(r"fileforward\[\d+\] INFO stopped", job.output), job.output
    assert internet.requests == [("/page.html", None)]
    assert_job_left_nothing(cluster, job.job_id, ws)


def test_reverse_example_scancel_leaves_nothing(cluster: SlurmCluster, ws: Workspace,
                                                internet: Internet) -> None:
    """scancel of a running reverse.sbatch job: CANCELLED; run_with_service.sh
    reports it and fails; no process or tunnel file of either side is left."""
    runner = ws.login("run_with_service.sh", str(urlsplit(internet.url).port),
                      str(ws.examples / "reverse.sbatch"), "sleep", "300")
    job_id = runner.wait_for(r"job (\d+) released", timeout=60).group(1)
    wait_until(lambda: any(p.cmdline == "sleep 300" for p in cluster.job_processes(job_id)), 60,
               what="the job's command to start")
    assert any("fileforward --server" in p.cmdline for p in cluster.job_processes(job_id))

    cluster.run(["scancel", job_id])
    assert cluster.wait_finished(job_id, timeout=60).state == "CANCELLED"
    assert runner.wait_exit(timeout=60) == 1, runner.output()
    assert "job %s has ended (1 CANCELLED)" % job_id in runner.output()
    assert_job_left_nothing(cluster, job_id, ws)


INTERNET = "127.0.0.2"  # the stand-ins' address: not in the proxy variables' NO_PROXY


@pytest.fixture
def local_internet(ws: Workspace) -> Iterator[str]:
    """A package index (one wheel) and a git repository served over http on 127.0.0.2,
    standing in for PyPI and GitHub; the base URL."""
    require_net_clients()
    www = ws.root / "www"
    www.mkdir()
    package_index(www)
    server, port = serve_directory(www, bind=INTERNET)
    yield "http://%s:%d" % (INTERNET, port)
    server.kill()


def test_internet_example_installs_and_clones_through_the_login_node(
        cluster: SlurmCluster, ws: Workspace, local_internet: str) -> None:
    """run_with_internet.sh internet.sbatch CMD: the job's pip installs the index's
    wheel and git clones the repository through `fileforward run --job` and the login
    side's `fileforward serve --job JOBID` (whose log shows each connection it made
    for the job); CMD then uses both. The job ends COMPLETED, nothing is left."""
    repo = git_repository(ws.root / "www")
    ws.env.update(PIP_INSTALL="--user --no-cache-dir --disable-pip-version-check --index-url %s/simple %s"
                  % (local_internet, WHEEL_NAME), GIT_REPO="%s/%s" % (local_internet, repo))
    work = ('python3 -c "import %s; print(\'ANSWER\', %s.ANSWER)" && cat "$CLONE_DIR/README"'
            % (WHEEL_NAME, WHEEL_NAME))
    job = run_to_completion(cluster, ws, "internet", "run_with_internet.sh",
                            str(ws.examples / "internet.sbatch"), "bash", "-c", work)
    clone_dir = ws.root / ("repo-%s" % job.job_id)
    assert "cloned %s/%s into %s\n" % (local_internet, repo, clone_dir) in job.output, job.output
    assert job.output.endswith("ANSWER 42\nthrough the tunnel\n"), job.output
    assert (clone_dir / "README").read_text() == "through the tunnel\n"
    login = ws.logins[-1].output()
    carried = login.count("connected to %s for a requesting process" % local_internet[len("http://"):])
    assert carried >= 3, login  # pip's project page and wheel, git's requests
    assert_job_left_nothing(cluster, job.job_id, ws)


@pytest.mark.timeout(360)
def test_pool_map_completes_right_with_retries_1_despite_a_killed_and_a_timed_out_task(
        cluster: SlurmCluster, time_limited_pool: TimeLimitedPool) -> None:
    """Task 0 was killed mid-map (its task ran again), task 1 runs until its time limit
    (SIGTERM: it finishes its task and leaves), then a late worker job finishes the
    map: 1000 right results, and the job states say what happened."""
    pool = time_limited_pool
    ws, key, login, array = pool.ws, pool.key, pool.login, pool.array
    cluster.wait_finished(array, timeout=TIME_LIMIT_END)
    assert cluster.array_states(array) == {"0": "FAILED", "1": "TIMEOUT"}
    assert pool_status(pool.pool_dir, key_file=key)["completed"] < 1000  # the map goes on
    late = start_workers(cluster, ws, pool.pool_dir, key, "--array=0", threads=32)
    assert login.wait_exit(120) == 0, login.output()
    out = login.output()
    assert "1000 results, all right" in out, out
    assert f"{array}_0 " in out and f"{array}_1 " in out and f"{late}_0 " in out, out
    timed_out = (ws.root / f"pool-worker-{array}_1.out").read_text()
    assert "stopping: no new task" in timed_out and "left the pool" in timed_out, timed_out
    cluster.wait_finished(late, timeout=60)
    assert cluster.state(late) == "COMPLETED"
    for job_id in (array, late):
        cluster.wait_no_job_processes(job_id)


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

    return wait_until(check, timeout, what="JupyterLab at %s" % client.base_url, interval=0.2)


# -- what runs without SLURM: usage errors, the port range, the RPC job's LLM paths --

def no_slurm_env(**extra: str) -> Dict[str, str]:
    """This environment without any SLURM_* (and LLM_*) variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LLM_"))}
    env.update(extra)
    return env


def run_example(argv: Sequence[str], env: Optional[Mapping[str, str]] = None
                ) -> subprocess.CompletedProcess:
    """Run a command (an example script, bash...) outside SLURM; capture its output."""
    return subprocess.run(list(argv), env=dict(env or no_slurm_env()), capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("script, how", [
    ("jupyter.sbatch", "sbatch: sbatch jupyter.sbatch"),
    ("web_app.sbatch", "sbatch: sbatch web_app.sbatch COMMAND [ARGS...]"),
    ("reverse.sbatch",
     "run_with_service.sh: ./run_with_service.sh PORT reverse.sbatch COMMAND [ARGS...]"),
    ("internet.sbatch",
     "run_with_internet.sh: ./run_with_internet.sh internet.sbatch [COMMAND [ARGS...]]"),
])
def test_batch_script_outside_slurm_says_how_to_run_it(script: str, how: str) -> None:
    """`bash jupyter.sbatch` on the login node: one line naming sbatch, exit 2 (not
    `SLURM_JOB_ID: unbound variable`)."""
    result = run_example(["bash", str(EXAMPLES / script)])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "%s: not in a SLURM job; run it with %s\n" % (script, how)


@pytest.mark.parametrize("script, args, usage", [
    ("connect.sh", [], "usage: connect.sh JOBID [PORT]"),
    ("connect.sh", ["not-a-job-id"], "usage: connect.sh JOBID [PORT]"),
    ("connect.sh", ["1", "2", "3"], "usage: connect.sh JOBID [PORT]"),
    ("run_with_rpc.sh", [], "usage: run_with_rpc.sh [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]"),
    ("run_with_service.sh", ["reverse.sbatch"],
     "usage: run_with_service.sh PORT [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]"),
    ("run_with_internet.sh", [], "usage: run_with_internet.sh [SBATCH OPTIONS] JOB_SCRIPT [SCRIPT ARGS]"),
])
def test_login_script_usage(script: str, args: List[str], usage: str) -> None:
    """Wrong arguments to a login-side script: its usage, exit 2, nothing else."""
    result = run_example([str(EXAMPLES / script), *args])
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines()[0] == usage, result.stderr
    assert not re.search(r"line \d+:", result.stderr), result.stderr


def test_connect_help() -> None:
    """connect.sh --help: the usage on stdout, exit 0."""
    result = run_example([str(EXAMPLES / "connect.sh"), "--help"])
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: connect.sh JOBID [PORT]\n"), result.stdout


def test_run_with_service_needs_a_listening_service() -> None:
    """run_with_service.sh for a port nobody listens on: says so before submitting."""
    port = free_port()
    result = run_example([str(EXAMPLES / "run_with_service.sh"), str(port), "reverse.sbatch",
                          "true"])
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "nothing listens on 127.0.0.1:%d here; start the service first\n" % port


def ff_free_port(port_range: str) -> subprocess.CompletedProcess:
    """fileforward_helpers.sh's ff_free_port, with FILEFORWARD_PORT_RANGE=port_range."""
    return run_example(["bash", "-c", 'source "$1" && ff_free_port', "bash",
                        str(EXAMPLES / "fileforward_helpers.sh")],
                       env=no_slurm_env(FILEFORWARD_PORT_RANGE=port_range))


def bind_block(size: int) -> List[socket.socket]:
    """Listening sockets on ``size`` consecutive ports of 127.0.0.1, from 40000 up."""
    for first in range(40000, 60000, size):
        block = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                block.append(sock)
                sock.bind(("127.0.0.1", port))
                sock.listen()
            return block
        except OSError:
            for sock in block:
                sock.close()
    raise AssertionError("no %d consecutive free ports from 40000 to 60000" % size)


def test_free_port_takes_the_free_one_of_the_range() -> None:
    """FILEFORWARD_PORT_RANGE: ff_free_port picks within it, never a port in use,
    and says so when every port of the range is taken."""
    block = bind_block(4)
    try:
        ports = [s.getsockname()[1] for s in block]
        spec = "%d-%d" % (ports[0], ports[-1])
        full = ff_free_port(spec)
        assert (full.returncode, full.stdout) == (1, "")
        assert full.stderr == \
            "fileforward example: no free port in FILEFORWARD_PORT_RANGE=%s\n" % spec
        block[2].close()  # the only free one
        picks = [ff_free_port(spec) for _ in range(5)]
        assert [(r.returncode, r.stdout, r.stderr) for r in picks] == \
            [(0, "%d\n" % ports[2], "")] * 5
    finally:
        for sock in block:
            sock.close()


def test_free_port_spreads_over_the_range() -> None:
    """Picks are within the range and not always the same (jobs sharing a node)."""
    picks = {int(ff_free_port("40000-41000").stdout) for _ in range(5)}
    assert all(40000 <= port <= 41000 for port in picks), picks
    assert len(picks) > 1, picks


@pytest.mark.parametrize("port_range", ["abc", "40000", "41000-40000", "0-10", "40000-70000",
                                        "40000-41000x", "-"])
def test_free_port_rejects_a_malformed_range(port_range: str) -> None:
    """A malformed FILEFORWARD_PORT_RANGE is an error naming it, not some port."""
    result = ff_free_port(port_range)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "fileforward example: FILEFORWARD_PORT_RANGE=%r is not a port range LOW-HIGH with "
        "1 <= LOW <= HIGH <= 65535, e.g. 40000-41000\n" % port_range)


class LoginRpcServer:
    """run_with_rpc.sh's login side without SLURM: ``python -m rpc serve
    rpc_server:FUNCTIONS`` on job JOB_ID's tunnel directory, in a private HOME."""

    JOB_ID = "4242"

    def __init__(self, root: Path, llm_env: Mapping[str, str]) -> None:
        home = root / "home"
        jobs_dir = home / "jobs"
        tunnel_dir = jobs_dir / self.JOB_ID / "rpc"
        tunnel_dir.mkdir(parents=True, mode=0o700)
        self.job_env = no_slurm_env(HOME=str(home), FILEFORWARD_JOBS_DIR=str(jobs_dir),
                                    PYTHONPATH=str(REPO_ROOT), SLURM_JOB_ID=self.JOB_ID)
        server_env = dict(self.job_env, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(EXAMPLES)]),
                          **llm_env)
        del server_env["SLURM_JOB_ID"]
        self.log = root / "rpc-server.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rpc", "serve", "rpc_server:FUNCTIONS",
                 "--tunnel_dir", str(tunnel_dir)], env=server_env, stdout=out,
                stderr=subprocess.STDOUT)
        status = [sys.executable, "-m", "rpc", "status", "--tunnel_dir", str(tunnel_dir)]
        wait_until(lambda: self.proc.poll() is None and run_example(status, self.job_env).returncode == 0,
                   60, what="the RPC server to answer")

    def run_job(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        """Run a job script of slurm_examples/ as the job would (minus SLURM)."""
        return run_example([sys.executable, str(EXAMPLES / script), *args],
                           dict(self.job_env, **env))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def start_login_rpc_server(tmp_path: Path
                           ) -> Iterator[Callable[[Mapping[str, str]], LoginRpcServer]]:
    """Starts a LoginRpcServer with the given LLM settings; stops it after the test."""
    servers: List[LoginRpcServer] = []

    def start(llm_env: Mapping[str, str]) -> LoginRpcServer:
        servers.append(LoginRpcServer(tmp_path, llm_env))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def page_server() -> Iterator[Internet]:
    """The internet the login node reaches (its LLM settings are left to the test)."""
    net = Internet()
    yield net
    net.close()


@pytest.mark.parametrize("llm", ["unreachable", "refusing"])
def test_rpc_job_with_a_failing_llm(start_login_rpc_server: Callable[..., LoginRpcServer],
                                    page_server: Internet, llm: str) -> None:
    """An LLM configured on the login node that does not answer, or answers with an
    HTTP error (urllib's HTTPError cannot be pickled): one line in the job with the
    login node's error, as a URLError, and the job goes on and succeeds."""
    if llm == "unreachable":
        base_url, failure = ("http://127.0.0.1:%d/v1" % free_port(),
                             r"URLError: <urlopen error \[Errno 111\] Connection refused>")
    else:  # the fake internet refuses a wrong API key
        base_url, failure = (page_server.url + "/v1",
                             r"URLError: <urlopen error HTTP 403 Forbidden from %s: <!DOCTYPE.*>"
                             % re.escape(page_server.url + "/v1/chat/completions"))
    server = start_login_rpc_server({"LLM_BASE_URL": base_url, "LLM_API_KEY": "wrong"})
    result = server.run_job("rpc_job.py", page_server.url + "/page.html")
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("fetched ") and "ValueError" in lines[2], lines
    assert re.fullmatch(r"no summary: the LLM at %s failed: %s"
                        % (re.escape(base_url + "/chat/completions"), failure), lines[1]), lines[1]


def test_rpc_array_task_without_an_llm(start_login_rpc_server: Callable[..., LoginRpcServer]
                                       ) -> None:
    """rpc_array.py with no LLM configured on the login node: each task fails with
    one line saying so, no traceback."""
    result = start_login_rpc_server({}).run_job("rpc_array.py", SLURM_ARRAY_TASK_ID="2")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == ("task 2: nothing to ask, the login node has no LLM configured "
                             "(see rpc_server.py)\n")
