"""The blocking front-end: ``connect``, ``Client``, ``proxy`` and ``status``.

The same API works in plain scripts, from many threads at once, and inside Jupyter
(whose own event loop is already running in the calling thread): a connection over
a socket is moved by the calling threads themselves (``sync.py``), one over the
tunnel or a pipe by a private event loop in a daemon thread (``aio.py``).
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import os
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Union

from .client import ClientConnection, RemoteStream
from .errors import SerializationError, ServerNotRunningError
from .frames import DEFAULT_MAX_FRAME, Kind, check_max_frame, encode_call
from .protocol import DEFAULT_STREAM_WINDOW
from .transports import DEFAULT_LIVENESS_TIMEOUT, endpoint

#: Seconds to wait for a server to answer (connect, proxy, status).
DEFAULT_CONNECT_TIMEOUT = 10.0


class Client:
    """A connection to an RPC server. Use :func:`connect` to make one.

    Thread-safe: any number of threads may call through one client concurrently.
    """

    def __init__(self, conn: ClientConnection, timeout: Optional[float] = None) -> None:
        self._conn = conn
        self._closed = False
        #: Default timeout in seconds of every call (None: wait as long as it takes).
        self.timeout = timeout
        self._pid = os.getpid()

    @property
    def closed(self) -> bool:
        """True once closed, or once the connection was lost (then reconnect)."""
        return self._closed or self._conn.error is not None

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the server's function ``name``; return its result or raise its error.

        A generator function returns an iterator over its items as they arrive.
        """
        return self._wait(lambda: self.submit(name, *args, **kwargs), self.timeout, name)

    def submit(self, name: str, *args: Any, **kwargs: Any) -> cf.Future:
        """Start a call; the returned future's ``cancel()`` cancels it on the server."""
        try:
            payload = encode_call(name, args, kwargs)
        except Exception as exc:
            raise SerializationError(f"cannot pickle the arguments of {name}(): "
                                     f"{type(exc).__name__}: {exc}") from exc
        return self._conn.request(Kind.CALL, payload, f"the arguments of {name}()")

    async def acall(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call from asyncio code (any event loop): ``await client.acall(name, ...)``."""
        return await self._await(self.submit(name, *args, **kwargs), self.timeout, name)

    def proxy(self, name: str, timeout: Optional[float] = None) -> "RemoteFunction":
        """A local callable standing for the server's function ``name``."""
        return RemoteFunction(self, name, self.timeout if timeout is None else timeout)

    def info(self) -> Dict[str, Any]:
        """The server's status: pid, hostname, functions, counters, versions."""
        return self._wait(lambda: self._conn.request(Kind.INFO, b"", "info"), self.timeout,
                          "info")

    def close(self) -> None:
        """Close the connection and stop the client's thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._close_at_exit)
        self._conn.close()

    def _close_at_exit(self) -> None:
        if os.getpid() == self._pid:  # a forked child's copy has no threads
            self.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _wait(self, start: Callable[[], cf.Future], timeout: Optional[float],
              name: str) -> Any:
        """Start a request and wait for it; over a socket this thread may read the
        reply itself (see :meth:`ClientConnection.attending`)."""
        with self._conn.attending():
            future = start()
            try:
                return _stream_timeout(self._conn.wait(future, timeout), timeout)
            except cf.TimeoutError:
                if future.done():  # the function itself raised TimeoutError
                    raise
                if future.cancel():
                    raise _call_timed_out(name, timeout) from None
                return _stream_timeout(future.result(), timeout)
            except BaseException:  # KeyboardInterrupt and the like: cancel remotely too
                future.cancel()
                raise

    async def _await(self, future: cf.Future, timeout: Optional[float], name: str) -> Any:
        waiting = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({waiting}, timeout=timeout)
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        if not done:
            waiting.cancel()
            raise _call_timed_out(name, timeout)
        return _stream_timeout(waiting.result(), timeout)


def _stream_timeout(result: Any, timeout: Optional[float]) -> Any:
    """A streamed result waits at most ``timeout`` for each item."""
    if isinstance(result, RemoteStream):
        result.timeout = timeout
    return result


def _call_timed_out(name: str, timeout: Optional[float]) -> TimeoutError:
    return TimeoutError(f"{name}() did not return within {timeout:g} s; "
                        f"it was cancelled on the server")


class RemoteFunction:
    """Calls one remote function through one client, like a local function."""

    def __init__(self, client: Client, name: str, timeout: Optional[float]) -> None:
        self.client = client
        self.name = self.__name__ = name
        self.timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.client._wait(lambda: self.client.submit(self.name, *args, **kwargs),
                                 self.timeout, self.name)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """``await f.acall(...)``: the same call, from asyncio code."""
        return await self.client._await(self.client.submit(self.name, *args, **kwargs),
                                        self.timeout, self.name)

    def __repr__(self) -> str:
        return f"<remote function {self.name}>"


def connect(*, tunnel_dir: Any = None, tcp: Any = None, unix: Any = None,
            command: Union[str, Sequence[str], None] = None, key_file: Any = None,
            timeout: Optional[float] = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
            liveness_timeout: float = DEFAULT_LIVENESS_TIMEOUT, max_frame: int = DEFAULT_MAX_FRAME,
            stream_window: int = DEFAULT_STREAM_WINDOW, poll_max: Optional[float] = None,
            coherence: Optional[str] = None) -> Client:
    """Connect to an RPC server and authenticate; returns a :class:`Client`.

    Give at most one of ``tunnel_dir`` (default: ``rpc.default_tunnel_dir()``),
    ``tcp="HOST:PORT"``, ``unix=PATH`` or ``command`` (run e.g. ``ssh host python -m
    rpc serve --stdio M:F`` and talk over its stdin/stdout). Raises
    ServerNotRunningError if no server answers within ``connect_timeout`` seconds,
    AuthenticationError if the key (``key_file``, default ``rpc.default_key_path()``)
    is missing or differs from the server's. ``timeout`` is the default per-call
    timeout; a server silent for ``liveness_timeout`` (60 s) while calls wait is
    presumed dead. ``poll_max`` (tunnel only) is the longest pause between two looks at
    the tunnel when nothing happens (default: the transport's); a longer one costs the
    file server less and notices the first message after a quiet spell later.
    ``coherence`` (tunnel only: "auto", "locks" or "lock-free") overrides what the
    transport judges of the filesystem's locks (see ``fileforward doctor``).
    """
    ep = endpoint(tunnel_dir=tunnel_dir, tcp=tcp, unix=unix, command=command, poll_max=poll_max,
                  coherence=coherence)
    conn = ClientConnection.open(
        ep, key_file=key_file, connect_timeout=connect_timeout, liveness_timeout=liveness_timeout,
        max_frame=check_max_frame(max_frame), stream_window=stream_window)
    client = Client(conn, timeout)
    if ep.kind == "tunnel":  # a job that ends without closing (e.g. through rpc.proxy)
        # closes at exit: the server sees a client leave, not the reset of a stopping
        # file transport (the kernel closes sockets and pipes the same way by itself)
        atexit.register(client._close_at_exit)
    return client


class LazyProxy:
    """A remote function that connects on first use and reconnects after a failure.

    A call that was sent is never re-sent: if the connection breaks during it, that
    call raises ConnectionLost, and the next call opens a new connection.
    """

    def __init__(self, name: str, timeout: Optional[float] = None, **connect_kwargs: Any):
        self.name = self.__name__ = name
        self.timeout = timeout
        self._connect_kwargs = connect_kwargs
        self._lock = threading.Lock()
        self._client: Optional[Client] = None
        self._pid = os.getpid()

    def _current(self) -> Client:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's connection is not ours
                self._client, self._pid = None, os.getpid()
            if self._client is None or self._client.closed:
                if self._client is not None:
                    self._client.close()
                self._client = connect(**self._connect_kwargs)
            return self._client

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().proxy(self.name, self.timeout)(*args, **kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """``await f.acall(...)``: the same call, from asyncio code."""
        client = await asyncio.get_running_loop().run_in_executor(None, self._current)
        return await client.proxy(self.name, self.timeout).acall(*args, **kwargs)

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def __getstate__(self) -> Dict[str, Any]:  # a proxy pickles as its address only
        return {"name": self.name, "timeout": self.timeout, "kw": self._connect_kwargs}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["name"], state["timeout"], **state["kw"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"<rpc proxy {self.name}>"


def proxy(name: str, *, tunnel_dir: Any = None, timeout: Optional[float] = None,
          **connect_kwargs: Any) -> LazyProxy:
    """``completion = rpc.proxy("completion")``: a function that runs on the server.

    Connects at the first call (same keywords as :func:`connect`), and again after
    the server restarted.
    """
    return LazyProxy(name, timeout, tunnel_dir=tunnel_dir, **connect_kwargs)


def status(tunnel_dir: Any = None, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
           **connect_kwargs: Any) -> Dict[str, Any]:
    """The server's :meth:`Client.info`, or ``{"alive": False, ...}`` if none answers."""
    try:
        with connect(tunnel_dir=tunnel_dir, connect_timeout=connect_timeout,
                     **connect_kwargs) as client:
            return client.info()
    except ServerNotRunningError as exc:
        return {"alive": False, "pid": None, "hostname": None, "functions": {},
                "calls_served": None, "in_flight": None, "uptime_s": None,
                "versions": None, "error": str(exc)}
