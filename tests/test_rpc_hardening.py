"""Failures found by an adversarial run of the RPC layer (issue "Hardening"), one test each.

Each test is named after its finding; each failed before its fix.
"""
import concurrent.futures as cf
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import rpc
from rpc import auth, protocol
from rpc.protocol import Kind
from rpc_helpers import (CliServer, RawConnection, ServerThread, rpc_env, sock,  # noqa: F401
                         sock_dir, wait_until)
from tunnel_support import free_port


class Unprintable(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self):
        raise ValueError("no text for you")


def raise_unprintable():
    raise Unprintable()


def echo(x):
    return x


def numbers(n):
    yield from range(n)


FUNCTIONS = {f.__name__: f for f in (raise_unprintable, echo, numbers)}


@pytest.fixture(params=["tcp", "tunnel"])
def served(request, tmp_path):
    """FUNCTIONS served in this process over TCP or the tunnel; yields (server, address)."""
    address = {"tcp": "127.0.0.1:0"} if request.param == "tcp" else {
        "tunnel_dir": str(tmp_path / "rpc-tunnel")}
    srv = ServerThread(FUNCTIONS, **address)
    if request.param == "tcp":
        address = {"tcp": srv.server.addresses[0][len("tcp://"):]}
    yield srv, address
    srv.stop()


@pytest.fixture
def thread_crashes(monkeypatch):
    """Exceptions that escaped a thread of this process during the test."""
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    return crashes


@pytest.fixture
def rpc_log(caplog):
    caplog.set_level(logging.INFO, logger="rpc")
    return caplog


def logged(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---------------------------------------------------------------- finding 9

def test_finding9_unprintable_exception_is_answered(served, thread_crashes):
    srv, address = served
    with rpc.connect(**address, timeout=20) as c:
        for _ in range(3):  # more than once: the connection and its threads survive
            with pytest.raises(RuntimeError) as info:
                c.call("raise_unprintable")
            assert str(info.value) == (f"Server-side {__name__}.Unprintable: <unprintable>")
            assert "raise_unprintable" in info.value.remote_traceback
        assert c.call("echo", "still answering") == "still answering"
    wait_until(lambda: srv.stats()["in_flight"] == 0, what="in_flight back to 0")
    assert srv.stats()["calls_served"] == 4
    assert not thread_crashes


# ---------------------------------------------------------------- finding 14

@pytest.mark.parametrize("hello, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "malformed handshake"),
    ({"versions": ["not", "a", "dict"]}, "bad versions"),
], ids=["deeply-nested-json", "versions-not-a-dict"])
def test_finding14_malformed_hello_gets_a_reject(sock, rpc_log, hello, reason):
    srv = ServerThread(FUNCTIONS, unix=sock)
    try:
        raw = RawConnection(sock)
        if isinstance(hello, dict):
            body = {"proto": protocol.PROTOCOL_VERSION, "nonce": auth.new_nonce(),
                    "max_frame": 1 << 20, "hostname": "raw", **hello}
            hello = protocol.encode_json(body)
        raw.send(Kind.HELLO, 0, hello[:protocol.HANDSHAKE_MAX_FRAME])
        frames = []
        while True:
            frame = raw.recv()
            if frame is None:
                break
            frames.append(frame)
        assert frames and frames[-1].kind is Kind.REJECT, frames
        assert reason in protocol.decode_json(frames[-1].payload)["reason"]
        raw.close()
        wait_until(lambda: logged(rpc_log, "rejected connection"), what="the log line")
        assert not logged(rpc_log, "Unhandled exception")
        assert not [r for r in rpc_log.records if r.exc_info], "a traceback was logged"
        with rpc.connect(unix=sock) as c:
            assert c.call("echo", 1) == 1
    finally:
        srv.stop()


def test_finding14_handshake_timeout_is_logged_with_its_reason(sock, rpc_log):
    srv = ServerThread(FUNCTIONS, unix=sock)
    srv.server.handshake_timeout = 0.5
    try:
        raw = RawConnection(sock)  # connects, then says nothing
        wait_until(lambda: logged(rpc_log, "rejected connection"), what="the log line")
        [line] = logged(rpc_log, "rejected connection")
        assert "no handshake within 0.5 s" in line, line
        raw.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("transport", ["unix", "tunnel"])
def test_finding14_oversized_result_gets_an_error_that_fits(sock, tmp_path, transport):
    address = {"unix": sock} if transport == "unix" else {
        "tunnel_dir": str(tmp_path / "rpc-tunnel")}
    srv = ServerThread(FUNCTIONS, **address)
    try:
        with rpc.connect(**address, max_frame=256, timeout=20) as c:
            with pytest.raises((rpc.ProtocolError, RuntimeError), match="frame limit"):
                c.call("echo", "x" * 10_000)
            assert c.call("echo", "small") == "small"
        wait_until(lambda: srv.stats()["in_flight"] == 0, what="in_flight back to 0")
    finally:
        srv.stop()
