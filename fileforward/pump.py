"""Copying bytes between two stream pairs (a TCP socket and a tunnel connection)."""
from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

CHUNK = 256 * 1024


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close `writer` so the far side sees the EOF too."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


async def splice(a: "tuple[asyncio.StreamReader, asyncio.StreamWriter]",
                 b: "tuple[asyncio.StreamReader, asyncio.StreamWriter]") -> None:
    """Copy both ways until both directions ended (half-close preserved), then close.

    If either direction fails, or the splice is cancelled, both sides are aborted
    so that each peer sees a reset rather than a clean end.
    """
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    tasks = [asyncio.ensure_future(pipe(a_reader, b_writer)), asyncio.ensure_future(pipe(b_reader, a_writer))]
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failures = [t.exception() for t in done if t.exception() is not None]
        if failures:
            log.debug("connection ended with an error: %s", failures[0])
        else:
            clean = True
    finally:
        for task in tasks:
            task.cancel()
        for writer in (a_writer, b_writer):
            if clean:
                writer.close()
            else:
                writer.transport.abort()
        for writer in (a_writer, b_writer):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
