"""UDP delivery over real loopback sockets: packetising, authentication, holes, deadline."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nodes import protocol as P
from nodes import udp
from nodes.pipeline import _decode_with_holes
from nodes.tensor_codecs import CodecRegistry

pytestmark = pytest.mark.unit


@pytest.fixture
def pair():
    a, b = udp.open_socket("127.0.0.1"), udp.open_socket("127.0.0.1")
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    yield a, b
    a.close()
    b.close()


KEY = udp.session_key("token", b"l" * 16, b"r" * 16)


def test_a_frame_arrives_whole_in_mtu_sized_datagrams(pair):
    a, b = pair
    data = np.random.default_rng(0).bytes(100_000)
    sent = udp.send(a, KEY, 7, [memoryview(data)], 1500, None)
    assert sent.packets == -(-len(data) // udp.payload_size(1500)) and udp.payload_size(1500) + 28 + 40 <= 1500
    rx = udp.Receiver(b, KEY)
    got = rx.receive(7, len(data), sent.packets, 2.0)
    rx.close()
    assert got.lost == 0 and bytes(got.payload) == data and got.have.all()


def test_forged_other_run_and_other_frame_datagrams_are_dropped(pair):
    a, b = pair
    data = b"x" * 3000
    rx = udp.Receiver(b, KEY)
    udp.send(a, udp.session_key("other-token", b"l" * 16, b"r" * 16), 1, [memoryview(data)], 1500, None)
    a.send(b"garbage")
    udp.send(a, KEY, 2, [memoryview(data)], 1500, None)  # the next frame, early: kept for later
    t0 = time.monotonic()
    got = rx.receive(1, len(data), 3, 0.2)
    assert got.received == 0 and got.lost == 3 and not got.have.any()
    assert time.monotonic() - t0 < 1.0  # the deadline holds
    assert rx.rejected >= 4  # 3 forged + garbage
    nxt = rx.receive(2, len(data), 3, 1.0)
    assert nxt.lost == 0 and bytes(nxt.payload) == data
    udp.send(a, KEY, 1, [memoryview(data)], 1500, None)  # frame 1 is late now: dropped
    assert rx.receive(1, len(data), 3, 0.2).received == 0
    rx.close()


def test_pacing_keeps_to_the_rate(pair):
    a, b = pair
    data = b"y" * 200_000
    t0 = time.monotonic()
    sent = udp.send(a, KEY, 3, [memoryview(data)], 1500, 8_000_000)  # 8 Mbit/s -> about 0.2 s
    took = time.monotonic() - t0
    assert took >= 0.8 * (sent.wire_bytes - udp.PACING_BURST_BYTES) * 8 / 8_000_000


def _received(payload: bytes, holes: list[tuple[int, int]]) -> udp.Received:
    have = np.ones(len(payload), bool)
    buf = bytearray(payload)
    for s, e in holes:
        have[s:e] = False
        buf[s:e] = bytes(e - s)
    return udp.Received(buf, have, 10, 9)


def test_holes_become_zero_elements_and_compressed_tensors_zero():
    x = np.arange(1, 101, dtype=np.float32).reshape(1, 10, 10)
    for name, whole in (("raw", False), ("fp16", False), ("int8", False), ("zstd", True), ("int8+lz4", True)):
        descs, bufs, _ = P.encode_tensors({"t": x}, CodecRegistry(), lambda n, c=name: c)
        payload = b"".join(bytes(memoryview(b).cast("B")) for b in bufs)
        got = _decode_with_holes(P.parse_descs(descs), _received(payload, [(0, 1)]))["t"]
        if whole:
            assert not got.any()
        else:
            assert got.reshape(-1)[0] == 0 and np.abs(got.reshape(-1)[1:] - x.reshape(-1)[1:]).max() < 1.0
