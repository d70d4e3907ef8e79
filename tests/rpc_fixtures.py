"""Fixtures of the RPC suites (imported by tests/conftest.py).

``rpc_env`` is not autouse here, as conftest.py applies to every suite: each RPC
module asks for it with ``pytestmark = pytest.mark.usefixtures("rpc_env")``.
``transport`` parametrizes a test over every transport (rpc_helpers.TRANSPORTS).
"""
import shutil
import tempfile
from pathlib import Path

import pytest

import rpc
from rpc import auth
from rpc_helpers import TRANSPORTS, Served, ServerThread


@pytest.fixture
def rpc_env(tmp_path, monkeypatch):
    """Key file and default tunnel dir under tmp_path (inherited by subprocesses)."""
    monkeypatch.setenv(auth.KEY_ENV, str(tmp_path / "rpc.key"))
    monkeypatch.setenv(rpc.TUNNEL_DIR_ENV, str(tmp_path / "rpc-tunnel"))
    return tmp_path


@pytest.fixture
def sock_dir():
    """A short directory for Unix sockets (their paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rpc", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock(sock_dir):
    return sock_dir / "s"


@pytest.fixture
def server(sock):
    """The test functions served in-process on a Unix socket."""
    from rpc_funcs import FUNCTIONS
    srv = ServerThread(FUNCTIONS, unix=sock)
    yield srv
    srv.stop()


@pytest.fixture
def client(server, sock):
    """A client of ``server``."""
    with rpc.connect(unix=sock) as c:
        yield c


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    """The name of one transport: the test runs once per transport."""
    return request.param


@pytest.fixture
def serve(transport, sock, tmp_path):
    """Start the test functions over ``transport``: ``serve(process=False,
    **server_kwargs)`` -> rpc_helpers.Served, stopped at the end of the test."""
    started = []

    def start(**server_kwargs):
        started.append(Served(transport, sock, tmp_path / "served-tunnel", **server_kwargs))
        return started[-1]

    yield start
    for served in started:
        served.stop()


@pytest.fixture
def served(serve):
    """The test functions served over ``transport`` with the default settings."""
    return serve()


@pytest.fixture
def remote(served):
    """A client of ``served``."""
    with served.connect() as c:
        yield c
