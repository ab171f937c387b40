"""Wire protocol: round trips, bounds, malformed frames, token, zero-copy raw codec."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest

from nodes import protocol as P
from nodes.codecs import JPEG, PNG

pytestmark = pytest.mark.unit


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_tensor_frame_round_trip(pair):
    a, b = pair
    tensors = {"x": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
               "MobilenetV1/Conv2d_3_pointwise/Relu6": np.array([[1, -2]], dtype=np.int8),
               "flag": np.array([True, False]), "scalar": np.array(7, dtype=np.int64)}
    descs, bufs, raw = P.encode_tensors(tensors, P.codec_registry())
    assert raw == sum(t.nbytes for t in tensors.values())
    P.send_frame(a, {"kind": "tensors", "seq": 3, "tensors": descs}, bufs)
    frame = P.recv_frame(b)
    assert frame.header["seq"] == 3
    out = P.decode_tensors(frame.header["tensors"], frame.payload, P.codec_registry())
    assert list(out) == list(tensors)
    for name, arr in tensors.items():
        assert out[name].dtype == arr.dtype and out[name].shape == arr.shape
        np.testing.assert_array_equal(out[name], arr)
    assert frame.t_first_ns <= frame.t_last_ns
    assert frame.wire_bytes == P.PREFIX.size + len(json.dumps(
        {"kind": "tensors", "seq": 3, "tensors": descs}, separators=(",", ":"))) + raw


def test_raw_codec_is_zero_copy():
    arr = np.arange(1000, dtype=np.float32)
    (buf,), params = P.RAW.encode(arr)
    assert params == {}
    # the send buffer is the array's own memory, not a copy
    assert np.shares_memory(np.frombuffer(buf, dtype=np.float32), arr)
    payload = bytearray(arr.tobytes())
    desc = P.TensorDesc("t", "float32", (10, 100), "raw", arr.nbytes)
    out = P.RAW.decode(memoryview(payload), desc)
    assert np.shares_memory(out, np.frombuffer(payload, dtype=np.uint8))
    assert out.flags.writeable  # set_tensor can take it as is
    decoded = P.decode_tensors([desc.to_json()], payload, P.codec_registry())["t"]
    assert np.shares_memory(decoded, np.frombuffer(payload, dtype=np.uint8))


def test_send_frame_survives_partial_sends(pair):
    """A payload far larger than the socket buffer goes out whole (sendmsg resumes)."""
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = np.random.default_rng(0).random((3, 200_000), dtype=np.float32)
    descs, bufs, _ = P.encode_tensors({"a": big[0], "b": big[1], "c": big[2]}, P.codec_registry())
    import threading
    got = {}
    t = threading.Thread(target=lambda: got.update(f=P.recv_frame(b)))
    t.start()
    P.send_frame(a, {"kind": "tensors", "tensors": descs}, bufs)
    t.join(10)
    out = P.decode_tensors(got["f"].header["tensors"], got["f"].payload, P.codec_registry())
    np.testing.assert_array_equal(out["c"], big[2])


def _raw_frame(header: bytes, payload: bytes = b"", magic: bytes = P.MAGIC,
               plen: int | None = None) -> bytes:
    n = len(payload) if plen is None else plen
    return P.PREFIX.pack(magic, len(header), n) + header + payload


@pytest.mark.parametrize("data, message", [
    (_raw_frame(b'{"a":1}', magic=b"HTTP"), "bad magic"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic"),
    (_raw_frame(b"not json"), "not JSON"),
    (_raw_frame(b"[1,2,3]"), "not a JSON object"),
    (_raw_frame(b'{"a":1}', plen=P.MAX_PAYLOAD_BYTES + 1), "exceeds"),
    (P.PREFIX.pack(P.MAGIC, P.MAX_HEADER_BYTES + 1, 0), "header length"),
    (_raw_frame(b"\xff\xfe{}"), "not JSON"),
])
def test_malformed_frames_refused(pair, data, message):
    a, b = pair
    a.sendall(data)
    with pytest.raises(P.FrameError, match=message):
        P.recv_frame(b)


def test_truncated_frame_is_peer_closed(pair):
    a, b = pair
    a.sendall(_raw_frame(b'{"kind":"x"}', b"abc", plen=100))
    a.close()
    with pytest.raises(P.PeerClosed):
        P.recv_frame(b)


@pytest.mark.parametrize("desc, message", [
    ({"name": "t", "dtype": "object", "shape": [1], "codec": "raw", "nbytes": 8}, "dtype"),
    ({"name": "t", "dtype": "float32", "shape": [2, -1], "codec": "raw", "nbytes": 8}, "shape"),
    ({"name": "t", "dtype": "float32", "shape": [1] * 9, "codec": "raw", "nbytes": 4}, "shape"),
    ({"name": "t", "dtype": "float32", "shape": [3], "codec": "raw", "nbytes": 8}, "bytes for shape"),
    ({"name": "t", "dtype": "float32", "shape": [2**20, 2**20], "codec": "raw", "nbytes": 8},
     "exceeds"),
    # one dimension past what numpy/TFLite index, even though another is 0
    ({"name": "t", "dtype": "float32", "shape": [2**40, 0], "codec": "raw", "nbytes": 0}, "shape"),
    ({"name": "t", "dtype": "float32", "shape": [10**30], "codec": "raw", "nbytes": 8}, "shape"),
    ({"name": 5, "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": 8}, "name"),
    ({"name": "t", "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": True}, "byte count"),
    ({"name": "t", "dtype": "float32", "shape": [2], "codec": "zstd", "nbytes": 8}, "unknown codec"),
])
def test_bad_descriptors_refused(desc, message):
    with pytest.raises(P.FrameError, match=message):
        P.decode_tensors([desc], bytearray(8), P.codec_registry())


def test_payload_size_must_match_descriptors():
    desc = {"name": "t", "dtype": "float32", "shape": [2], "codec": "raw", "nbytes": 8}
    with pytest.raises(P.FrameError, match="add up"):
        P.decode_tensors([desc], bytearray(12), P.codec_registry())
    with pytest.raises(P.FrameError, match="duplicate"):
        P.decode_tensors([desc, desc], bytearray(16), P.codec_registry())


def test_header_bound_on_send():
    with pytest.raises(P.FrameError, match="exceeds"):
        P.pack_header({"x": "a" * P.MAX_HEADER_BYTES}, 0)
    with pytest.raises(P.FrameError, match="JSON"):
        P.pack_header({"x": float("nan")}, 0)


def test_token_required():
    req = P.request_header("health", "s3cret")
    assert P.parse_request(req, "s3cret") == ("health", {})
    for bad in ({"op": "health", "args": {}}, {**req, "token": "wrong"}, {**req, "token": 1}):
        with pytest.raises(P.FrameError, match="token"):
            P.parse_request(bad, "s3cret")


def test_token_checked_before_payload_is_read(pair):
    """A request without the token is refused before its payload is even allocated."""
    a, b = pair
    a.sendall(P.pack_header({"op": "load_part", "args": {}}, 400 * 1024 * 1024))
    with pytest.raises(P.FrameError, match="token"):
        P.recv_frame(b, before_payload=lambda h: P.check_token(h, "s3cret"))


def test_split_blobs():
    blobs = P.split_blobs(b"aabbbc", [2, 3, 1])
    assert [bytes(b) for b in blobs] == [b"aa", b"bbb", b"c"]
    with pytest.raises(P.FrameError):
        P.split_blobs(b"aabbbc", [2, 3])


def test_png_round_trip_uint8_is_lossless():
    img = np.random.default_rng(1).integers(0, 256, (1, 17, 23, 3), dtype=np.uint8)
    descs, bufs, raw = P.encode_tensors({"image": img}, P.codec_registry([PNG]), lambda n: "png")
    assert descs[0]["codec"] == "png" and raw == img.nbytes
    out = P.decode_tensors(descs, b"".join(bytes(b) for b in bufs), P.codec_registry([PNG]))
    np.testing.assert_array_equal(out["image"], img)


def test_png_and_jpeg_quantise_float_input():
    # a smooth image (JPEG is meant for those; on noise it is lossy by design)
    yy, xx = np.mgrid[0:32, 0:32]
    u8 = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1)[None].astype(np.uint8)
    img = u8.astype(np.float32) / 127.5 - 1.0
    reg = P.codec_registry([PNG, JPEG])
    for codec, tol in (("png", 1.0 / 255), ("jpeg", 0.1)):
        descs, bufs, _ = P.encode_tensors({"image": img}, reg, lambda n, c=codec: c)
        assert descs[0]["params"]["lo"] == pytest.approx(-1.0)
        out = P.decode_tensors(descs, b"".join(bytes(b) for b in bufs), reg)["image"]
        assert out.dtype == np.float32 and out.shape == img.shape
        assert np.abs(out - img).max() <= tol


def test_image_codec_refuses_non_image():
    with pytest.raises(P.FrameError, match="not an image"):
        P.encode_tensors({"x": np.zeros((1, 5, 5, 7), np.float32)}, P.codec_registry([PNG]),
                         lambda n: "png")


def test_corrupt_png_refused():
    desc = {"name": "image", "dtype": "uint8", "shape": [1, 4, 4, 3], "codec": "png", "nbytes": 10}
    with pytest.raises(P.FrameError, match="png decode failed"):
        P.decode_tensors([desc], bytearray(b"\x89PNGgarbag"), P.codec_registry([PNG]))


def test_prefix_layout_is_stable():
    """The prefix is the cross-language contract: magic, u32 header length, u64 payload length."""
    assert P.PREFIX.size == 16
    assert P.pack_header({}, 5)[:16] == b"TBF1" + struct.pack("!IQ", 2, 5)


# --------------------------------------------------------------------------- hardening
# Each of these was a crash, a traceback or an allocation a stranger could cause.

def _hdr(header: dict, plen: int = 0) -> bytes:
    return P.pack_header(header, plen)


def _no_read_socket(pair):
    """The receiving end with a short timeout: reading a payload that was never sent
    fails with a timeout, so a test sees whether the payload would have been read."""
    a, b = pair
    b.settimeout(2)
    return a, b


@pytest.mark.parametrize("text", [
    b"[" * 20000,                      # RecursionError inside json.loads
    b'{"a":' * 40 + b"1" + b"}" * 40,  # parses, but deeper than MAX_HEADER_DEPTH
])
def test_deep_nesting_is_a_frame_error(pair, text):
    a, b = pair
    a.sendall(P.PREFIX.pack(P.MAGIC, len(text), 0) + text)
    with pytest.raises(P.FrameError, match="nests deeper"):
        P.recv_frame(b)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_standard_json_constants_refused(constant):
    with pytest.raises(P.FrameError, match="not JSON"):
        P.parse_header(b'{"max_seconds":' + constant + b"}")


def test_realistic_header_depth_is_accepted():
    sets = [{"tensors": [{"name": "x", "shape": [1, 2], "params": {"lo": [0]}}]}]
    header = P.request_header("set_inputs", "tok", sets=sets)
    assert P.parse_header(P.pack_header(header, 0)[P.PREFIX.size:]) == header


@pytest.mark.parametrize("token", ["\ud800", "tok\udfff", "t\u00e9", "a b", "\n", "", 5, None,
                                   "x" * (P.MAX_TOKEN_CHARS + 1)])
def test_bad_tokens_are_refusals_not_crashes(token):
    # "\ud800" arrives from legal JSON ("\\ud800") and used to raise UnicodeEncodeError.
    header = json.loads(json.dumps({"op": "health", "token": token, "args": {}}))
    with pytest.raises(P.FrameError, match="token"):
        P.check_token(header, "s3cret")


def test_surrogate_token_over_the_wire_is_refused(pair):
    a, b = pair
    a.sendall(_hdr({"op": "health", "token": "\ud800", "args": {}}))  # ensure_ascii: \\ud800
    with pytest.raises(P.FrameError, match="token"):
        P.recv_frame(b, admit=P.admit_request("s3cret"))


@pytest.mark.parametrize("header, plen, message", [
    ({"op": "health", "token": "s3cret", "args": {}}, 1, "carries no payload"),
    ({"op": "run", "token": "s3cret", "args": {"samples": 1}}, 400 << 20, "carries no payload"),
    ({"op": "shutdown", "token": "s3cret", "args": {}}, 8, "carries no payload"),
    ({"op": "load_part", "token": "wrong", "args": {}}, 400 << 20, "token"),
    ({"op": "load_part", "args": {}}, 400 << 20, "token"),
    ({"op": "set_inputs", "token": "s3cret", "args": {"sets": [{"payload_bytes": 8}]}}, 400 << 20,
     "announce 8"),
    ({"op": "set_inputs", "token": "s3cret", "args": {"sets": [{"payload_bytes": "8"}]}}, 8,
     "sizes"),
    ({"op": "profile_layers", "token": "s3cret", "args": {"sizes": [1, 2]}}, 400 << 20,
     "announce 3"),
    ({"op": "profile_layers", "token": "s3cret", "args": {"sizes": [-1, 2]}}, 1, "sizes"),
])
def test_control_payload_refused_before_it_is_read(pair, header, plen, message):
    """What an op may carry is decided from the header: the declared payload is never
    allocated or read (it is never even sent here; reading it would time out)."""
    a, b = _no_read_socket(pair)
    a.sendall(_hdr(header, plen))
    with pytest.raises(P.FrameError, match=message):
        P.recv_frame(b, admit=P.admit_request("s3cret"))


def test_control_payload_admitted_when_announced(pair):
    a, b = pair
    P.send_frame(a, P.request_header("profile_layers", "s3cret", sizes=[2, 3]), [b"ab", b"cde"])
    frame = P.recv_frame(b, admit=P.admit_request("s3cret"))
    assert bytes(frame.payload) == b"abcde"


@pytest.mark.parametrize("header, plen, message", [
    ({"kind": "hello", "nonce": "00" * 32}, 512 << 20, "carries no payload"),
    ({"kind": "ping"}, 1, "carries no payload"),
    ({"kind": "begin"}, 100, "carries no payload"),
    ({"kind": "fetch", "sha256": "0" * 64}, 100, "carries no payload"),
    ({"kind": "tensors", "tensors": [{"name": "t", "dtype": "float32", "shape": [2],
                                      "codec": "raw", "nbytes": 8}]}, 400 << 20, "add up to 8"),
    ({"kind": "tensors", "tensors": "nope"}, 8, "tensors"),
    ({"kind": "result", "tensors": []}, 1, "add up to 0"),
])
def test_data_payload_refused_before_it_is_read(pair, header, plen, message):
    a, b = _no_read_socket(pair)
    a.sendall(_hdr(header, plen))
    with pytest.raises(P.FrameError, match=message):
        P.recv_frame(b, admit=P.admit_data_frame)


def test_handshake_hello_with_payload_refused_before_it_is_read(pair):
    a, b = _no_read_socket(pair)
    a.sendall(_hdr({"kind": "hello", "nonce": "00" * 32}, 512 << 20))
    with pytest.raises(P.FrameError, match="carries no payload"):
        P.data_handshake_remote(b, "s3cret", {"node": "remote"})


class _Tap:
    """A socket wrapper recording every byte one side sends."""

    def __init__(self, sock):
        self.sock, self.sent = sock, bytearray()

    def sendmsg(self, buffers):
        n = self.sock.sendmsg(buffers)
        self.sent += b"".join(bytes(b) for b in buffers)[:n]
        return n

    def __getattr__(self, name):
        return getattr(self.sock, name)


def _handshake(local_token: str, remote_token: str):
    import threading
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    tap_local, tap_remote = _Tap(a), _Tap(b)
    out: dict = {}

    def remote():
        try:
            P.data_handshake_remote(tap_remote, remote_token, {"node": "remote", "boot_id": "x"})
            out["remote"] = "ok"
        except P.FrameError as e:
            out["remote"] = e
            try:
                P.send_frame(b, {"kind": "error", "error": f"refused: {e}"})
            except OSError:
                pass  # the local already gave up
    t = threading.Thread(target=remote)
    t.start()
    try:
        out["local"] = P.data_handshake_local(tap_local, local_token)
    except P.FrameError as e:
        out["local"] = e
    finally:
        a.close()
        t.join(5)
        b.close()
    return out, bytes(tap_local.sent), bytes(tap_remote.sent)


def test_data_handshake_proves_the_token_both_ways_without_sending_it():
    token = "tok-" + "9" * 28
    out, from_local, from_remote = _handshake(token, token)
    assert out["remote"] == "ok"
    assert out["local"]["kind"] == "welcome" and out["local"]["node"] == "remote"
    assert token.encode() not in from_local and token.encode() not in from_remote


def test_data_handshake_local_refuses_an_impostor_remote_before_proving_itself():
    """A remote that does not know the token gets no proof (and never the token)."""
    out, from_local, _ = _handshake("the-run-token", "an-impostor")
    assert isinstance(out["local"], P.FrameError) and "did not prove" in str(out["local"])
    assert b'"auth"' not in from_local and b"the-run-token" not in from_local


def test_data_handshake_remote_refuses_an_impostor_local():
    out, _, from_remote = _handshake("an-impostor", "the-run-token")
    # the local sees the remote's proof fail against its own (wrong) token first
    assert isinstance(out["local"], P.FrameError)
    assert b"the-run-token" not in from_remote


def test_data_handshake_remote_refuses_a_forged_auth(pair):
    """A stranger replaying the remote's own proof as its auth gets nowhere (side label)."""
    import threading
    a, b = pair
    a.settimeout(5)
    b.settimeout(5)
    err: list = []

    def remote():
        try:
            P.data_handshake_remote(b, "s3cret", {"node": "remote"})
        except P.FrameError as e:
            err.append(e)
    t = threading.Thread(target=remote)
    t.start()
    P.send_frame(a, {"kind": "hello", "nonce": "11" * 32})
    challenge = P.recv_frame(a).header
    P.send_frame(a, {"kind": "auth", "proof": challenge["proof"]})
    t.join(5)
    assert err and "did not prove" in str(err[0])


@pytest.mark.parametrize("first", [
    {"kind": "tensors", "tensors": []}, {"kind": "hello"}, {"kind": "hello", "nonce": "zz" * 32},
    {"kind": "hello", "nonce": 5}, {"kind": "hello", "token": "s3cret"},
])
def test_data_handshake_refuses_anything_but_a_proper_hello(pair, first):
    a, b = pair
    P.send_frame(a, first)
    with pytest.raises(P.FrameError):
        P.data_handshake_remote(b, "s3cret", {"node": "remote"})


def test_png_claiming_a_huge_image_is_refused_before_decoding():
    """A few hundred bytes of PNG that would decode to 8000 x 8000 pixels (64 MB, under
    Pillow's own bomb limit): the header is checked against the descriptor before any
    pixel is decoded."""
    import io
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack("!I", len(data)) + kind + data
                + struct.pack("!I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    side = 8000
    raw = zlib.compress(b"\x00" * (side + 1) * 8, 9)  # a few rows; the rest is missing
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack("!IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    assert len(io.BytesIO(png).getvalue()) < 2000
    desc = {"name": "image", "dtype": "uint8", "shape": [1, 4, 4, 1], "codec": "png",
            "nbytes": len(png)}
    with pytest.raises(P.FrameError, match="does not fit"):
        P.decode_tensors([desc], bytearray(png), P.codec_registry([PNG]))


def test_large_results_travel_in_the_payload(pair):
    """2,000 sample rows are ~1 MB of JSON: far past the header bound. Before, the agent
    failed to frame the reply and dropped the connection."""
    a, b = pair
    rows = [{"sample": i, "e2e_s": 0.01 * i, "clock": "shared", "codec": "raw"}
            for i in range(2000)]
    header, buffers = P.ok_reply({"samples": rows})
    assert "result" not in header and header["result_bytes"] > P.MAX_HEADER_BYTES
    import threading
    t = threading.Thread(target=P.send_frame, args=(a, header, buffers))
    t.start()
    frame = P.recv_frame(b)
    t.join(5)
    result, payload = P.reply_result(frame)
    assert result == {"samples": rows} and payload == bytearray()
    small_header, small_buffers = P.ok_reply({"x": 1}, [b"abc"])
    assert small_header == {"ok": True, "result": {"x": 1}} and small_buffers == [b"abc"]


def test_reply_result_refuses_lies():
    frame = P.Frame({"ok": True, "result_bytes": 10}, bytearray(b"{}"), 0, 0, 0)
    with pytest.raises(P.FrameError, match="result bytes"):
        P.reply_result(frame)
    frame = P.Frame({"ok": True, "result_bytes": 3}, bytearray(b"[[["), 0, 0, 0)
    with pytest.raises(P.FrameError, match="not JSON"):
        P.reply_result(frame)
    with pytest.raises(ValueError):
        P.ok_reply({"x": float("nan")})
    with pytest.raises(P.FrameError, match="too large"):
        P.ok_reply(["x" * 100] * 1000, [b"blob"])


def test_handshake_frames_have_a_small_header_bound(pair):
    """A stranger on the data port gets at most 4 KiB of header parsed, not 64 KiB."""
    a, b = pair
    a.sendall(_hdr({"kind": "hello", "nonce": "00" * 32, "pad": "x" * 8000}))
    with pytest.raises(P.FrameError, match="header length"):
        P.data_handshake_remote(b, "s3cret", {"node": "remote"})
