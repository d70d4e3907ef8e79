"""What every way of moving frames shares (asyncio streams, sockets read by threads)."""
from __future__ import annotations

import time

from .errors import ConnectionLost, ProtocolError, TruncatedFrameError
from .protocol import HANDSHAKE_MAX_FRAME, FrameDecoder

#: Bytes asked of one read of a stream or socket.
READ_SIZE = 1 << 18


class Framing:
    """What every way of moving frames shares: the decoder and both frame limits."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.decoder = FrameDecoder(HANDSHAKE_MAX_FRAME)
        #: The largest payload the peer accepts (raised after the handshake).
        self.peer_max_frame = HANDSHAKE_MAX_FRAME
        #: When the peer last showed life (monotonic clock): any bytes received, even
        #: part of a frame, or part of a large frame taken off our hands.
        self.last_activity = time.monotonic()

    def saw_activity(self) -> None:
        """Bytes arrived, or a slice of a large frame went out: the peer is alive."""
        self.last_activity = time.monotonic()

    def set_limits(self, max_frame: int, peer_max_frame: int) -> None:
        """After authentication: accept and send frames up to the agreed sizes."""
        self.decoder.max_frame = max_frame
        self.peer_max_frame = peer_max_frame

    def check_size(self, size: int, what: str) -> None:
        """Raise ProtocolError if the peer would refuse a payload of ``size`` bytes."""
        if size > self.peer_max_frame:
            raise ProtocolError(
                f"{what} is {size} bytes, more than the peer's frame limit of "
                f"{self.peer_max_frame} bytes (raise max_frame on both ends)")

    def end_of_stream(self) -> ConnectionLost:
        """The error for the peer closing the stream (in the middle of a frame or not)."""
        if self.decoder.mid_frame():
            return TruncatedFrameError(
                f"connection to {self.peer} ended in the middle of a frame")
        return ConnectionLost(f"connection closed by {self.peer}")
