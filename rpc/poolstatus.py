"""``python -m rpc status --pool D``: what ``pool.info()`` shows, from either node.

The command is an RPC client of the pool's server, like a worker, but it only
calls ``pool_info``: it never attaches, so the pool does not count it as a worker
and gives it no task.
"""
from __future__ import annotations

from typing import Any, Dict

from .blocking import DEFAULT_CONNECT_TIMEOUT, connect
from .errors import FunctionNotFoundError, RPCError, ServerNotRunningError
from .pool import describe_job


class NoPoolError(RPCError):
    """No ``rpc.Pool`` answers at the directory given."""


def pool_status(pool_dir: Any, *, key_file: Any = None,
                connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Dict[str, Any]:
    """The ``info()`` of the pool serving ``pool_dir``; :class:`NoPoolError` saying
    what to do if none does."""
    try:
        with connect(tunnel_dir=pool_dir, key_file=key_file,
                     connect_timeout=connect_timeout) as client:
            return client.call("pool_info")
    except ServerNotRunningError as exc:
        raise NoPoolError(
            f"no rpc.Pool runs at {pool_dir}: nothing answered within {connect_timeout:g} s "
            f"(--connect-timeout); start one there with "
            f"rpc.Pool(tunnel_dir={str(pool_dir)!r}), or give the directory of the running "
            f"one with --pool DIR") from exc
    except FunctionNotFoundError as exc:
        raise NoPoolError(f"the RPC server at {pool_dir} is not an rpc.Pool (it serves "
                          f"plain functions: see `python -m rpc status --tunnel-dir "
                          f"{pool_dir}`)") from exc


def describe_pool(info: Dict[str, Any]) -> str:
    """``info`` for people: a summary line, then one line per worker."""
    workers = info["workers"]
    lines = [f"rpc.Pool at {info['tunnel_dir']}: {len(workers)} worker(s), {info['queued']} "
             f"queued, {info['running']} running, {info['completed']} completed, "
             f"{info['failed']} failed"]
    for worker in workers:
        threads = worker.get("threads", 1)
        state = "leaving" if worker["leaving"] else "busy" if worker["running"] else "idle"
        progress = {str(k): v for k, v in worker.get("progress", {}).items()}
        tasks = ", ".join(f"{task}{_progress(progress.get(str(task)))}"
                          for task in worker["running"])
        lines.append(f"  {worker['host']} pid {worker['pid']}, "
                     f"{describe_job(worker)}, "
                     f"{threads} thread{'s' if threads != 1 else ''}: {state}"
                     f"{', task(s) ' + tasks if tasks else ''}")
    return "\n".join(lines)


def _progress(value: Any) -> str:
    if value is None:
        return ""
    return f" ({100 * value:.0f}%)" if isinstance(value, float) else f" ({value!r})"
