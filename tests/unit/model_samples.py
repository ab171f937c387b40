"""Small models for model-layer tests, written with ``testbed.model.builder``.

``dag_model()`` is the DAG the exactness test needs: two inputs, residual ADDs,
a CONCATENATION that reaches back to an early layer and to a model input, a
RESHAPE whose shape is a constant, and an output produced early (layer 3).
"""

from __future__ import annotations

import numpy as np

from testbed.model.builder import ModelBuilder

DAG_LAYERS = 9


def _w(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.uniform(-0.5, 0.5, shape).astype(np.float32)


def dag_model(seed: int = 7) -> bytes:
    rng = np.random.default_rng(seed)
    b = ModelBuilder("testbed unit-test DAG")
    x = b.input("x", (1, 16, 16, 3))
    y = b.input("y", (1, 16, 16, 8))
    a = b.conv2d(x, b.const("c0/w", _w(rng, 8, 3, 3, 3)), b.const("c0/b", _w(rng, 8)), "a", (1, 16, 16, 8),
                 act="relu6")                                                   # 0
    r1 = b.add(a, y, "res1", (1, 16, 16, 8))                                    # 1 residual with input y
    c = b.conv2d(r1, b.const("c2/w", _w(rng, 8, 3, 3, 8)), b.const("c2/b", _w(rng, 8)), "c", (1, 16, 16, 8),
                 act="relu")                                                    # 2
    d = b.add(c, r1, "res2", (1, 16, 16, 8), act="relu6")                      # 3 residual; early output
    e = b.depthwise(d, b.const("dw/w", _w(rng, 1, 3, 3, 8)), b.const("dw/b", _w(rng, 8)), "e",
                    (1, 8, 8, 8), stride=2)                                     # 4
    f = b.conv2d(a, b.const("skip/w", _w(rng, 8, 1, 1, 8)), b.const("skip/b", _w(rng, 8)), "a_down",
                 (1, 8, 8, 8), stride=2)                                        # 5 long skip from layer 0
    g = b.concat([e, f], "cat", (1, 8, 8, 16), axis=3)                         # 6
    h = b.reshape(g, b.const("flat/shape", np.array([1, 1024], np.int32)), "flat", (1, 1024))  # 7
    out = b.fully_connected(h, b.const("fc/w", _w(rng, 10, 1024)), b.const("fc/b", _w(rng, 10)),
                            "logits", (1, 10))                                  # 8
    b.output(out)
    b.output(d)
    return b.build()


def int8_model(seed: int = 5) -> bytes:
    """A small int8-quantized model: conv -> residual ADD with the input -> conv (two outputs)."""
    rng = np.random.default_rng(seed)
    b = ModelBuilder("testbed unit-test int8")
    x = b.quantize(b.input("q_in", (1, 8, 8, 4), "int8"), 0.05, -3)
    w = b.quantize(b.const("q0/w", rng.integers(-127, 128, (4, 3, 3, 4)).astype(np.int8)), 0.01)
    bias = b.quantize(b.const("q0/b", rng.integers(-500, 500, (4,)).astype(np.int32)), 0.05 * 0.01)
    c = b.quantize(b.conv2d(x, w, bias, "q_conv", (1, 8, 8, 4), act="relu", dtype="int8", version=3), 0.1, -10)
    s = b.quantize(b.add(c, x, "q_sum", (1, 8, 8, 4), dtype="int8", version=2), 0.12, 2)
    w2 = b.quantize(b.const("q1/w", rng.integers(-127, 128, (6, 1, 1, 4)).astype(np.int8)), 0.02)
    bias2 = b.quantize(b.const("q1/b", rng.integers(-500, 500, (6,)).astype(np.int32)), 0.12 * 0.02)
    out = b.quantize(b.conv2d(s, w2, bias2, "q_out", (1, 8, 8, 6), dtype="int8", version=3), 0.2, 0)
    b.output(out)
    return b.build()
