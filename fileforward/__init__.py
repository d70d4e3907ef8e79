"""fileforward: TCP-like byte streams between processes that share only a directory.

    reader, writer = await fileforward.open_connection(tunnel_dir)
    server = await fileforward.start_server(handle_client, tunnel_dir)

The readers and writers are the standard asyncio.StreamReader / StreamWriter.
create_connection / create_server take a protocol factory instead, like the loop's
methods of those names.
"""
from .api import Connector, Server, create_connection, create_server, open_connection, start_server
from .errors import (EndpointFailedError, NoServerError, PeerLostError, ProtocolError, ServerAlreadyRunningError, TunnelError,
                     UnsafeTunnelDirError)
from .options import Options
from .tunneldir import default_tunnel_dir

__version__ = "0.1.0"

__all__ = [
    "open_connection", "start_server", "create_connection", "create_server", "Connector", "Server", "Options", "default_tunnel_dir",
    "TunnelError", "EndpointFailedError", "NoServerError", "PeerLostError", "ProtocolError", "ServerAlreadyRunningError",
    "UnsafeTunnelDirError", "__version__",
]
