"""Exceptions raised by the file transport."""


class TunnelError(OSError):
    """Base class of the transport's own errors."""


class NoServerError(TunnelError, ConnectionRefusedError):
    """No live server answered in the tunnel directory within the connect timeout."""


class ServerAlreadyRunningError(TunnelError):
    """Another live server already serves this tunnel directory."""


class UnsafeTunnelDirError(TunnelError, PermissionError):
    """The tunnel directory is owned by someone else or writable by group/others."""


class PeerLostError(TunnelError, ConnectionResetError):
    """The peer endpoint stopped proving it is alive, or reset the connection."""


class ProtocolError(TunnelError, ConnectionError):
    """A record in a tunnel file is malformed or from an incompatible version."""


class TunnelDirLostError(TunnelError, FileNotFoundError):
    """The tunnel directory was deleted while in use."""


class EndpointFailedError(TunnelError):
    """The endpoint stopped because it could not go on serving (the cause is chained).

    Already logged at ERROR by the endpoint when raised from a running endpoint.
    """
