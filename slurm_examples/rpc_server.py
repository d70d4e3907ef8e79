"""Functions a SLURM job calls on the login node, where the internet is reachable.

Served by run_with_rpc.sh (``python3 -m rpc serve rpc_server:FUNCTIONS``); a job
calls them with ``rpc.proxy("fetch")(url)``. Edit FUNCTIONS to expose your own:
whatever they return (or raise) travels back to the job.

- ``fetch(url)``: the body of an HTTP(S) GET, as bytes (``urllib``, no extra package).
- ``completion(messages, model=None, **params)``: a chat completion from an
  OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp server...), the
  decoded JSON answer. Set ``LLM_BASE_URL`` (default ``https://api.openai.com/v1``),
  ``LLM_API_KEY`` and optionally ``LLM_MODEL`` in the login node's environment:
  the key never leaves the login node.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any, Dict, List

log = logging.getLogger("rpc_server")

DEFAULT_LLM_BASE_URL = "https://api.openai.com/v1"
DEFAULT_LLM_MODEL = "gpt-4o-mini"


def fetch(url: str, timeout: float = 60.0) -> bytes:
    """GET ``url`` from the login node; the response body."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("fetch() takes http:// or https:// URLs, not %r" % url)
    log.info("fetch %s", url)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def completion(messages: List[Dict[str, str]], model: str = None, timeout: float = 300.0,
               **params: Any) -> Dict[str, Any]:
    """POST ``{model, messages, **params}`` to ``$LLM_BASE_URL/chat/completions``.

    Returns the endpoint's JSON answer, e.g. ``answer["choices"][0]["message"]["content"]``.
    """
    base_url = os.environ.get("LLM_BASE_URL", DEFAULT_LLM_BASE_URL).rstrip("/")
    body = dict(params, model=model or os.environ.get("LLM_MODEL", DEFAULT_LLM_MODEL),
                messages=messages)
    headers = {"Content-Type": "application/json"}
    if os.environ.get("LLM_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["LLM_API_KEY"]
    request = urllib.request.Request(base_url + "/chat/completions",
                                     data=json.dumps(body).encode(), headers=headers)
    log.info("completion: %d message(s) to %s, model %s", len(messages), base_url, body["model"])
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


FUNCTIONS = {"fetch": fetch, "completion": completion}
