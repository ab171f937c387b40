"""The built-in PoseNet: deterministic bytes, the official architecture, and exact splits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from nodes import runtime
from testbed.model.graph import ModelGraph
from testbed.model.zoo.posenet import build_posenet

pytestmark = pytest.mark.unit

# sha256 of build_posenet(seed=0). If the builder changes on purpose, update it here
# (and say so in the change): every recorded run names its model by this checksum.
POSENET_SEED0_SHA256 = "551fb47f160734fe4a0e632b3ebc6026212f13cf8498484159c36d445df26d5c"


def test_same_seed_same_bytes(posenet_bytes):
    assert hashlib.sha256(posenet_bytes).hexdigest() == POSENET_SEED0_SHA256
    assert build_posenet(0) == posenet_bytes


def test_other_seed_other_weights_same_size(posenet_bytes):
    other = build_posenet(1)
    assert other != posenet_bytes and len(other) == len(posenet_bytes)


def test_architecture(posenet_path):
    g = ModelGraph.from_file(posenet_path)
    assert g.num_layers == 31
    assert [t.to_dict() for t in g.inputs] == [
        {"name": "sub_2", "shape": [1, 257, 257, 3], "dtype": "float32", "bytes": 257 * 257 * 3 * 4}]
    assert [(t.name, t.shape) for t in g.outputs] == [
        ("MobilenetV1/heatmap_2/BiasAdd", (1, 9, 9, 17)), ("MobilenetV1/offset_2/BiasAdd", (1, 9, 9, 34)),
        ("MobilenetV1/displacement_fwd_2/BiasAdd", (1, 9, 9, 32)),
        ("MobilenetV1/displacement_bwd_2/BiasAdd", (1, 9, 9, 32))]
    ops = [la.op for la in g.layers]
    assert ops == ["CONV_2D"] + ["DEPTHWISE_CONV_2D", "CONV_2D"] * 13 + ["CONV_2D"] * 4
    # spatial size after each block: stride 2 at conv0 and blocks 2, 4, 6, 12 (SAME padding)
    assert g.layers[0].output_shapes == [(1, 129, 129, 32)]
    assert g.layers[6].outputs == ["MobilenetV1/Conv2d_3_pointwise/Relu6"]
    assert g.layers[6].output_shapes == [(1, 65, 65, 128)]
    assert g.layers[26].output_shapes == [(1, 9, 9, 1024)]
    channels = [g.layers[2 * i].output_shapes[0][3] for i in range(1, 14)]
    assert channels == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    # 3x3 conv0, then per block depthwise 9*cin + cin and pointwise cin*cout + cout, then 4 heads
    assert sum(la.params for la in g.layers) == 3_313_907
    # conv0: 129*129 outputs * 32 channels * 3*3*3
    assert g.layers[0].macs == 129 * 129 * 32 * 27
    assert g.layers[1].macs == 129 * 129 * 32 * 9


def test_cut_is_the_previous_activation_on_the_chain(posenet_path):
    g = ModelGraph.from_file(posenet_path)
    assert [t.name for t in g.cut(0)] == ["sub_2"]
    assert [t.name for t in g.cut(7)] == ["MobilenetV1/Conv2d_3_pointwise/Relu6"]
    # inside the heads the backbone output still crosses, with the heads already computed
    assert [t.name for t in g.cut(29)] == ["MobilenetV1/Conv2d_13_pointwise/Relu6",
                                           "MobilenetV1/heatmap_2/BiasAdd", "MobilenetV1/offset_2/BiasAdd"]
    assert [t.name for t in g.cut(31)] == [t.name for t in g.outputs]


def test_manifest(posenet_split, posenet_path, posenet_bytes):
    out, manifest = posenet_split
    assert manifest["model"] == {"path": str(posenet_path.resolve()), "sha256": POSENET_SEED0_SHA256,
                                 "layers": 31, "bytes": len(posenet_bytes), "operators": 31, "folded_ops": 0}
    splits = manifest["splits"]
    assert [s["k"] for s in splits] == list(range(32))
    for s in splits:
        assert list(s) == ["k", "head", "tail", "head_bytes", "tail_bytes", "head_sha256", "tail_sha256", "cut",
                           "verify"]
        for side in ("head", "tail"):
            if s[side] is None:
                assert s[f"{side}_bytes"] == 0 and s[f"{side}_sha256"] is None
            else:
                blob = (out / s[side]).read_bytes()
                assert s[side] == f"{side}_{s['k']:02d}.tflite"
                assert len(blob) == s[f"{side}_bytes"]
                assert hashlib.sha256(blob).hexdigest() == s[f"{side}_sha256"]
        # unused tensors and buffers are pruned: the two parts add up to the model (+ small tables)
        assert len(posenet_bytes) * 0.999 < s["head_bytes"] + s["tail_bytes"] < len(posenet_bytes) * 1.001
    assert splits[0]["head"] is None and splits[31]["tail"] is None
    assert splits[0]["cut"] == [{"name": "sub_2", "shape": [1, 257, 257, 3], "dtype": "float32",
                                 "bytes": 792588}]
    assert splits[3]["cut"] == [{"name": "MobilenetV1/Conv2d_1_pointwise/Relu6", "shape": [1, 129, 129, 64],
                                 "dtype": "float32", "bytes": 129 * 129 * 64 * 4}]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"head_{k:02d}.tflite" for k in range(1, 32)]
        + [f"tail_{k:02d}.tflite" for k in range(31)])


def _run_split(out, split, feed):
    values = dict(feed)
    for side in ("head", "tail"):
        if split[side]:
            interp = runtime.make_interpreter(out / split[side])
            interp.allocate_tensors()
            values.update(runtime.run(interp, values))
    return values


def test_every_split_is_bitwise_exact(posenet_split, posenet_path):
    out, manifest = posenet_split
    whole = runtime.make_interpreter(posenet_path)
    whole.allocate_tensors()
    feed = runtime.random_inputs(whole, seed=3)
    expected = runtime.run(whole, feed)
    assert np.std(expected["MobilenetV1/heatmap_2/BiasAdd"]) > 0.01  # weights give a non-trivial output
    for split in manifest["splits"]:
        got = _run_split(out, split, feed)
        for name, value in expected.items():
            assert got[name].dtype == value.dtype and got[name].shape == value.shape
            assert np.array_equal(got[name], value), f"k={split['k']}: {name} differs"
