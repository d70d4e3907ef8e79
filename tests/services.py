"""Tiny TCP services the end-to-end tests put behind the tunnel, run as subprocesses.

    python -m tests.services echo PORT       echo every byte back, half-close aware
    python -m tests.services report PORT     echo, and print "ENDED clean" or "ENDED reset"
                                             when a connection ends
    python -m tests.services digest PORT     read to EOF, answer "<length> <sha256>\\n"
    python -m tests.services download PORT   read a line "<n>\\n", send n bytes, close
    python -m tests.services reset PORT      read a line, then reset the connection (RST)

Each prints READY once listening on 127.0.0.1:PORT, and serves until killed.
"""
import asyncio
import hashlib
import socket
import struct
import sys
from typing import Awaitable, Callable


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        data = await reader.read(256 * 1024)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()


async def report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await echo(reader, writer)
    except ConnectionError:
        print("ENDED reset", flush=True)
        raise
    print("ENDED clean", flush=True)


async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sha, length = hashlib.sha256(), 0
    while True:
        data = await reader.read(256 * 1024)
        if not data:
            break
        sha.update(data)
        length += len(data)
    writer.write(f"{length} {sha.hexdigest()}\n".encode())
    await writer.drain()


async def download(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    remaining = int(await reader.readline())
    block = bytes(range(256)) * 1024
    while remaining > 0:
        writer.write(block[:remaining])
        remaining -= len(block)
        await writer.drain()


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def session(handler: Handler) -> Handler:
    """Run one connection: a peer that goes away is no error; the socket is closed at the end."""
    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
    return run


async def main(kind: str, port: int) -> None:
    handler = {"echo": echo, "report": report, "digest": digest, "download": download, "reset": reset}[kind]
    server = await asyncio.start_server(session(handler), "127.0.0.1", port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
