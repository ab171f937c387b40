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
    ({"name": "t", "dtype": "float32", "shape": [2**40], "codec": "raw", "nbytes": 8}, "exceeds"),
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
        descs, bufs, _ = P.encode_tensors({"image": img}, reg, lambda n: codec)
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
