"""The sync driver's one way to write (rpc/sync.py), over a socketpair: frames never
interleave, a finalizer's frame sent in the middle of a write goes out after it, the
reading thread never waits for a writer, and another thread waits for one only when
the backlog is large."""
import socket
import threading
import time

import pytest

from rpc import frames
from rpc.frames import Flag, Kind
from rpc.protocol import JOIN_LIMIT, ClientProtocol, ServerProtocol, StreamOpened
from rpc.sync import SyncClientDriver

from tests.polling import wait_until

KEY = b"k" * 32

pytestmark = pytest.mark.timeout(60)


def opened_client_core():
    """A client core past the handshake (done with a server core, without I/O)."""
    client, server = ClientProtocol(lambda: KEY), ServerProtocol(KEY)
    for sender, receiver in [(client, server), (server, client)] * 2:
        for data in sender.data_to_send():
            receiver.receive_data(data)
    client.events_received()
    return client


def received(sock, size):
    """Decode ``size`` bytes read from ``sock``."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(1 << 20)
        assert chunk, "the stream ended early"
        data += chunk
    return frames.FrameDecoder(frames.DEFAULT_MAX_FRAME).feed(bytes(data))


def test_a_frame_sent_by_a_finalizer_during_a_write_goes_out_after_it():
    # The garbage collector may run a dropped stream's finalizer (which cancels it)
    # in the middle of a send, in the sending thread: no deadlock, no split frame.
    ours, theirs = socket.socketpair()
    core = opened_client_core()
    driver = SyncClientDriver(core, ours)

    class Interrupted:
        """The socket, with a finalizer's send arriving during the first write."""

        def __init__(self):
            self.first = True

        def sendall(self, data):
            if self.first:
                self.first = False
                driver.run(core.ping)
            ours.sendall(data)

    driver.sock = Interrupted()
    sender = threading.Thread(target=driver.run, args=(core.info, "token"), daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "deadlocked on the write lock"
    theirs.settimeout(10)
    assert [f.kind for f in received(theirs, 32)] == [Kind.INFO, Kind.PING]
    ours.close()
    theirs.close()


def blocked_writer(before=None):
    """A client driver over a socketpair with small buffers, and a thread blocked
    writing an 8 MiB CALL that the peer does not read yet. ``before``: a payload to
    call with first (its request id is returned). Returns (driver, peer socket, the
    writing thread, the big payload, that request id)."""
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    core = opened_client_core()
    driver = SyncClientDriver(core, ours)
    first = driver.run(core.call, before, "stream", "the arguments") if before else None
    big = b"x" * (8 << 20)
    writer = threading.Thread(target=driver.run, args=(core.call, big, "big", "the arguments"),
                              daemon=True)
    writer.start()
    wait_until(lambda: driver._writer is not None, what="the writer to hold the socket")
    return driver, theirs, writer, big, first


def test_the_reading_thread_never_waits_for_a_writer():
    # A writer blocked on a large frame (the peer reads nothing) holds the socket;
    # the reader's own answer (the first CREDIT of a stream) is left to that writer,
    # and the reader goes on reading: waiting could deadlock both ends.
    driver, theirs, writer, big, streaming = blocked_writer(before=b"small")
    theirs.sendall(frames.encode_frame(Kind.RESULT, streaming, b"", Flag.STREAM))
    started = time.monotonic()
    events = driver.read_once(10)
    assert events == [StreamOpened("stream", streaming)]
    assert time.monotonic() - started < 5
    assert writer.is_alive()  # still blocked: the peer has read nothing yet
    theirs.settimeout(10)
    header = frames.HEADER.size
    frames_out = received(theirs, 3 * header + len(b"small") + len(big) + 4)
    writer.join(10)
    assert [(f.kind, f.request_id) for f in frames_out] == [
        (Kind.CALL, streaming), (Kind.CALL, streaming + 1), (Kind.CREDIT, streaming)]
    assert bytes(frames_out[1].payload) == big
    driver.sock.close()
    theirs.close()


def test_a_small_frame_is_left_to_a_busy_writer_and_a_large_backlog_waits_for_it():
    # A writer blocked on a large frame (the peer reads nothing yet) holds the socket:
    # a thread with a small frame leaves it to that writer and goes on at once; one
    # that would queue more than JOIN_LIMIT bytes waits (back-pressure). All go out
    # whole, in the core's order.
    driver, theirs, writer, big, _ = blocked_writer()
    core = driver.core
    small = threading.Thread(target=driver.run, args=(core.ping,), daemon=True)
    small.start()
    small.join(10)
    assert not small.is_alive(), "a small frame waited for the busy writer"
    large = b"y" * (JOIN_LIMIT + 1)
    waiting = threading.Thread(target=driver.run, args=(core.call, large, "large", "args"),
                               daemon=True)
    waiting.start()
    wait_until(lambda: sum(map(len, driver._outgoing)) > JOIN_LIMIT,
               what="the large frame to be queued")
    assert waiting.is_alive(), "a large backlog did not wait for the writer"
    theirs.settimeout(10)
    header = frames.HEADER.size
    out = received(theirs, 3 * header + len(big) + len(large))
    writer.join(10)
    waiting.join(10)
    assert not writer.is_alive() and not waiting.is_alive()
    assert [f.kind for f in out] == [Kind.CALL, Kind.PING, Kind.CALL]
    assert bytes(out[0].payload) == big and bytes(out[2].payload) == large
    driver.sock.close()
    theirs.close()
