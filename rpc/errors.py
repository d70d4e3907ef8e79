"""Exceptions of the RPC layer.

Infrastructure failures all derive from :class:`RPCError`, so that a caller can
always tell "the link or the protocol failed" apart from "the remote function
raised" (the function's own exceptions are re-raised with their original type).
"""


class RPCError(Exception):
    """Base class of every failure of the RPC machinery itself."""


class ServerNotRunningError(RPCError, ConnectionRefusedError):
    """No live server answered within the connect timeout."""


class ConnectionLost(RPCError, ConnectionError):
    """The peer died or the link broke; calls in flight have an unknown outcome."""


class AuthenticationError(RPCError, PermissionError):
    """The peer does not hold the same key (or the key file is missing or unsafe)."""


class ProtocolError(RPCError):
    """The peer sent bytes that are not a valid frame, or speaks another version."""


class SerializationError(RPCError):
    """Arguments or results could not be pickled or unpickled."""


class RemoteSerializationError(SerializationError):
    """The server could not pickle a return value (or a streamed item).

    The connection stays usable; only that call failed.
    """


class FunctionNotFoundError(RPCError, LookupError):
    """The server has no function of that name (the message lists those it has)."""


class RemoteTraceback(Exception):
    """Carries the server-side traceback text as the ``__cause__`` of a re-raised error."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


class TruncatedFrameError(ProtocolError, ConnectionLost):
    """The stream ended in the middle of a frame.

    Both a protocol violation and a lost connection: a peer that dies while sending
    looks exactly like one that sends a truncated frame.
    """
