"""JupyterLab in a real browser, through the tunnel: what most users come for.

JupyterLab runs behind ``fileforward --client``; headless Chromium (Debian's
``chromium``, driven by playwright pointed at it: nothing is downloaded) opens a
notebook through ``fileforward --server`` and runs a cell. Every request the page
makes goes to the tunnel's port; none may fail.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Iterator, List
from urllib.parse import urlsplit

import pytest

from tests.extras import require_browser
from tests.polling import wait_until
from tunnel_support import Proc, free_port, python, start_cli

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = "sum.ipynb"
CELL = "print(6*7)"
KERNEL_CHANNELS = "/channels"  # ws://HOST/api/kernels/<id>/channels
STEP_TIMEOUT_S = 60.0


@pytest.fixture
def chromium() -> str:
    """Chromium's path; skips (fails under CI) naming .ci/install-browser.sh if it or
    playwright is missing."""
    return require_browser(".ci/install-browser.sh")


def write_notebook(path: Path, source: str) -> None:
    """A one-cell Python 3 notebook (kernelspec set: JupyterLab starts the kernel without asking)."""
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": "cell-1", "metadata": {},
                   "outputs": [], "source": [source]}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }))


@pytest.fixture
def notebook_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The notebook's URL (token included) on the login side of a tunnel, with
    JupyterLab behind --client; its configuration and runtime files stay in tmp_path."""
    root, tunnel = tmp_path / "root", tmp_path / "tunnel"
    root.mkdir()
    write_notebook(root / NOTEBOOK, CELL)
    token = secrets.token_hex(16)
    monkeypatch.setenv("JUPYTER_TOKEN", token)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime")):
        monkeypatch.setenv(var, str(tmp_path / "jupyter" / sub))
    jupyter_port, login_port = free_port(), free_port()
    procs: List[Proc] = []
    try:
        lab = Proc(python("-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip", "127.0.0.1",
                          "--port", str(jupyter_port), "--ServerApp.port_retries=0",
                          "--ServerApp.root_dir=%s" % root))
        procs.append(lab)
        lab.wait_for(lambda line: "is running at" in line, timeout=STEP_TIMEOUT_S)
        procs.append(start_cli("client", jupyter_port, tunnel))
        procs.append(start_cli("server", login_port, tunnel))
        yield "http://127.0.0.1:%d/lab/tree/%s?token=%s" % (login_port, NOTEBOOK, token)
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.mark.timeout(180)
def test_notebook_runs_a_cell_in_chromium_through_the_tunnel(chromium: str, notebook_url: str, tmp_path: Path) -> None:
    """The Lab UI loads through --server, the notebook opens, Shift+Enter runs
    ``print(6*7)`` and 42 appears; no request fails and none bypasses the tunnel."""
    from playwright.sync_api import sync_playwright

    origin = urlsplit(notebook_url).netloc
    failures: List[str] = []
    elsewhere: List[str] = []
    kernel_frames: List[str] = []

    def on_request(request) -> None:
        if urlsplit(request.url).netloc != origin:
            elsewhere.append(request.url)

    def on_response(response) -> None:
        if response.status >= 400:
            failures.append("%d %s %s" % (response.status, response.request.method, response.url))

    def on_websocket(ws) -> None:
        if urlsplit(ws.url).netloc != origin:
            elsewhere.append(ws.url)
        if urlsplit(ws.url).path.endswith(KERNEL_CHANNELS):
            ws.on("framereceived", lambda payload: kernel_frames.append(ws.url))

    with sync_playwright() as pw:
        # launch() gives the browser a fresh temporary profile (user data dir) of its own.
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.on("request", on_request)
        page.on("requestfailed", lambda r: failures.append("%s %s: %s" % (r.method, r.url, r.failure)))
        page.on("response", on_response)
        page.on("websocket", on_websocket)
        try:
            page.goto(notebook_url, timeout=STEP_TIMEOUT_S * 1000)
            cell = page.locator(".jp-Notebook .jp-Cell").first
            cell.locator(".jp-InputArea-editor").get_by_text(CELL).wait_for(timeout=STEP_TIMEOUT_S * 1000)
            # Shift+Enter before the kernel's websocket is open is dropped: wait for it.
            wait_until(lambda: kernel_frames, STEP_TIMEOUT_S, what="a frame on the kernel's websocket",
                       pause=lambda seconds: page.wait_for_timeout(seconds * 1000))
            cell.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            output = cell.locator(".jp-OutputArea-output")
            output.wait_for(timeout=STEP_TIMEOUT_S * 1000)
            assert output.inner_text().strip() == "42"
            assert failures == []
            assert elsewhere == []
        except BaseException:
            shot = tmp_path / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
                print("screenshot of the page at the failure: %s" % shot)
            except Exception as exc:  # a dead browser must not hide the first failure
                print("no screenshot (%s)" % exc)
            raise
        finally:
            browser.close()
