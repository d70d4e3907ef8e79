"""Tiny TCP services the end-to-end tests put behind the tunnel, run as subprocesses.

    python -m tests.services echo PORT     echo every byte back, half-close aware
    python -m tests.services digest PORT   read to EOF, answer "<length> <sha256>\\n"

Each prints READY once listening on 127.0.0.1:PORT, and serves until killed.
"""
import asyncio
import hashlib
import sys


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sha, length = hashlib.sha256(), 0
    try:
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                break
            sha.update(data)
            length += len(data)
        writer.write(f"{length} {sha.hexdigest()}\n".encode())
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(kind: str, port: int) -> None:
    handler = {"echo": echo, "digest": digest}[kind]
    server = await asyncio.start_server(handler, "127.0.0.1", port)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
