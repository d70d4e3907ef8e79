"""The RPC protocol core (rpc/protocol.py) on its own: bytes in, events and bytes out,
no socket, thread or event loop. Two cores talk by handing each other their bytes."""
import random

import pytest

import rpc
from rpc import frames
from rpc.frames import Kind
from rpc.protocol import (CallCancelled, CallReceived, ClientProtocol, CreditGranted,
                          InfoRequested, Opened, Replied, ServerProtocol, State, StreamEnded,
                          StreamItem, StreamOpened)

KEY = b"k" * 32

pytestmark = pytest.mark.timeout(60)


def pump(sender, receiver):
    """Deliver everything ``sender`` has to send to ``receiver``; its events."""
    for data in sender.data_to_send():
        receiver.receive_data(data)
    return receiver.events_received()


def wire(core):
    """The frames ``core`` has to send, decoded."""
    decoder = frames.FrameDecoder(frames.DEFAULT_MAX_FRAME)
    return [frame for data in core.data_to_send() for frame in decoder.feed(data)]


def opened(client_key=KEY, server_key=KEY, **client_kwargs):
    client = ClientProtocol(lambda: client_key, **client_kwargs)
    server = ServerProtocol(server_key)
    assert pump(client, server) == []  # HELLO
    assert pump(server, client) == []  # HELLO
    [server_opened] = pump(client, server)  # AUTH
    [client_opened] = pump(server, client)  # AUTH_OK
    assert isinstance(server_opened, Opened) and isinstance(client_opened, Opened)
    assert client.state is server.state is State.OPEN
    return client, server


def call(client, server, name="f", token="t"):
    head, args = frames.encode_call(name, (1,), {})
    request_id = client.call((head, args), token, "the arguments")
    [event] = pump(client, server)
    assert event == CallReceived(request_id, name, event.args)
    return request_id


# ---------------------------------------------------------------- handshake

def test_handshake_authenticates_both_ends_and_raises_the_frame_limit():
    client, server = opened(max_frame=1 << 20)
    assert server.peer_hello["max_frame"] == 1 << 20 and client.peer_max_frame > (1 << 16)
    assert server.peer_max_frame == 1 << 20
    big = b"x" * 200_000  # more than the 64 KiB allowed before authentication
    server.receive_data(frames.encode_frame(Kind.CALL, 1, frames.encode_call("f", (big,), {})))
    [event] = server.events_received()
    assert event.name == "f" and frames.loads(event.args)[0] == (big,)


def test_a_client_with_another_key_is_rejected_with_the_reason():
    client = ClientProtocol(lambda: b"other key")
    server = ServerProtocol(KEY)
    pump(client, server)
    pump(server, client)
    with pytest.raises(rpc.AuthenticationError, match="does not match the server's key"):
        pump(client, server)
    assert server.state is State.CLOSED
    with pytest.raises(rpc.AuthenticationError, match="refused the connection.*does not match"):
        pump(server, client)  # the REJECT


def test_a_server_without_the_key_is_found_out_by_the_client():
    client = ClientProtocol(lambda: KEY)  # the impostor answers AUTH_OK without the key
    hello = frames.encode_json({"proto": 1, "nonce": rpc.auth.new_nonce(), "max_frame": 1 << 20})
    client.receive_data(frames.encode_frame(Kind.HELLO, 0, hello))
    with pytest.raises(rpc.AuthenticationError, match="does not hold the same RPC key"):
        client.receive_data(frames.encode_frame(Kind.AUTH_OK, 0,
                                                frames.encode_json({"mac": "0" * 64})))


def test_the_key_is_read_only_once_a_server_answered():
    asked = []
    client = ClientProtocol(lambda: asked.append(1) or KEY)
    server = ServerProtocol(KEY)
    pump(client, server)
    assert asked == []
    pump(server, client)
    assert asked == [1]


@pytest.mark.parametrize("side", ["client", "server"])
def test_another_protocol_version_is_refused_naming_both(side):
    hello = frames.encode_json({"proto": 7, "nonce": rpc.auth.new_nonce(), "max_frame": 100})
    data = frames.HEADER.pack(len(hello), 7, Kind.HELLO, 0, 0) + hello
    core = ClientProtocol(lambda: KEY) if side == "client" else ServerProtocol(KEY)
    core.data_to_send()
    peer = "server" if side == "client" else "client"
    with pytest.raises(rpc.ProtocolError, match=f"the {peer} speaks version 7, this side "
                                                f"speaks version 1"):
        core.receive_data(data)


@pytest.mark.parametrize("kind", [Kind.CALL, Kind.INFO, Kind.AUTH_OK])
def test_nothing_but_the_handshake_is_accepted_before_authentication(kind):
    server = ServerProtocol(KEY)
    with pytest.raises(rpc.ProtocolError, match=f"expected a HELLO .* got {kind.name}"):
        server.receive_data(frames.encode_frame(kind, 1, b"\x80\x04N."))  # a pickle
    [reject] = wire(server)
    assert reject.kind is Kind.REJECT and frames.decode_json(reject.payload)["error"] == "protocol"


def test_frames_are_limited_to_64_kib_before_authentication():
    server = ServerProtocol(KEY)
    with pytest.raises(rpc.ProtocolError, match="exceeds the limit of 65536"):
        server.receive_data(frames.encode_header(Kind.HELLO, 0, 65537))


def test_after_a_violation_the_core_takes_nothing_more():
    server = ServerProtocol(KEY)
    with pytest.raises(rpc.ProtocolError):
        server.receive_data(b"\xff" * 16)
    server.receive_data(b"anything")  # ignored: the connection is over
    assert server.events_received() == []


# ---------------------------------------------------------------- calls

def test_a_call_and_its_result():
    client, server = opened()
    request_id = call(client, server, token="mine")
    server.reply(request_id, True, frames.dumps(42))
    [event] = pump(server, client)
    assert event == Replied("mine", True, event.payload) and frames.loads(event.payload) == 42
    assert not client.busy


def test_an_error_reply_and_info():
    client, server = opened()
    request_id = call(client, server)
    server.reply(request_id, False, frames.pack_error(KeyError("k")))
    [event] = pump(server, client)
    assert not event.ok and type(frames.unpack_error(event.payload)) is KeyError
    info_id = client.info("info")
    assert pump(client, server) == [InfoRequested(info_id)]
    server.reply(info_id, True, frames.dumps({"alive": True}))
    assert frames.loads(pump(server, client)[0].payload) == {"alive": True}


def test_request_ids_are_new_for_every_request_and_reused_ids_are_refused():
    client, server = opened()
    ids = [call(client, server) for _ in range(3)]
    assert ids == sorted(set(ids))
    with pytest.raises(rpc.ProtocolError, match=f"request id {ids[0]} is already in use"):
        server.receive_data(frames.encode_frame(Kind.CALL, ids[0], frames.encode_call("f", (), {})))


def test_a_reply_too_large_for_the_client_becomes_an_error_that_fits():
    client, server = opened(max_frame=4096)
    request_id = call(client, server)
    server.reply(request_id, True, b"x" * 5000)
    [event] = pump(server, client)
    assert not event.ok
    assert "more than the peer's frame limit of 4096" in str(frames.unpack_error(event.payload))


def test_a_reply_to_a_client_that_accepts_almost_nothing_raises():
    client, server = opened(max_frame=20)
    request_id = call(client, server)
    with pytest.raises(rpc.ProtocolError):
        server.reply(request_id, True, b"x" * 100)


def test_a_request_larger_than_the_server_accepts_is_refused_before_sending():
    client = ClientProtocol(lambda: KEY)
    server = ServerProtocol(KEY, max_frame=1000)
    for sender, receiver in [(client, server), (server, client)] * 2:
        pump(sender, receiver)
    with pytest.raises(rpc.ProtocolError, match="the arguments is 2000 bytes"):
        client.call(b"x" * 2000, "t", "the arguments")
    assert client.data_to_send() == [] and not client.busy


def test_cancel_reaches_the_server_and_no_reply_follows():
    client, server = opened()
    request_id = call(client, server)
    assert client.cancel(request_id) and not client.cancel(request_id)
    assert pump(client, server) == [CallCancelled(request_id)]
    server.reply(request_id, True, frames.dumps(1))
    assert server.data_to_send() == []


def test_a_late_reply_to_a_call_cancelled_by_the_client_is_dropped():
    client, server = opened()
    request_id = call(client, server)
    server.reply(request_id, True, frames.dumps(1))
    client.cancel(request_id)
    assert pump(server, client) == []


def test_pings_are_answered_by_the_server_core():
    client, server = opened()
    client.ping()
    assert pump(client, server) == []
    [pong] = wire(server)
    assert pong.kind is Kind.PONG
    client.receive_data(frames.encode_frame(Kind.PONG))
    assert client.events_received() == []


@pytest.mark.parametrize("kind", [Kind.CALL, Kind.CANCEL, Kind.CREDIT, Kind.PING, Kind.HELLO])
def test_the_client_refuses_what_only_a_client_sends(kind):
    client, _ = opened()
    with pytest.raises(rpc.ProtocolError, match=f"unexpected {kind.name} message from the server"):
        client.receive_data(frames.encode_frame(kind, 1, b""))


@pytest.mark.parametrize("kind", [Kind.RESULT, Kind.STREAM_ITEM, Kind.PONG, Kind.AUTH])
def test_the_server_refuses_what_only_a_server_sends(kind):
    _, server = opened()
    with pytest.raises(rpc.ProtocolError, match=f"unexpected {kind.name} message from a client"):
        server.receive_data(frames.encode_frame(kind, 1, b""))


def test_the_end_of_the_stream_says_whether_a_frame_was_cut():
    client, server = opened()
    server.receive_data(frames.encode_frame(Kind.PING)[:5])
    with pytest.raises(rpc.TruncatedFrameError, match="middle of a frame"):
        server.receive_eof()
    with pytest.raises(rpc.ConnectionLost, match="connection closed by server") as lost:
        client.receive_eof()
    assert type(lost.value) is rpc.ConnectionLost


def test_abandon_gives_back_every_waiting_token_and_closes():
    client, server = opened(stream_window=4)
    call(client, server, token="a")
    streaming = call(client, server, token="b")
    server.start_stream(streaming)
    pump(server, client)
    assert sorted(client.abandon()) == ["a", "b"]
    assert client.state is State.CLOSED and not client.busy
    with pytest.raises(rpc.ConnectionLost):
        client.call(b"", "c", "x")


# ---------------------------------------------------------------- streams

def test_a_stream_flows_under_credit():
    client, server = opened(stream_window=4)
    request_id = call(client, server, token="s")
    assert server.start_stream(request_id)
    assert pump(server, client) == [StreamOpened("s", request_id)]
    assert pump(client, server) == [CreditGranted(request_id)]  # the first window
    assert server.credit(request_id) == 4
    for n in range(4):
        assert server.send_item(request_id, frames.dumps(n))
    assert server.credit(request_id) == 0
    with pytest.raises(RuntimeError, match="no credit"):
        server.send_item(request_id, frames.dumps(4))
    items = pump(server, client)
    assert [frames.loads(e.payload) for e in items] == [0, 1, 2, 3]
    assert all(type(e) is StreamItem and e.token == "s" for e in items)
    client.grant(request_id, 2)
    pump(client, server)
    assert server.credit(request_id) == 2
    server.end_stream(request_id)
    assert pump(server, client) == [StreamEnded("s", None)]
    assert not client.busy


def test_an_item_beyond_the_credit_is_a_protocol_error():
    client, server = opened(stream_window=2)
    request_id = call(client, server)
    server.start_stream(request_id)
    pump(server, client)
    item = frames.encode_frame(Kind.STREAM_ITEM, request_id, frames.dumps(0))
    client.receive_data(item * 2)
    with pytest.raises(rpc.ProtocolError, match="beyond the credit"):
        client.receive_data(item)


def test_a_stream_ends_with_an_error():
    client, server = opened()
    request_id = call(client, server, token="s")
    server.start_stream(request_id)
    pump(server, client)
    server.reply(request_id, False, frames.pack_error(ValueError("v")))
    [ended] = pump(server, client)
    assert ended.token == "s" and type(frames.unpack_error(ended.error)) is ValueError


def test_an_item_too_large_for_the_client_ends_the_stream_with_an_error():
    client, server = opened(max_frame=4096, stream_window=4)
    request_id = call(client, server, token="s")
    server.start_stream(request_id)
    pump(server, client)
    pump(client, server)
    assert not server.send_item(request_id, b"x" * 5000)
    assert not server.send_item(request_id, b"small")  # the stream is over
    [ended] = pump(server, client)
    assert "frame limit" in str(frames.unpack_error(ended.error))


def test_a_cancelled_stream_sends_nothing_more():
    client, server = opened()
    request_id = call(client, server)
    server.start_stream(request_id)
    pump(server, client)
    pump(client, server)
    client.cancel(request_id)
    assert pump(client, server) == [CallCancelled(request_id)]
    assert not server.send_item(request_id, b"x") and server.credit(request_id) == 0
    server.end_stream(request_id)
    assert server.data_to_send() == []
    assert not server.start_stream(request_id)


def test_a_stream_answer_to_a_cancelled_call_is_dropped_without_credit():
    client, server = opened()
    request_id = call(client, server)
    server.start_stream(request_id)
    client.cancel(request_id)
    client.data_to_send()
    assert pump(server, client) == []
    assert client.data_to_send() == []  # no CREDIT for it


# ---------------------------------------------------------------- the decoder, fuzzed

def test_random_bytes_give_a_protocol_error_or_need_more_never_another_exception():
    rng = random.Random(12)
    kinds = [int(k) for k in Kind] + [0, 99, 255]
    for attempt in range(3000):
        if attempt % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        else:  # a plausible header, then random bytes
            length = rng.choice([0, 1, 5, 40, 70_000, 2**32 - 1])
            data = frames.HEADER.pack(length, rng.choice([0, 1, 2]), rng.choice(kinds),
                                      rng.getrandbits(16), rng.getrandbits(64))
            data += bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 48)))
        fresh = [ServerProtocol(KEY), ClientProtocol(lambda: KEY)]
        for core in fresh + list(opened() if attempt % 3 == 0 else ()):
            try:
                core.receive_data(data)
            except rpc.ProtocolError:
                assert core.state is State.CLOSED
            core.events_received()


def test_every_prefix_of_a_valid_conversation_needs_more_bytes_and_never_fails():
    client, server = opened(stream_window=4)
    request_id = call(client, server)
    server.start_stream(request_id)
    server.receive_data(frames.encode_frame(Kind.CREDIT, request_id, frames.encode_credit(4)))
    assert server.events_received() == [CreditGranted(request_id)]
    server.send_item(request_id, frames.dumps("item"))
    server.end_stream(request_id)
    other = call(client, server)
    server.reply(other, True, frames.dumps(b"r" * 300))
    stream = b"".join(bytes(b) for b in server.data_to_send())
    rng = random.Random(3)
    for _ in range(200):
        cut = rng.randint(0, len(stream))
        fresh_client, fresh_server = opened(stream_window=4)
        for _ in range(2):
            call(fresh_client, fresh_server)
        fresh_client.receive_data(stream[:cut])  # never raises
        events = fresh_client.events_received()
        fresh_client.receive_data(stream[cut:])
        events += fresh_client.events_received()
        assert [type(e) for e in events] == [StreamOpened, StreamItem, StreamEnded, Replied]
