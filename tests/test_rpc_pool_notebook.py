"""The map's progress in Jupyter: one text display updated in place, not a stderr
line. The detection and the rendering run here; a real kernel runs a tiny notebook
through `jupyter nbconvert --execute`."""
import subprocess

import nbformat
import pytest

import IPython  # noqa: F401 (imported, as in a kernel, yet this is no kernel)
from IPython.core.interactiveshell import InteractiveShell
from rpc.progress import NotebookDisplay, notebook_display
from test_rpc_pool import DEADLINE

pytestmark = pytest.mark.usefixtures("rpc_env")


def test_no_kernel_means_no_notebook_display_even_in_terminal_ipython():
    assert notebook_display() is None  # IPython imported, no shell at all
    shell = InteractiveShell.instance()  # terminal-like IPython: no kernel
    try:
        assert IPython.get_ipython() is shell and notebook_display() is None
    finally:
        InteractiveShell.clear_instance()


class RecordedDisplay:
    """Stands for IPython's display(), which needs a kernel to send to."""

    def __init__(self):
        self.calls = []

    def __call__(self, obj, **kwargs):
        self.calls.append(("display", obj, kwargs))
        return self

    def update(self, obj, **kwargs):
        self.calls.append(("update", obj, kwargs))


def test_notebook_display_is_made_once_then_updated_with_the_line():
    display = RecordedDisplay()
    output = NotebookDisplay(display, "pool: 0/2 done")
    output.show("pool: 1/2 done, ...", final=False)
    output.show("pool: 2/2 done, ...", final=True)
    assert display.calls == [
        ("display", {"text/plain": "pool: 0/2 done"}, {"raw": True, "display_id": True}),
        ("update", {"text/plain": "pool: 1/2 done, ..."}, {"raw": True}),
        ("update", {"text/plain": "pool: 2/2 done, ..."}, {"raw": True}),
    ]


NOTEBOOK_CELL = """\
import subprocess, sys, rpc

def slow_square(x):
    import time
    time.sleep(0.3)
    return x * x

with rpc.Pool(tunnel_dir={pool_dir!r}) as pool:
    worker = subprocess.Popen([sys.executable, "-m", "rpc", "worker", "--pool", {pool_dir!r}])
    print(list(pool.map(slow_square, range(5), progress=True)))
print("worker exit", worker.wait(30))
"""


@pytest.mark.timeout(180)
def test_a_map_in_a_jupyter_kernel_shows_one_updating_display_and_nothing_on_stderr(tmp_path):
    notebook = tmp_path / "pool.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        NOTEBOOK_CELL.format(pool_dir=str(tmp_path / "pool")))]), notebook)
    ran = subprocess.run(
        ["jupyter", "nbconvert", "--to", "notebook", "--execute", "--output", "ran.ipynb",
         f"--ExecutePreprocessor.timeout={DEADLINE:g}", str(notebook)],
        capture_output=True, text=True, timeout=150)
    assert ran.returncode == 0, ran.stderr
    outputs = nbformat.read(tmp_path / "ran.ipynb", as_version=4).cells[0].outputs
    displays = [o for o in outputs if o["output_type"] == "display_data"]
    stderr = "".join(o["text"] for o in outputs if o.get("name") == "stderr")
    stdout = "".join(o["text"] for o in outputs if o.get("name") == "stdout")
    assert len(displays) == 1, outputs  # one display, updated in place to the last line
    assert displays[0]["data"]["text/plain"].startswith("pool: 5/5 done, 0 failed, ")
    assert "pool:" not in stderr
    assert stdout.startswith("[0, 1, 4, 9, 16]\n") and "worker exit 0" in stdout
