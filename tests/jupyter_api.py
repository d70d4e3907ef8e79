"""A minimal Jupyter Server client for tests: REST with a token, kernel websocket.

Enough to prove a JupyterLab is really usable through a tunnel: ``status`` (GET
/api/status), ``start_kernel`` (POST /api/kernels), ``execute`` (an
``execute_request`` over the kernel's websocket, returning the ``text/plain`` of
its result) and ``shutdown`` (POST /api/shutdown, what File > Shut Down does).
The websocket client is tornado's, which Jupyter Server itself depends on.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from datetime import datetime, timezone
from typing import Any, Dict, Optional


class JupyterError(RuntimeError):
    """The server or kernel answered something unexpected."""


class JupyterClient:
    """Talks to the Jupyter Server at ``base_url`` (e.g. ``http://127.0.0.1:8888``)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        """One REST call; the decoded JSON answer (None for an empty body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers={
            "Authorization": "token %s" % self.token,
            "Content-Type": "application/json",
        })
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            payload = resp.read()
        return json.loads(payload) if payload else None

    def status(self) -> Dict[str, Any]:
        """GET /api/status (needs a valid token)."""
        return self.request("GET", "/api/status")

    def start_kernel(self, name: str = "python3") -> str:
        """Start a kernel; its id."""
        return self.request("POST", "/api/kernels", {"name": name})["id"]

    def shutdown(self) -> None:
        """Ask the whole server to shut down (JupyterLab's File > Shut Down)."""
        self.request("POST", "/api/shutdown")

    def execute(self, kernel_id: str, code: str) -> str:
        """Run ``code`` in the kernel over its websocket; the ``text/plain`` result."""
        return asyncio.run(asyncio.wait_for(self._execute(kernel_id, code), self.timeout))

    async def _execute(self, kernel_id: str, code: str) -> str:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        url = "%s/api/kernels/%s/channels" % (self.base_url.replace("http", "ws", 1), kernel_id)
        conn = await websocket_connect(HTTPRequest(
            url, headers={"Authorization": "token %s" % self.token},
            connect_timeout=self.timeout, request_timeout=self.timeout))
        try:
            msg_id = uuid.uuid4().hex
            conn.write_message(json.dumps(_execute_request(msg_id, code)))
            result: Optional[str] = None
            while True:
                raw = await conn.read_message()
                if raw is None:
                    raise JupyterError("kernel websocket closed before the reply")
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["header"]["msg_type"], msg["content"]
                if kind == "error":
                    raise JupyterError("%s: %s" % (content.get("ename"), content.get("evalue")))
                if kind == "execute_result":
                    result = content["data"]["text/plain"]
                elif kind == "status" and content.get("execution_state") == "idle" \
                        and result is not None:
                    return result
        finally:
            conn.close()


def _execute_request(msg_id: str, code: str) -> Dict[str, Any]:
    return {
        "header": {
            "msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex,
            "username": "test", "version": "5.3",
            "date": datetime.now(timezone.utc).isoformat(),
        },
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False,
                    "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
    }
