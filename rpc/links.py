"""How a client connection's frames move: two thin drivers of the same client core.

:class:`LoopLink` (here) runs on an asyncio event loop and works over any stream
(the file transport, a subprocess's pipes). :class:`~rpc.socketlink.SocketLink`
serves TCP and Unix sockets without an event loop on the path of a call.

Both deliver to a :class:`Receiver` (the client connection): ``receive(frame)``
for each frame, ``tick()`` every ``interval`` seconds (False: the peer is presumed
dead, stop reading), and ``fail(error)`` once, when reading ends.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import threading
from typing import Any, Callable, ContextManager, List, Optional, Protocol

from .channel import Channel
from .errors import ConnectionLost, RPCError
from .protocol import Flag, Frame, Kind, Payload

log = logging.getLogger(__name__)


class Receiver(Protocol):
    """What a link drives (implemented by the client connection)."""

    def receive(self, frame: Frame) -> None:
        """Act on one frame; raise RPCError to end the connection."""

    def tick(self) -> bool:
        """Periodic liveness check; False once the peer is presumed dead."""

    def busy(self) -> bool:
        """True while calls or streams wait for frames."""

    def fail(self, error: RPCError) -> None:
        """Reading has ended with ``error``; fail whatever still waits."""


class LoopLink:
    """Frames over an asyncio :class:`Channel`; everything runs on its loop."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tasks: List[asyncio.Task] = []

    def check_size(self, size: int, what: str) -> None:
        """Raise ProtocolError if the peer would refuse a payload of ``size`` bytes."""
        self.channel.check_size(size, what)

    def send(self, kind: Kind, request_id: int = 0, payload: Payload = b"",
             flags: Flag = Flag.NONE) -> None:
        """Queue one frame (loop thread only: use :meth:`soon` from elsewhere)."""
        self.channel.send(kind, request_id, payload, flags)

    def notice_end(self) -> None:
        """Nothing to do: the loop notices the end of the stream as it comes."""

    def ping(self) -> None:
        """Queue a PING (loop thread only)."""
        self.channel.send(Kind.PING)

    @property
    def last_activity(self) -> float:
        """When the server last showed life (see :class:`~rpc.framing.Framing`)."""
        return self.channel.last_activity

    def attending(self) -> ContextManager[None]:
        """Nothing to do: the loop reads for every caller."""
        return contextlib.nullcontext()

    def wait(self, future: cf.Future, timeout: Optional[float]) -> Any:
        """``future.result(timeout)``: the loop delivers it."""
        return future.result(timeout)

    def soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (directly if already on it)."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: the connection is gone already
            pass

    def start(self, receiver: Receiver, interval: float) -> None:
        """Start reading frames and ticking (loop thread)."""
        self._tasks = [asyncio.ensure_future(self._read(receiver)),
                       asyncio.ensure_future(self._beat(receiver, interval))]

    async def _read(self, receiver: Receiver) -> None:
        try:
            while True:
                receiver.receive(await self.channel.recv())
        except asyncio.CancelledError:
            error: RPCError = ConnectionLost("the connection was closed by this client")
        except Exception as exc:
            error = reading_error(exc)
        receiver.fail(error)
        await self.channel.aclose()

    async def _beat(self, receiver: Receiver, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not receiver.tick():
                self._tasks[0].cancel()
                return

    async def aclose(self) -> None:
        """Stop reading and close the stream."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def reading_error(exc: Exception) -> RPCError:
    """Why reading ended, as the error the waiting calls get; call in ``except``."""
    if isinstance(exc, RPCError):
        return exc
    log.exception("RPC client reader failed")  # a bug: never leave callers waiting
    return ConnectionLost(f"the RPC client failed: {exc!r}")
