"""Call Python functions that run on the other side of any byte stream.

Server (login node)::

    rpc.serve({"completion": completion})           # or: python -m rpc serve mod:FUNCS

Client (compute node)::

    completion = rpc.proxy("completion")
    completion(model=..., messages=...)

Worker pool (the side with the work; workers run ``python -m rpc worker --pool D``)::

    with rpc.Pool(tunnel_dir=D) as pool:
        results = list(pool.map(simulate, params))

    # inside simulate, on a worker (a no-op elsewhere):
    rpc.report_progress(0.5)            # or a message: rpc.report_progress("loading")

Frames are length-prefixed and carry cloudpickle payloads, after a mutual HMAC
handshake over a shared key file. Transports: the fileforward tunnel directory (the
default: no port at all), TCP, Unix sockets, or a subprocess's stdin/stdout.
"""
from concurrent.futures import as_completed

from .auth import KEY_ENV, default_key_path
from .blocking import Client, LazyProxy, RemoteFunction, connect, proxy, status
from .client import RemoteStream
from .errors import (AuthenticationError, ConnectionLost, FunctionNotFoundError,
                     ProtocolError, RemoteSerializationError, RemoteTraceback, RPCError,
                     SerializationError, ServerNotRunningError, TruncatedFrameError)
from .execution import CallContext, cancelled, current_call
from .frames import PROTOCOL_VERSION
from .pool import Pool, PoolFuture, WorkerLost
from .server import RPCServer, serve, start_server
from .taskprogress import report_progress
from .transports import TUNNEL_DIR_ENV, default_tunnel_dir

__all__ = [
    "AuthenticationError", "CallContext", "Client", "ConnectionLost",
    "FunctionNotFoundError", "KEY_ENV", "LazyProxy", "PROTOCOL_VERSION", "Pool", "PoolFuture",
    "ProtocolError", "RPCError", "RPCServer", "RemoteFunction", "RemoteSerializationError",
    "RemoteStream", "RemoteTraceback", "SerializationError", "ServerNotRunningError",
    "TUNNEL_DIR_ENV", "TruncatedFrameError", "WorkerLost", "as_completed", "cancelled",
    "connect", "current_call", "default_key_path", "default_tunnel_dir", "proxy",
    "report_progress", "serve", "start_server", "status",
]
