"""The built-in PoseNet: the architecture of the official
``posenet_mobilenet_v1_100_257x257_multi_kpt_stripped.tflite`` with seeded weights.

Input ``sub_2`` 1x257x257x3 float32; MobileNetV1 (depth 1.0, ReLU6, SAME padding,
output stride 32): a 3x3/2 conv then 13 depthwise-separable blocks, then four 1x1
conv heads (heatmap 17, offsets 34, forward/backward displacements 32 each) on the
9x9 map: 1 + 13*2 + 4 = 31 layers, 32 split points. Tensor names follow the
official model. Weights are not trained: they come from a seeded generator so
that the same seed gives the same bytes on any machine (raw PCG64 output, not
numpy's distribution methods, whose streams numpy does not promise to keep).

``scheme`` writes the same network in another of ``builder.SCHEMES`` (float16
weights, dynamic-range, int8, uint8, 16x8): PoseNet-sized models for studying
quantized splits. float32 (the default) is the pinned, byte-stable built-in.
"""

from __future__ import annotations

import math

import numpy as np

from testbed.model.builder import Net

INPUT_SIZE = 257
# (stride, pointwise output channels) for the 13 depthwise-separable blocks.
BLOCKS = [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
          (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024)]
HEADS = [("heatmap", 17), ("offset", 34), ("displacement_fwd", 32), ("displacement_bwd", 32)]
NUM_LAYERS = 1 + 2 * len(BLOCKS) + len(HEADS)


class _Weights:
    """Deterministic uniform weights from raw PCG64 bits."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.PCG64(seed)

    def uniform(self, shape: tuple[int, ...], limit: float, low: float | None = None) -> np.ndarray:
        n = math.prod(shape)
        # 53 high bits -> [0, 1) exactly as IEEE doubles; float64 maths is exact
        # and portable, the final cast to float32 rounds the same everywhere.
        u = (self._bits.random_raw(n) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
        lo = -limit if low is None else low
        return (lo + u * (limit - lo)).astype(np.float32).reshape(shape)


def _same(size: int, stride: int) -> int:
    return -(-size // stride)


def build_posenet(seed: int = 0, scheme: str = "float32") -> bytes:
    """Return the PoseNet TFLite bytes for ``seed`` (same seed -> same bytes) in ``scheme``."""
    w = _Weights(seed)
    description = f"testbed built-in PoseNet (MobileNetV1 1.0, 257x257, stride 32), seed {seed}"
    b = Net(description if scheme == "float32" else f"{description}, {scheme}")
    x = b.input("sub_2", (1, INPUT_SIZE, INPUT_SIZE, 3))
    size, ch = _same(INPUT_SIZE, 2), 32

    def conv(x: str, scope: str, cin: int, cout: int, k: int, stride: int, act, out_name: str, hw: int) -> str:
        # He-uniform keeps activations in ReLU6's useful range through 14 blocks.
        wt = b.const(f"{scope}/weights", w.uniform((cout, k, k, cin), math.sqrt(6.0 / (k * k * cin))))
        bias = b.const(f"{scope}/Conv2D_bias", w.uniform((cout,), 0.05, low=0.0))
        return b.conv2d(x, wt, bias, out_name, (1, hw, hw, cout), stride=stride, act=act)

    x = conv(x, "MobilenetV1/Conv2d_0", 3, ch, 3, 2, "relu6", "MobilenetV1/Conv2d_0/Relu6", size)
    for i, (stride, cout) in enumerate(BLOCKS, start=1):
        size = _same(size, stride)
        scope = f"MobilenetV1/Conv2d_{i}_depthwise"
        wt = b.const(f"{scope}/depthwise_weights", w.uniform((1, 3, 3, ch), math.sqrt(6.0 / 9)))
        bias = b.const(f"{scope}/depthwise_bias", w.uniform((ch,), 0.05, low=0.0))
        x = b.depthwise(x, wt, bias, f"{scope}/Relu6", (1, size, size, ch), stride=stride, act="relu6")
        scope = f"MobilenetV1/Conv2d_{i}_pointwise"
        x = conv(x, scope, ch, cout, 1, 1, "relu6", f"{scope}/Relu6", size)
        ch = cout
    for head, cout in HEADS:
        scope = f"MobilenetV1/{head}_2"
        out = conv(x, scope, ch, cout, 1, 1, None, f"{scope}/BiasAdd", size)
        b.output(out)
    return b.build(scheme)
