"""Codec chains of the intermediate data: parsing, round trips, bounds on what a peer sends."""

from __future__ import annotations

import numpy as np
import pytest

from nodes import protocol as P
from nodes.tensor_codecs import CodecRegistry, make_codec, parse_chain, round_trip

pytestmark = pytest.mark.unit

LOSSLESS = ["raw", "zstd", "zstd:1", "zstd:19", "lz4"]
LOSSY = ["fp16", "int8", "int8-per-channel", "fp16+zstd", "int8+zstd", "int8+lz4", "int8-per-channel+zstd:5",
         "fp16+lz4"]


def activation(shape=(1, 17, 17, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 6.0, shape[-1]).astype(np.float32)  # channels of very different ranges
    return np.clip(rng.standard_normal(shape).astype(np.float32) * scale, 0, 6)


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_chains_are_bitwise(name):
    for arr in (activation(), np.arange(-50, 50, dtype=np.int32).reshape(1, 10, 10), np.zeros((0, 3), np.float32)):
        got, _ = round_trip(arr, name)
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_chains_are_bounded(name):
    x = activation()
    got, wire = round_trip(x, name)
    assert got.dtype == x.dtype and got.shape == x.shape
    err = np.abs(got - x)
    if name.startswith("fp16"):
        assert err.max() <= 6.0 * 2**-11  # half precision: relative 2^-11
    elif name.startswith("int8-per-channel"):
        per_channel_step = (x.max(axis=(0, 1, 2)) - x.min(axis=(0, 1, 2))) / 255
        assert (err <= per_channel_step / 2 + 1e-6).all()
    else:
        assert err.max() <= (x.max() - x.min()) / 255 / 2 + 1e-6
    assert wire < x.nbytes


def test_per_channel_beats_per_tensor_on_uneven_channels():
    x = activation()
    e_tensor = np.abs(round_trip(x, "int8")[0] - x).mean()
    e_channel = np.abs(round_trip(x, "int8-per-channel")[0] - x).mean()
    assert e_channel < e_tensor


def test_non_float_tensors_pass_a_lossy_stage_unchanged():
    q = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    for name in ("fp16", "int8+zstd", "int8-per-channel"):
        assert round_trip(q, name)[0].tobytes() == q.tobytes()


@pytest.mark.parametrize("text,why", [("zstd+fp16", "first"), ("fp16+int8", "first"), ("zstd+lz4", "one compressor"),
                                      ("zstd:0", "1..22"), ("zstd:23", "1..22"), ("lz4:2", "only zstd"),
                                      ("gzip", "unknown"), ("", "short string"), ("x" * 80, "short string")])
def test_bad_chains_are_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse_chain(text)


def test_names_are_normalised():
    assert parse_chain("zstd:3").name == "zstd" and parse_chain("int8+zstd:9").name == "int8+zstd:9"
    assert parse_chain("raw").lossless and not parse_chain("fp16+lz4").lossless


def _frame(arr, name):
    descs, bufs, _ = P.encode_tensors({"t": arr}, CodecRegistry(), lambda n: name)
    return descs, b"".join(bytes(memoryview(b).cast("B")) for b in bufs)


def test_registry_decodes_through_the_protocol():
    x = activation()
    descs, payload = _frame(x, "fp16+zstd")
    got = P.decode_tensors(descs, bytearray(payload), CodecRegistry())["t"]
    assert np.abs(got - x).max() < 0.01
    assert "int8+lz4" in CodecRegistry() and "nonsense" not in CodecRegistry()


def test_a_decompression_bomb_is_refused_before_it_expands():
    import zstandard
    x = np.zeros((1, 8, 8, 4), np.float32)
    descs, _ = _frame(x, "zstd")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * 2**20))  # 64 MiB for a 1 KiB tensor
    descs[0]["nbytes"] = len(bomb)
    with pytest.raises(P.FrameError, match="zstd"):
        P.decode_tensors(descs, bytearray(bomb), CodecRegistry())


def test_params_that_lie_about_sizes_are_refused():
    x = activation((1, 4, 4, 8))
    for name in ("lz4", "int8-per-channel"):
        descs, payload = _frame(x, name)
        descs[0]["params"]["mid"] += 1
        with pytest.raises(P.FrameError):
            P.decode_tensors(descs, bytearray(payload), CodecRegistry())
    descs, payload = _frame(x, "int8")
    descs[0]["params"]["scale"] = "NaN"
    with pytest.raises(P.FrameError):
        P.decode_tensors(descs, bytearray(payload), CodecRegistry())


def test_raw_chain_is_the_zero_copy_codec():
    assert make_codec(parse_chain("raw")) is P.RAW
