"""Functions a SLURM job calls on the login node, where the internet is reachable.

Served by run_with_rpc.sh (``python3 -m rpc serve rpc_server:FUNCTIONS``); a job
calls them with ``rpc.proxy("fetch")(url)``. Edit FUNCTIONS to expose your own:
whatever they return (or raise) travels back to the job.

- ``fetch(url)``: the body of an HTTP(S) GET, as bytes (``urllib``, no extra package).
  Network errors and error statuses arrive in the job as ``urllib.error.URLError``.
- ``completion(messages, model=None, **params)``: a chat completion from an
  OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server...), the
  decoded JSON answer. Set ``LLM_BASE_URL`` (default ``https://api.openai.com/v1``),
  ``LLM_API_KEY`` and optionally ``LLM_MODEL`` in the login node's environment:
  the key never leaves the login node.
- ``llm_endpoint()``: where ``completion`` sends its requests, or None when no LLM
  is configured (neither ``LLM_API_KEY`` nor ``LLM_BASE_URL`` is set), so that a
  job can skip its LLM calls instead of failing.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, List, Optional, TypeVar, Union

log = logging.getLogger("rpc_server")
T = TypeVar("T")

DEFAULT_LLM_BASE_URL = "https://api.openai.com/v1"
DEFAULT_LLM_MODEL = "gpt-4o-mini"


def fetch(url: str, timeout: float = 60.0) -> bytes:
    """GET ``url`` from the login node; the response body."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("fetch() takes http:// or https:// URLs, not %r" % url)
    log.info("fetch %s", url)
    return _urlopen(url, timeout, lambda response: response.read())


def llm_endpoint() -> Optional[str]:
    """The URL completion() posts to, or None if no LLM is configured on this node."""
    if not (os.environ.get("LLM_API_KEY") or os.environ.get("LLM_BASE_URL")):
        return None
    return _chat_url()


def _chat_url() -> str:
    return (os.environ.get("LLM_BASE_URL") or DEFAULT_LLM_BASE_URL).rstrip("/") + "/chat/completions"


def completion(messages: List[Dict[str, str]], model: str = None, timeout: float = 300.0,
               **params: Any) -> Dict[str, Any]:
    """POST ``{model, messages, **params}`` to ``$LLM_BASE_URL/chat/completions``.

    Returns the endpoint's JSON answer, e.g. ``answer["choices"][0]["message"]["content"]``.
    """
    url = _chat_url()
    body = dict(params, model=model or os.environ.get("LLM_MODEL", DEFAULT_LLM_MODEL),
                messages=messages)
    headers = {"Content-Type": "application/json"}
    if os.environ.get("LLM_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["LLM_API_KEY"]
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    log.info("completion: %d message(s) to %s, model %s", len(messages), url, body["model"])
    return _urlopen(request, timeout, json.load)


def _urlopen(request: Union[str, urllib.request.Request], timeout: float,
             read: Callable[[Any], T]) -> T:
    """``read(urlopen(request))``. An HTTP error status becomes a plain URLError with
    the status and the start of the body: urllib's HTTPError holds an open
    response and cannot travel back to the job as itself."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return read(response)
    except urllib.error.HTTPError as exc:
        body = " ".join(exc.read(300).decode("utf-8", errors="replace").split())
        exc.close()
        raise urllib.error.URLError("HTTP %d %s from %s: %s"
                                    % (exc.code, exc.reason, exc.url, body)) from None


FUNCTIONS = {"fetch": fetch, "completion": completion, "llm_endpoint": llm_endpoint}
