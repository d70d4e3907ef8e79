"""Stand-ins for "the internet" in proxy tests, all on this machine's loopback:
a static HTTP server, a PEP 503 package index with one wheel, a git repository
served over plain http, and an HTTPS server with a self-signed certificate."""
from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Sequence

from tests.tunnel_support import Proc, free_port

WHEEL_NAME = "fftunneltest"
WHEEL_VERSION = "1.0"

_HTTPS_SERVER = """
import http.server, ssl, sys, functools
port, root, cert, key, bind = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer((bind, port), handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
"""


def serve_directory(root: Path, prefix: Sequence[str] = (), https: bool = False,
                    bind: str = "127.0.0.1") -> "tuple[Proc, int]":
    """A static HTTP (or HTTPS, with root/cert.pem) server of `root` on `bind`
    (e.g. 127.0.0.2: a loopback address that NO_PROXY=localhost,127.0.0.1 does not
    exempt from a proxy)."""
    port = free_port()
    if https:
        cert, key = self_signed_certificate(root)
        argv = [sys.executable, "-c", _HTTPS_SERVER, str(port), str(root), str(cert), str(key), bind]
    else:
        argv = [sys.executable, "-u", "-m", "http.server", str(port), "--bind", bind, "--directory", str(root)]
    proc = Proc(argv, prefix)
    proc.wait_for(lambda line: line.startswith("ready" if https else "Serving HTTP"))
    return proc, port


def self_signed_certificate(root: Path) -> "tuple[Path, Path]":
    """A certificate for localhost and 127.0.0.1, and its key, under root."""
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


def package_index(root: Path) -> Path:
    """A PEP 503 index under root/simple holding one pure-Python wheel whose module
    `fftunneltest` defines ANSWER = 42. Returns the wheel's path."""
    wheel = root / f"{WHEEL_NAME}-{WHEEL_VERSION}-py3-none-any.whl"
    dist_info = f"{WHEEL_NAME}-{WHEEL_VERSION}.dist-info"
    files = {
        f"{WHEEL_NAME}.py": b"ANSWER = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {WHEEL_NAME}\nVersion: {WHEEL_VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    project = root / "simple" / WHEEL_NAME
    project.mkdir(parents=True)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (project / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="../../{wheel.name}#sha256={sha}">{wheel.name}</a></body></html>\n')
    (root / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{WHEEL_NAME}/">{WHEEL_NAME}</a></body></html>\n')
    return wheel


def git_repository(root: Path) -> str:
    """A bare git repository under root, servable by a static HTTP server (git's
    "dumb" http protocol). Returns its path relative to root; its one commit adds
    README with the text "through the tunnel"."""
    work, bare = root / "work", root / "repo.git"
    env_args = ["-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]
    subprocess.run(["git", *env_args, "init", "-q", str(work)], check=True, timeout=60)
    (work / "README").write_text("through the tunnel\n")
    subprocess.run(["git", *env_args, "-C", str(work), "add", "README"], check=True, timeout=60)
    subprocess.run(["git", *env_args, "-C", str(work), "commit", "-qm", "first"], check=True, timeout=60)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, timeout=60)
    subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True, timeout=60)
    return bare.name


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
