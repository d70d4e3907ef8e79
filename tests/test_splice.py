"""The protocol-level splice (fileforward/pump.py) through a real `serve` and requester
in one process: real sockets on loopback, a real tunnel directory."""
from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from urllib.parse import urlsplit

from fileforward.forwardspec import Permit, parse_listen
from fileforward.netforward import Requests, requesting, serving
from fileforward.options import Options
from tests.test_transport import echo, run


def test_bytes_sent_with_the_socks_request_go_on_first_and_half_close_ends_cleanly(tmp_path: Path) -> None:
    """An application that sends its first bytes right behind its SOCKS5 request,
    without waiting for the replies, has them carried in order: they sit in the
    proxy's StreamReader when the splice takes the connection over. Its EOF then
    reaches the service, whose EOF comes back (a clean close, both ways)."""
    payload = bytes(range(256)) * 64

    async def scenario() -> bytes:
        service = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = service.sockets[0].getsockname()[1]
        options = Options()
        async with service, serving(tmp_path, Permit([]), options), \
                requesting(tmp_path, Requests(socks=[parse_listen("127.0.0.1:0")]), options) as requester:
            proxy = urlsplit(requester.proxies.socks)
            reader, writer = await asyncio.open_connection(proxy.hostname, proxy.port)
            writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + bytes([127, 0, 0, 1]) + struct.pack(">H", port)
                         + payload)
            writer.write_eof()
            answer = await reader.read(-1)  # to EOF: a reset would raise instead
            writer.close()
            return answer

    answer = run(scenario())
    assert answer[:12] == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6)
    assert answer[12:] == payload
