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


# The DAG above, written with ``builder.Net`` so that it exists in every quantization
# scheme, plus two kinds of constant operator chains: a constant operand of an ADD made
# by a MUL of two constants (in float16 and dynamic-range: DEQUANTIZE, DEQUANTIZE -> MUL)
# and the reshape's shape computed by int32 arithmetic on constants (ADD then MUL).
SCHEME_DAG_LAYERS = 10          # computing layers of the float32 version


def scheme_dag(scheme: str = "float32", seed: int = 11) -> bytes:
    from testbed.model.builder import OP, Net
    rng = np.random.default_rng(seed)
    n = Net(f"testbed unit-test DAG, {scheme}")
    x = n.input("x", (1, 16, 16, 3))
    y = n.input("y", (1, 16, 16, 8))
    a = n.conv2d(x, n.const("c0/w", _w(rng, 8, 3, 3, 3)), n.const("c0/b", _w(rng, 8)), "a", (1, 16, 16, 8),
                 act="relu6")                                                   # 0
    r1 = n.add(a, y, "res1", (1, 16, 16, 8))                                    # 1 residual with input y
    c = n.conv2d(r1, n.const("c2/w", _w(rng, 8, 3, 3, 8)), n.const("c2/b", _w(rng, 8)), "c", (1, 16, 16, 8),
                 act="relu")                                                    # 2
    d = n.add(c, r1, "res2", (1, 16, 16, 8), act="relu6")                      # 3 residual; early output
    e = n.depthwise(d, n.const("dw/w", _w(rng, 1, 3, 3, 8)), n.const("dw/b", _w(rng, 8)), "e",
                    (1, 8, 8, 8), stride=2)                                     # 4
    f = n.conv2d(a, n.const("skip/w", _w(rng, 8, 1, 1, 8)), n.const("skip/b", _w(rng, 8)), "a_down",
                 (1, 8, 8, 8), stride=2)                                        # 5 long skip from layer 0
    g = n.concat([e, f], "cat", (1, 8, 8, 16), axis=3)                         # 6
    bias_map = n.const_mul(n.const("bias_base", _w(rng, 1, 8, 8, 16)), n.const("bias_gain", _w(rng, 1, 1, 1, 16)),
                           "bias_map")
    g2 = n.add(g, bias_map, "cat_biased", (1, 8, 8, 16))                       # 7 constant operand
    half = n.shape_op(OP.ADD, n.const("shape/a", np.array([1, 256], np.int32)),
                      n.const("shape/b", np.array([0, 256], np.int32)), "shape/sum")
    flat_shape = n.shape_op(OP.MUL, half, n.const("shape/c", np.array([1, 2], np.int32)), "shape/flat")
    h = n.reshape(g2, flat_shape, "flat", (1, 1024))                          # 8 shape from a constant chain
    out = n.fully_connected(h, n.const("fc/w", _w(rng, 10, 1024)), n.const("fc/b", _w(rng, 10)),
                            "logits", (1, 10))                                  # 9
    n.output(out)
    n.output(d)
    return n.build(scheme)


# --------------------------------------------------------------------------- models the splitter refuses
# Written with ModelBuilder; the control-flow and variable models are valid (LiteRT runs
# them), so a refusal is about what a split would break, not about a malformed file.

def _const_f32(*values: float) -> np.ndarray:
    return np.array(values, np.float32)


def while_model() -> bytes:
    """x -> WHILE (cond: i < 10, body: i + 1) -> out: three subgraphs."""
    from ai_edge_litert import schema_py_generated as fb

    from testbed.model.builder import OP, ModelBuilder
    b = ModelBuilder("testbed unit-test WHILE")
    cond, body = b.subgraph("cond"), b.subgraph("body")
    x = b.input("i", (1,), "int32")
    opt = fb.WhileOptionsT()
    opt.condSubgraphIndex, opt.bodySubgraphIndex = 1, 2
    b.add_op(OP.WHILE, [x], [("out", (1,))], fb.BuiltinOptions.WhileOptions, opt, dtype="int32")
    b.output("out")
    ci = cond.input("ci", (1,), "int32")
    cond.add_op(OP.LESS, [ci, cond.const("ten", np.array([10], np.int32))], [("lt", (1,))],
                fb.BuiltinOptions.LessOptions, fb.LessOptionsT(), dtype="bool")
    cond.output("lt")
    bi = body.input("bi", (1,), "int32")
    body.add(bi, body.const("one", np.array([1], np.int32)), "next", (1,), dtype="int32")
    body.output("next")
    return b.build()


def if_model() -> bytes:
    """IF(c) then x + 1 else x + 2."""
    from ai_edge_litert import schema_py_generated as fb

    from testbed.model.builder import OP, ModelBuilder
    b = ModelBuilder("testbed unit-test IF")
    then, else_ = b.subgraph("then"), b.subgraph("else")
    c, x = b.input("c", (1,), "bool"), b.input("x", (1,))
    opt = fb.IfOptionsT()
    opt.thenSubgraphIndex, opt.elseSubgraphIndex = 1, 2
    b.add_op(OP.IF, [c, x], [("out", (1,))], fb.BuiltinOptions.IfOptions, opt)
    b.output("out")
    for sg, v in ((then, 1.0), (else_, 2.0)):
        xi = sg.input(f"{sg._sg.name}_x", (1,))
        sg.add(xi, sg.const(f"{sg._sg.name}_c", _const_f32(v)), f"{sg._sg.name}_out", (1,))
        sg.output(f"{sg._sg.name}_out")
    return b.build()


def call_once_model() -> bytes:
    """CALL_ONCE(init) then x + 1: initialisation in a second subgraph."""
    from ai_edge_litert import schema_py_generated as fb

    from testbed.model.builder import OP, ModelBuilder
    b = ModelBuilder("testbed unit-test CALL_ONCE")
    b.subgraph("init")
    opt = fb.CallOnceOptionsT()
    opt.initSubgraphIndex = 1
    b.op_on(OP.CALL_ONCE, [], [], fb.BuiltinOptions.CallOnceOptions, opt)
    x = b.input("x", (1,))
    b.output(b.add(x, b.const("one", _const_f32(1.0)), "out", (1,)))
    return b.build()


def variable_ops_model() -> bytes:
    """VAR_HANDLE -> ASSIGN_VARIABLE(x) -> READ_VARIABLE: state kept in a resource."""
    from ai_edge_litert import schema_py_generated as fb

    from testbed.model.builder import OP, ModelBuilder
    b = ModelBuilder("testbed unit-test resource variable")
    x = b.input("x", (1, 4))
    res = b.raw_tensor("var", (), fb.TensorType.RESOURCE)
    opt = fb.VarHandleOptionsT()
    opt.sharedName = "state"
    b.op_on(OP.VAR_HANDLE, [], [res], fb.BuiltinOptions.VarHandleOptions, opt)
    b.op_on(OP.ASSIGN_VARIABLE, [res, x], [], fb.BuiltinOptions.AssignVariableOptions, fb.AssignVariableOptionsT())
    b.add_op(OP.READ_VARIABLE, [res], [("read", (1, 4))], fb.BuiltinOptions.ReadVariableOptions,
             fb.ReadVariableOptionsT())
    b.output("read")
    return b.build()


def variable_tensor_model() -> bytes:
    """out = x + state, where state is a variable tensor (kept across invocations)."""
    from ai_edge_litert import schema_py_generated as fb

    from testbed.model.builder import ModelBuilder
    b = ModelBuilder("testbed unit-test variable tensor")
    x = b.input("x", (1, 4))
    state = b.raw_tensor("state", (1, 4), fb.TensorType.FLOAT32, variable=True)
    b.output(b.add(x, state, "out", (1, 4)))
    return b.build()


def custom_op_model(name: str | bytes = "TestbedNoSuchOp") -> bytes:
    """conv -> a custom op -> conv: three layers, the custom one in the middle."""
    from testbed.model.builder import ModelBuilder
    rng = np.random.default_rng(3)
    b = ModelBuilder("testbed unit-test custom op")
    x = b.input("x", (1, 8, 8, 3))
    a = b.conv2d(x, b.const("c0/w", _w(rng, 4, 3, 3, 3)), b.const("c0/b", _w(rng, 4)), "a", (1, 8, 8, 4))
    (c,) = b.custom_op(name, [a], [("custom_out", (1, 8, 8, 4))], options=b"\x00\x01")
    b.output(b.conv2d(c, b.const("c1/w", _w(rng, 2, 1, 1, 4)), b.const("c1/b", _w(rng, 2)), "out", (1, 8, 8, 2)))
    return b.build()


def no_inputs_model() -> bytes:
    from testbed.model.builder import ModelBuilder
    b = ModelBuilder("testbed unit-test no inputs")
    b.output(b.add(b.const("a", _const_f32(1.0)), b.const("b", _const_f32(2.0)), "sum", (1,)))
    return b.build()


def no_outputs_model() -> bytes:
    from testbed.model.builder import ModelBuilder
    b = ModelBuilder("testbed unit-test no outputs")
    x = b.input("x", (1,))
    b.add(x, b.const("one", _const_f32(1.0)), "unused", (1,))
    return b.build()


def no_operators_model() -> bytes:
    from testbed.model.builder import ModelBuilder
    b = ModelBuilder("testbed unit-test no operators")
    b.output(b.input("x", (1, 4)))
    return b.build()
