"""The client's socket driver on its own, over a socketpair (no server)."""
import socket
import threading

from rpc.protocol import DEFAULT_MAX_FRAME, FrameDecoder, Kind
from rpc.socketlink import SocketLink


def test_a_send_started_while_this_thread_writes_a_frame_goes_out_after_it():
    # A finalizer run by the garbage collector in the middle of a send (a dropped
    # stream cancels itself) must neither deadlock on the write lock nor split a frame.
    ours, theirs = socket.socketpair()
    link = SocketLink(ours)

    class Interrupted:
        """The socket, with a finalizer's send arriving during the first write."""

        def __init__(self):
            self.first = True

        def sendall(self, data):
            if self.first:
                self.first = False
                link.soon(link.send, Kind.CANCEL, 7)
            ours.sendall(data)

        def shutdown(self, how):
            ours.shutdown(how)

    link.sock = Interrupted()
    link._callers = 1  # a caller reads for itself: no background reader to wake
    sender = threading.Thread(target=link.send, args=(Kind.PING, 1), daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "deadlocked on the write lock"
    theirs.settimeout(10)
    frames = FrameDecoder(DEFAULT_MAX_FRAME).feed(theirs.recv(1000))
    assert [(f.kind, f.request_id) for f in frames] == [(Kind.PING, 1), (Kind.CANCEL, 7)]
    ours.close()
    theirs.close()
