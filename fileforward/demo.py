"""`fileforward demo`: both sides of a tunnel in this process, measured.

The job side (`--client` code) forwards to a built-in web server on 127.0.0.1; the
login side (`--server` code) listens on another 127.0.0.1 port; an HTTP client
fetches pages through it. All of it goes through a fresh tunnel directory, which
is removed at the end. Nothing is needed but this package: it shows on a new
machine, in seconds, that the tunnel works, and how fast it is on a given
filesystem (`--dir`).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import http.client
import http.server
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .forward import Fatal, connecting, listening
from .options import MiB, Options

PAGE = (b"<!doctype html><title>fileforward demo</title>"
        b"<h1>Hello through the shared filesystem</h1>"
        b"<p>This page left a web server, crossed a tunnel directory and reached you.</p>\n")
ROUND_TRIPS = 20
HTTP_TIMEOUT = 60.0

log = logging.getLogger(__name__)


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET / is the page; GET /blob is the server's blob (keep-alive, HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no 40 ms Nagle/delayed-ACK stall between head and body
    blob = b""

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        body = self.blob if self.path == "/blob" else PAGE
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream" if self.path == "/blob" else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Quiet: the demo prints its own summary."""


class _QuietServer(http.server.ThreadingHTTPServer):
    """A connection the demo's shutdown resets is no news: a failed fetch is what reports."""

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("demo web server: request from %s failed", client_address, exc_info=True)


@contextlib.contextmanager
def web_server(blob: bytes) -> Iterator[int]:
    """A web server on 127.0.0.1 (in a thread) for as long as the context is open; yields its port."""
    handler = type("DemoHandler", (_Handler,), {"blob": blob})
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@dataclasses.dataclass
class Measured:
    """What the demo measured, through the tunnel."""

    page_bytes: int = 0
    first_byte: float = 0.0        # new connection: request sent -> first response byte
    round_trips: List[float] = dataclasses.field(default_factory=list)
    blob_bytes: int = 0
    blob_seconds: float = 0.0


def _get(conn: http.client.HTTPConnection, path: str) -> Tuple[bytes, float]:
    """GET `path` on a (keep-alive) connection: (body, seconds until the response's head)."""
    started = time.perf_counter()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        head = time.perf_counter() - started
        body = response.read()
    except http.client.HTTPException as exc:
        raise ConnectionError(f"GET {path} through the tunnel got no valid answer: {exc!r}") from None
    if response.status != 200:
        raise ConnectionError(f"GET {path} through the tunnel answered {response.status} {response.reason}")
    return body, head


def measure(port: int, blob: bytes) -> Measured:
    """Fetch through the login side on 127.0.0.1:port, checking every byte (blocking)."""
    result = Measured()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        page, result.first_byte = _get(conn, "/")
        if page != PAGE:
            raise ConnectionError(f"the page came back damaged ({len(page)} bytes, expected {len(PAGE)})")
        result.page_bytes = len(page)
        for _ in range(ROUND_TRIPS):
            started = time.perf_counter()
            _get(conn, "/")
            result.round_trips.append(time.perf_counter() - started)
        started = time.perf_counter()
        body, _ = _get(conn, "/blob")
        result.blob_seconds = time.perf_counter() - started
        if hashlib.sha256(body).digest() != hashlib.sha256(blob).digest():
            raise ConnectionError(f"the {len(blob)}-byte download came back damaged ({len(body)} bytes)")
        result.blob_bytes = len(body)
    finally:
        conn.close()
    return result


async def run(parent: Optional[Path], size_mib: float, stop: asyncio.Event) -> Tuple[Measured, Path]:
    """Run the demo in a new directory under `parent` (default: the system's temporary
    directory); returns what it measured and that directory, removed by then.
    Raises CancelledError if `stop` is set first."""
    blob = os.urandom(int(size_mib * MiB))
    options = Options()
    with tempfile.TemporaryDirectory(prefix="fileforward-demo-", dir=parent) as tmp:
        tunnel_dir = Path(tmp)
        with web_server(blob) as web_port:
            async with connecting(tunnel_dir, "127.0.0.1", web_port, options), \
                    listening(tunnel_dir, "127.0.0.1", 0, options) as login:
                fetch = asyncio.get_running_loop().run_in_executor(None, measure, login.port, blob)
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait([fetch, stopping], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not fetch.done():
                    fetch.cancel()
                    raise asyncio.CancelledError()
                measured = fetch.result()
    if tunnel_dir.exists():
        raise Fatal(f"could not remove the demo's tunnel directory {tunnel_dir}")
    return measured, tunnel_dir


def report(measured: Measured, tunnel_dir: Path) -> List[str]:
    """The lines the demo prints."""
    rtt = statistics.median(measured.round_trips)
    rate = measured.blob_bytes / MiB / measured.blob_seconds if measured.blob_seconds else float("inf")
    return [
        f"fileforward demo: both sides of a tunnel in one process, through {tunnel_dir}",
        f"  first page, new connection: {measured.page_bytes} bytes, time to first byte "
        f"{measured.first_byte * 1000:.1f} ms",
        f"  round trip (small page on an open connection, median of {len(measured.round_trips)}): "
        f"{rtt * 1000:.2f} ms",
        f"  download: {measured.blob_bytes} bytes ({measured.blob_bytes / MiB:g} MiB) in "
        f"{measured.blob_seconds:.3f} s = {rate:.1f} MiB/s, every byte checked",
        f"  removed {tunnel_dir}",
        "OK: the tunnel works here. Next: the quick start in the README (fileforward --server / --client).",
    ]
