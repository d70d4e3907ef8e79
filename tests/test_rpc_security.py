"""Authentication, version checks and malformed input: one bad peer never hurts the others."""
import asyncio
import logging
import os
import random
import pickle
import socket

import pytest

import rpc
from rpc import auth, frames, protocol
from rpc.frames import Kind
from rpc_helpers import FrameStream, RawConnection, ServerThread
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("rpc_env")


@pytest.fixture
def caplog_rpc(caplog):
    caplog.set_level(logging.INFO, logger="rpc")
    return caplog


def logged(caplog, text):
    return any(text in record.getMessage() for record in caplog.records)


def test_server_creates_the_key_file_0600(server, rpc_env):
    key_file = rpc_env / "rpc.key"
    assert key_file.exists() and key_file.stat().st_mode & 0o777 == 0o600


def test_wrong_key_is_refused_and_logged_and_others_keep_working(server, client, sock,
                                                                 tmp_path, caplog_rpc):
    other = tmp_path / "other.key"
    auth.load_key(other, create=True)
    with pytest.raises(rpc.AuthenticationError, match="does not match"):
        rpc.connect(unix=sock, key_file=other)
    # The server logs after sending its refusal, in its own thread: wait for it.
    wait_until(lambda: logged(caplog_rpc, "rejected connection"), what="the log line")
    assert client.call("echo", "unaffected") == "unaffected"


def test_missing_key_on_the_client(server, sock, tmp_path):
    with pytest.raises(rpc.AuthenticationError, match="no RPC key file"):
        rpc.connect(unix=sock, key_file=tmp_path / "absent.key")


class FakeServer:
    """A hand-written server on a Unix socket, running ``handler(channel)``."""

    def __init__(self, path, handler):
        self.thread = ServerThread({}, unix=str(path) + ".unused")

        async def serve(reader, writer):
            channel = FrameStream(reader, writer)
            try:
                await handler(channel)
            finally:
                await channel.aclose()

        self.server = self.thread.run(asyncio.start_unix_server(serve, str(path)))

    def stop(self):
        async def close():  # on the server's own loop: asyncio servers are not thread-safe
            self.server.close()
        self.thread.run(close())
        self.thread.stop()


def test_impostor_server_without_the_key_is_detected(sock):
    async def impostor(channel):
        await channel.recv()
        channel.send(Kind.HELLO, payload=frames.encode_json(
            {"proto": 1, "nonce": auth.new_nonce(), "max_frame": 1 << 20, "versions": {}}))
        await channel.recv()
        channel.send(Kind.AUTH_OK, payload=frames.encode_json({"mac": "0" * 64}))
        await channel.drain()

    auth.load_key(create=True)
    fake = FakeServer(sock, impostor)
    try:
        with pytest.raises(rpc.AuthenticationError, match="does not hold the same RPC key"):
            rpc.connect(unix=sock)
    finally:
        fake.stop()


def test_client_reports_both_versions_of_an_incompatible_server(sock):
    async def future_server(channel):
        await channel.recv()
        payload = frames.encode_json({"proto": 99, "nonce": auth.new_nonce()})
        channel.writer.write(frames.HEADER.pack(len(payload), 99, Kind.HELLO, 0, 0) + payload)
        await channel.drain()

    auth.load_key(create=True)
    fake = FakeServer(sock, future_server)
    try:
        with pytest.raises(rpc.ProtocolError, match="server speaks version 99, this side "
                                                    "speaks version 1"):
            rpc.connect(unix=sock)
    finally:
        fake.stop()


def test_server_rejects_an_incompatible_client_naming_both_versions(server, sock):
    raw = RawConnection(sock)
    raw.hello(proto=7)
    assert raw.recv().kind is Kind.HELLO
    reject = raw.recv()
    assert reject.kind is Kind.REJECT
    assert "client speaks version 7, this side speaks version 1" in \
        frames.decode_json(reject.payload)["reason"]
    assert raw.closed_by_peer()


def test_version_mismatch_that_may_break_unpickling_is_a_warning(server, sock, caplog_rpc):
    versions = dict(protocol.versions(), python="2.7.18", cloudpickle="0.1")
    raw = RawConnection(sock)
    raw.authenticate(auth.load_key(), versions=versions)
    raw.close()
    assert logged(caplog_rpc, "Python 3.") and logged(caplog_rpc, "cloudpickle")
    assert any(record.levelno == logging.WARNING and "cloudpickle" in record.getMessage()
               for record in caplog_rpc.records)


def test_client_garbage_from_the_server_is_protocol_error(sock):
    key = auth.load_key(create=True)

    async def garbage_after_auth(channel):
        await channel.server_handshake(key)
        await channel.recv()  # the CALL
        channel.writer.write(b"\xff" * 64)
        await channel.drain()
        await channel.recv()

    fake = FakeServer(sock, garbage_after_auth)
    try:
        with rpc.connect(unix=sock) as c:
            with pytest.raises(rpc.ProtocolError, match="malformed frame"):
                c.call("anything")
            assert c.closed
    finally:
        fake.stop()


def _random_bytes():
    return random.Random(7).randbytes(256)


@pytest.mark.parametrize("authenticated, data, log_text", [
    (False, _random_bytes(), "malformed frame"),
    (False, frames.HEADER.pack(2**31, 1, Kind.HELLO, 0, 0), "exceeds the limit"),
    (False, frames.encode_frame(Kind.CALL, 1, b"x"), "expected a HELLO"),
    (False, frames.encode_frame(Kind.HELLO, 0, b"not json"), "malformed handshake"),
    (False, frames.encode_frame(Kind.HELLO, 0, b"x" * 100)[:60], "middle of a frame"),
    (True, _random_bytes(), "malformed frame"),
    (True, frames.HEADER.pack(2**32 - 1, 1, Kind.CALL, 0, 1), "exceeds the limit"),
    (True, frames.encode_frame(Kind.RESULT, 1, b""), "unexpected RESULT"),
    (True, frames.encode_frame(Kind.CALL, 1, b"\x00\x50ab"), "malformed CALL"),
    (True, frames.encode_frame(Kind.CREDIT, 1, b"\x01"), "malformed CREDIT"),
    (True, frames.encode_frame(Kind.CALL, 1, b"x" * 1000)[:500], "middle of a frame"),
], ids=["random", "huge-hello", "call-before-auth", "bad-json", "truncated-hello",
        "random-after-auth", "huge-frame", "unexpected-kind", "bad-call", "bad-credit",
        "truncated-call"])
def test_malformed_input_drops_only_that_connection(server, client, sock, caplog_rpc,
                                                    authenticated, data, log_text):
    raw = RawConnection(sock)
    if authenticated:
        raw.authenticate(auth.load_key())
    raw.sock.sendall(data)
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.closed_by_peer()
    raw.close()
    wait_until(lambda: logged(caplog_rpc, log_text), what=f"a log line with {log_text!r}")
    assert client.call("echo", "still serving") == "still serving"
    with rpc.connect(unix=sock) as fresh:
        assert fresh.call("add", 1, 1) == 2


def test_garbage_before_auth_is_never_unpickled(server, sock, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = RawConnection(sock)
    raw.send(Kind.CALL, 1, frames.encode_call("echo", (Exploit(),), {})[0]
             + pickle.dumps(((Exploit(),), {})))
    assert raw.closed_by_peer()
    assert not marker.exists()


@pytest.mark.parametrize("name", ["aecho", "echo", "count"])
def test_cancel_in_the_same_packet_as_the_call_leaves_nothing_behind(server, sock, name):
    raw = RawConnection(sock)
    raw.authenticate(auth.load_key())
    head, args = frames.encode_call(name, (1,), {})
    raw.sock.sendall(frames.encode_frame(Kind.CALL, 5, head + args)
                     + frames.encode_frame(Kind.CANCEL, 5))
    wait_until(lambda: server.stats()["calls_served"] == 1 and server.stats()["in_flight"] == 0,
               what="the call to be forgotten")
    raw.send(Kind.INFO, 6)
    reply = raw.recv()
    while reply.request_id != 6:  # a late result of call 5 may come first
        reply = raw.recv()
    assert pickle.loads(reply.payload)["in_flight"] == 0
    raw.close()
