"""The READMEs' code runs as written.

Every ```python and ```bash block of README.md and slurm_examples/README.md runs,
in a fresh temporary directory that is also its HOME, unless the line just before
its opening fence marks it (the convention is documented in README.md,
"The README's code is tested"):

    <!-- fragment -->                                   not run
    <!-- covered-by: tests/test_x.py::test_name -->     that test runs it

The RPC and quick start blocks need a second side (a server, a SLURM job); the
tests at the end of this file run them against it, as written.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import rpc
from jupyter_api import JupyterClient
from slurm_cluster import SlurmCluster, free_port
from test_slurm_examples import LoginProcess, Workspace, cluster, ws  # noqa: F401 (fixtures)
from tests.polling import wait_until
from tests.tunnel_support import checkout_commands

REPO_ROOT = Path(__file__).resolve().parent.parent
READMES = ("README.md", "slurm_examples/README.md")
LANGUAGES = ("python", "bash")
FENCE = re.compile(r"^```(\w*)\s*$")
FRAGMENT = "<!-- fragment -->"
COVERED_BY = re.compile(r"^<!-- covered-by: (tests/\S+\.py)((?:::\w+)+) -->$")
BLOCK_TIMEOUT = 60.0
# Variables that would point a block away from the defaults under its own HOME.
ENV_OVERRIDES = ("FILEFORWARD_TUNNEL_DIR", "FILEFORWARD_RPC_TUNNEL_DIR", rpc.KEY_ENV)


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language and code, and the HTML
    comment on the line before its fence (None if that line is no comment)."""

    readme: str
    line: int
    language: str
    code: str
    marker: Optional[str]

    def __str__(self) -> str:
        return "%s:%d" % (self.readme, self.line)

    def covered_by(self) -> Optional[str]:
        """The test named by a covered-by marker ("tests/x.py::test_y"), or None."""
        found = COVERED_BY.match(self.marker or "")
        return found.group(1) + found.group(2) if found else None


def read_blocks(readme: str) -> List[Block]:
    """The python and bash blocks of one README, in order."""
    lines = (REPO_ROOT / readme).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[i - 1].strip() if i else ""
        if opening.group(1) in LANGUAGES:
            blocks.append(Block(readme, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                                before if before.startswith("<!--") else None))
        i = end + 1
    return blocks


BLOCKS = [block for readme in READMES for block in read_blocks(readme)]
RUNNABLE = [block for block in BLOCKS if block.marker is None]
MARKED = [block for block in BLOCKS if block.marker is not None]


def blocks_covered_by(test_name: str) -> List[Block]:
    """The blocks whose marker names `test_name` of this file, in README order."""
    return [b for b in BLOCKS if b.covered_by() == "tests/test_readme.py::" + test_name]


def block_env(workdir: Path) -> Dict[str, str]:
    """The environment a block runs in: HOME is `workdir`/home, and `python3`,
    `python` and `fileforward` on PATH run this checkout's code."""
    home = workdir / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES}
    bin_dir = checkout_commands(workdir / "bin")
    env.update(HOME=str(home), PATH=os.pathsep.join([str(bin_dir), env.get("PATH", "")]))
    return env


def run_block(block: Block, workdir: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """Run a block as a script in `workdir`: python with this interpreter, bash with
    -euo pipefail. Fails the test if it outlives BLOCK_TIMEOUT."""
    script = workdir / ("block-%d.%s" % (block.line, "py" if block.language == "python" else "sh"))
    script.write_text(block.code, encoding="utf-8")
    argv = ([sys.executable, script.name] if block.language == "python"
            else ["bash", "-euo", "pipefail", script.name])
    try:
        return subprocess.run(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("%s did not finish within %.0f s; output so far:\n%s%s" % (
            block, BLOCK_TIMEOUT, exc.stdout or "", exc.stderr or ""))


def assert_ran(block: Block, result: subprocess.CompletedProcess) -> str:
    """The block exited 0; its standard output."""
    assert result.returncode == 0, "%s exited %d:\n%s\n--- stdout ---\n%s--- stderr ---\n%s" % (
        block, result.returncode, block.code, result.stdout, result.stderr)
    return result.stdout


def test_the_readmes_have_blocks_and_every_marker_is_known() -> None:
    """The extraction finds the blocks (a broken parser would run nothing and pass),
    and a marker with a typo is an error, not a block silently left out."""
    for readme in READMES:
        assert read_blocks(readme), "no python or bash block found in %s" % readme
    assert RUNNABLE, "no runnable block: the README test would prove nothing"
    unknown = [(str(b), b.marker) for b in MARKED if b.marker != FRAGMENT and not b.covered_by()]
    assert not unknown, "markers other than %r and '<!-- covered-by: tests/FILE.py::TEST -->': %s" % (
        FRAGMENT, unknown)


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_block_runs(block: Block, tmp_path: Path) -> None:
    """An unmarked block runs as written, exits 0, and prints what its `# prints X`
    comments promise the reader, in that order."""
    stdout = assert_ran(block, run_block(block, tmp_path, block_env(tmp_path)))
    promised = re.findall(r"# prints (.+)$", block.code, flags=re.MULTILINE)
    printed = stdout.splitlines()
    assert [line for line in printed if line in promised] == promised, (
        f"{block} promises to print {promised}; it printed:\n{stdout}")


def defined_tests(path: Path) -> "set[str]":
    """'name' and 'Class::name' of every test function defined in a test file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update("%s::%s" % (node.name, item.name) for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return {name for name in names if name.split("::")[-1].startswith("test")}


@pytest.mark.parametrize("block", [b for b in MARKED if b.covered_by()], ids=str)
def test_covered_by_names_an_existing_test(block: Block) -> None:
    """A covered-by marker names a test that exists (a renamed test breaks this)."""
    path, _, name = block.covered_by().partition("::")
    assert (REPO_ROOT / path).is_file(), "%s: no file %s" % (block, path)
    assert name in defined_tests(REPO_ROOT / path), "%s: %s defines no %s" % (block, path, name)


FAKE_LITELLM = '''"""Stands for litellm here (no LLM, no internet): a reply in litellm's shape."""
from types import SimpleNamespace

WORDS = ["Hi", " from", " the", " login", " node"]

def completion(model, messages, stream=False, **params):
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise TypeError("messages must be a list of dicts with text content: %r" % (messages,))
    if stream:
        return (SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=w))])
                for w in WORDS)
    return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content="".join(WORDS)))])
'''


@pytest.fixture
def llm_server(tmp_path: Path) -> Iterator[Dict[str, str]]:
    """The README's RPC server block running as `python llm_server.py` (litellm
    replaced by a stand-in); yields the environment its clients use."""
    server_blocks = [b for b in blocks_covered_by("test_rpc_blocks_run_against_the_server_block")
                     if "rpc.serve(" in b.code]
    assert len(server_blocks) == 1, "expected one server block, found %s" % server_blocks
    (tmp_path / "llm_server.py").write_text(server_blocks[0].code)
    (tmp_path / "litellm.py").write_text(FAKE_LITELLM)
    env = block_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    cache = Path(env["HOME"]) / ".cache" / "fileforward"
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "llm_server.py"], cwd=tmp_path, env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert server.poll() is None, "llm_server.py exited %s:\n%s" % (
                server.returncode, (tmp_path / "server.log").read_text())
            return (cache / "rpc.key").exists() and rpc.status(
                tunnel_dir=cache / "rpc-tunnel", key_file=cache / "rpc.key")["alive"] is not False
        wait_until(up, 60, what="the README's RPC server to answer", interval=0.2)
        yield env
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
            raise AssertionError("llm_server.py ignored SIGTERM")


def test_rpc_blocks_run_against_the_server_block(llm_server: Dict[str, str], tmp_path: Path) -> None:
    """The RPC client blocks, as written, call the README's server block: the replies
    (plain and streamed) come back, and real messages (no `...`) reach the server."""
    clients = [b for b in blocks_covered_by("test_rpc_blocks_run_against_the_server_block")
               if "rpc.serve(" not in b.code]
    assert len(clients) == 2, clients  # the one-liner, then the explicit client
    one_liner, explicit = (assert_ran(b, run_block(b, tmp_path, llm_server)) for b in clients)
    assert one_liner == "Hi from the login node\nHi from the login node", one_liner
    assert "'functions'" in explicit and "'stream_completion'" in explicit, explicit


@pytest.mark.timeout(240)
def test_quick_start_under_slurm(cluster: SlurmCluster, ws: Workspace) -> None:
    """The quick start's batch script and login-node lines, as written (port 8888
    replaced by a free one on each side): the job keeps running (its `wait`), the printed token
    opens JupyterLab through the tunnel and a kernel computes; scancel ends the job
    and leaves no process behind; Ctrl-C stops the login side."""
    job_script, login_lines = blocks_covered_by("test_quick_start_under_slurm")
    job_port, port = str(free_port()), str(free_port())  # both "nodes" are this machine
    (ws.root / "jupyter-job.sh").write_text(job_script.code.replace("8888", job_port))
    (ws.root / "login.sh").write_text(login_lines.code.replace("8888", port))
    login = LoginProcess(["bash", "-euo", "pipefail", "login.sh"], ws.env, ws.root,
                         ws.root / "login.log")
    try:
        job_id = login.wait_for(r"Submitted batch job (\d+)", timeout=30).group(1)
        url = login.wait_for(r"open (http://localhost:%s/lab\?token=(\w+)) on your laptop" % port,
                             timeout=30)
        client = JupyterClient("http://127.0.0.1:%s" % port, url.group(2))

        def answers() -> Optional[dict]:
            assert cluster.state(job_id) in ("PENDING", "RUNNING"), cluster.describe(job_id)
            try:
                return client.status()
            except (OSError, urllib.error.URLError):
                return None
        wait_until(answers, 120, what="JupyterLab through the quick start's tunnel", interval=0.5)
        assert client.execute(client.start_kernel(), "1+1") == "2"
        assert cluster.state(job_id) == "RUNNING"

        cluster.run(["scancel", job_id], env=ws.env)
        assert cluster.wait_finished(job_id, timeout=60).state == "CANCELLED"
        cluster.wait_no_job_processes(job_id, timeout=30)
        os.killpg(login.proc.pid, signal.SIGINT)  # Ctrl-C in the login node's terminal
        assert login.wait_exit(timeout=30) == 0, login.output()
    finally:
        login.kill()


@pytest.mark.timeout(600)
def test_first_screen_in_a_fresh_venv(tmp_path: Path) -> None:
    """The README's first two commands, as written, in a new virtual environment and
    a copy of this checkout, with nothing of this test run on the path: the install
    works (it fetches cloudpickle and the build backend from the package index) and
    the demo passes."""
    (block,) = blocks_covered_by("test_first_screen_in_a_fresh_venv")
    venv, checkout = tmp_path / "venv", tmp_path / "checkout"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    shutil.copytree(REPO_ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "__pycache__", "build", ".pytest_cache"))
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES + ("PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=os.pathsep.join([str(venv / "bin"), env.get("PATH", "")]), VIRTUAL_ENV=str(venv),
               HOME=str(tmp_path), PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=checkout, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=540)
    stdout = assert_ran(block, result)
    assert "every byte checked" in stdout and "OK: the tunnel works here" in stdout, stdout
    assert (venv / "bin" / "fileforward").exists()
