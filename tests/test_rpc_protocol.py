"""The sans-I/O core: frames, payloads, errors, and the key/HMAC primitives."""
import os
import pickle
import random
import stat

import pytest

import rpc
from rpc import auth, frames
from rpc.frames import Flag, FrameDecoder, Kind


pytestmark = pytest.mark.usefixtures("rpc_env")


def frames_of(chunks, max_frame=frames.DEFAULT_MAX_FRAME):
    decoder = FrameDecoder(max_frame)
    out = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out, decoder


def test_frames_roundtrip_whatever_the_chunking():
    msgs = [(Kind.CALL, 1, b"a" * 10, Flag.NONE), (Kind.PING, 0, b"", Flag.NONE),
            (Kind.RESULT, 2**40, os.urandom(300_000), Flag.STREAM),
            (Kind.CANCEL, 7, b"", Flag.NONE)]
    data = b"".join(frames.encode_frame(k, r, p, f) for k, r, p, f in msgs)
    rng = random.Random(1)
    for size in (1, 7, 16, 4096, len(data)):
        chunks, pos = [], 0
        while pos < len(data):
            step = rng.randint(1, size)
            chunks.append(data[pos:pos + step])
            pos += step
        decoded, decoder = frames_of(chunks)
        assert [(f.kind, f.request_id, bytes(f.payload), f.flags) for f in decoded] == msgs
        assert not decoder.mid_frame()


def test_payload_parts_are_sent_back_to_back():
    frame = frames.encode_frame(Kind.CALL, 3, (b"ab", b"cd"))
    [decoded], _ = frames_of([frame])
    assert bytes(decoded.payload) == b"abcd"


def test_truncated_frame_is_visible_to_the_reader():
    data = frames.encode_frame(Kind.RESULT, 1, b"x" * 100)
    decoded, decoder = frames_of([data[:50]])
    assert decoded == [] and decoder.mid_frame()


@pytest.mark.parametrize("header, message", [
    (frames.HEADER.pack(0, 1, 200, 0, 1), "unknown message kind 200"),
    (frames.HEADER.pack(0, 9, Kind.CALL, 0, 1), "protocol version 9"),
    (frames.HEADER.pack(2**32 - 1, 1, Kind.CALL, 0, 1), "exceeds the limit"),
])
def test_malformed_headers_raise_protocol_error(header, message):
    with pytest.raises(rpc.ProtocolError, match=message):
        frames_of([header])


def test_hello_of_another_version_is_readable_so_it_can_be_reported():
    payload = frames.encode_json({"proto": 2})
    [frame], _ = frames_of([frames.HEADER.pack(len(payload), 2, Kind.HELLO, 0, 0) + payload])
    assert frame.version == 2 and frames.decode_json(frame.payload) == {"proto": 2}


def test_handshake_limit_is_small():
    with pytest.raises(rpc.ProtocolError):
        frames_of([frames.encode_frame(Kind.HELLO, 0, b"x" * 70_000)],
                  max_frame=frames.HANDSHAKE_MAX_FRAME)


def test_call_payload_keeps_the_name_outside_the_pickle():
    head, args = frames.encode_call("fn", (1, 2), {"k": 3})
    name, pickled = frames.decode_call(head + args)
    assert name == "fn" and pickle.loads(pickled) == ((1, 2), {"k": 3})
    with pytest.raises(rpc.ProtocolError):
        frames.decode_call(b"\x00\x09ab")


def test_error_payload_keeps_type_message_and_traceback():
    try:
        raise KeyError("missing")
    except KeyError as exc:
        payload = frames.pack_error(exc)
    exc = frames.unpack_error(payload)
    assert type(exc) is KeyError and exc.args == ("missing",)
    assert "raise KeyError" in exc.remote_traceback
    assert isinstance(exc.__cause__, rpc.RemoteTraceback)


def test_unpicklable_error_becomes_runtime_error():
    err = ValueError("locked")
    err.lock = __import__("threading").Lock()
    exc = frames.unpack_error(frames.pack_error(err))
    assert type(exc) is RuntimeError and str(exc) == "Server-side ValueError: locked"


def test_unpicklable_value_becomes_remote_serialization_error():
    ok, payload = frames.pack_value(lambda: None, "x")
    assert ok
    ok, payload = frames.pack_value(__import__("threading").Lock(), "the result of f()")
    assert not ok
    exc = frames.unpack_error(payload)
    assert isinstance(exc, rpc.RemoteSerializationError) and "the result of f()" in str(exc)


def test_credit_and_json_payloads_are_validated():
    assert frames.decode_credit(frames.encode_credit(5)) == 5
    with pytest.raises(rpc.ProtocolError):
        frames.decode_credit(b"\x00")
    with pytest.raises(rpc.ProtocolError):
        frames.decode_json(b"[1]")
    with pytest.raises(rpc.ProtocolError):
        frames.decode_json(b"\xff")


# ---------------------------------------------------------------- key and HMAC

def test_key_file_is_created_0600_and_reused(tmp_path):
    path = tmp_path / "sub" / "k"
    key = auth.load_key(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.load_key(path, create=True) == key == auth.load_key(path)


def test_default_key_path_follows_the_environment(tmp_path):
    assert auth.default_key_path() == tmp_path / "rpc.key"


def test_missing_key_names_the_fix(tmp_path):
    with pytest.raises(rpc.AuthenticationError, match="no RPC key file"):
        auth.load_key(tmp_path / "absent")


def test_key_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "k"
    auth.load_key(path, create=True)
    path.chmod(0o644)
    with pytest.raises(rpc.AuthenticationError, match="chmod 600"):
        auth.load_key(path)


def test_answers_depend_on_key_role_and_both_nonces():
    a, b = auth.new_nonce(), auth.new_nonce()
    mac = auth.answer(b"k", "client", a, b)
    assert auth.check_answer(b"k", "client", a, b, mac)
    assert not auth.check_answer(b"other", "client", a, b, mac)
    assert not auth.check_answer(b"k", "server", a, b, mac)
    assert not auth.check_answer(b"k", "client", b, a, mac)
    assert not auth.check_answer(b"k", "client", a, b, None)
