"""Write small TFLite models from scratch (no TensorFlow): tensors, constants, ops.

Used by the built-in PoseNet (``zoo.posenet``) and by tests that need a model of a
given shape (a DAG with skips, concatenations, two inputs, an early output).
Shape inference is the caller's job: every op states its output shapes. Only the
options the testbed uses are wrapped; ``add_op`` accepts any options object.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from testbed.model import tflite

_ACT = {None: fb.ActivationFunctionType.NONE, "relu": fb.ActivationFunctionType.RELU,
        "relu6": fb.ActivationFunctionType.RELU6}
_PAD = {"same": fb.Padding.SAME, "valid": fb.Padding.VALID}


class ModelBuilder:
    """Accumulates one subgraph; ``build()`` returns the TFLite bytes."""

    def __init__(self, description: str = "testbed model builder") -> None:
        self._model = fb.ModelT()
        self._model.version = 3
        self._model.description = description
        self._model.operatorCodes = []
        self._model.buffers = [fb.BufferT()]  # buffer 0: the empty buffer, by convention
        self._sg = fb.SubGraphT()
        self._sg.name = "main"
        self._sg.tensors, self._sg.operators, self._sg.inputs, self._sg.outputs = [], [], [], []
        self._index: dict[str, int] = {}
        self._opcodes: dict[int, int] = {}

    # -- tensors ---------------------------------------------------------
    def _tensor(self, name: str, shape: Sequence[int], dtype: str, buffer: int = 0) -> str:
        if name in self._index:
            raise ValueError(f"duplicate tensor name {name!r}")
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [int(d) for d in shape], tflite.type_code(dtype), buffer
        self._index[name] = len(self._sg.tensors)
        self._sg.tensors.append(t)
        return name

    def input(self, name: str, shape: Sequence[int], dtype: str = "float32") -> str:
        self._tensor(name, shape, dtype)
        self._sg.inputs.append(self._index[name])
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        buf = fb.BufferT()
        buf.data = np.frombuffer(value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes(),
                                 dtype=np.uint8)
        self._model.buffers.append(buf)
        return self._tensor(name, value.shape, value.dtype.name, buffer=len(self._model.buffers) - 1)

    def quantize(self, name: str, scale: float | Sequence[float], zero_point: int | Sequence[int] = 0,
                 axis: int = 0) -> str:
        """Attach affine quantization (int8/uint8 models); per-channel when lists are given."""
        q = fb.QuantizationParametersT()
        q.scale = [float(v) for v in np.atleast_1d(scale)]
        q.zeroPoint = [int(v) for v in np.atleast_1d(zero_point)]
        q.quantizedDimension = axis
        self._sg.tensors[self._index[name]].quantization = q
        return name

    def output(self, name: str) -> None:
        self._sg.outputs.append(self._index[name])

    # -- operators -------------------------------------------------------
    def add_op(self, op: int, inputs: Sequence[str | None], outputs: Sequence[tuple[str, Sequence[int]]],
               options_type: int = fb.BuiltinOptions.NONE, options=None, dtype: str = "float32",
               version: int = 1) -> list[str]:
        """Append an operator; ``outputs`` are (name, shape) pairs created here."""
        if op not in self._opcodes:
            code = fb.OperatorCodeT()
            code.builtinCode, code.deprecatedBuiltinCode, code.version = op, min(op, 127), version
            self._opcodes[op] = len(self._model.operatorCodes)
            self._model.operatorCodes.append(code)
        names = [self._tensor(n, s, dtype) for n, s in outputs]
        o = fb.OperatorT()
        o.opcodeIndex = self._opcodes[op]
        o.inputs = [-1 if n is None else self._index[n] for n in inputs]
        o.outputs = [self._index[n] for n in names]
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self._sg.operators.append(o)
        return names

    def conv2d(self, x: str, w: str, b: str, out: str, shape: Sequence[int], stride: int = 1,
               padding: str = "same", act: str | None = None, dtype: str = "float32", version: int = 1) -> str:
        opt = fb.Conv2DOptionsT()
        opt.padding, opt.strideW, opt.strideH = _PAD[padding], stride, stride
        opt.dilationWFactor = opt.dilationHFactor = 1
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(fb.BuiltinOperator.CONV_2D, [x, w, b], [(out, shape)],
                           fb.BuiltinOptions.Conv2DOptions, opt, dtype=dtype, version=version)[0]

    def depthwise(self, x: str, w: str, b: str, out: str, shape: Sequence[int], stride: int = 1,
                  padding: str = "same", act: str | None = None) -> str:
        opt = fb.DepthwiseConv2DOptionsT()
        opt.padding, opt.strideW, opt.strideH, opt.depthMultiplier = _PAD[padding], stride, stride, 1
        opt.dilationWFactor = opt.dilationHFactor = 1
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(fb.BuiltinOperator.DEPTHWISE_CONV_2D, [x, w, b], [(out, shape)],
                           fb.BuiltinOptions.DepthwiseConv2DOptions, opt)[0]

    def add(self, a: str, b: str, out: str, shape: Sequence[int], act: str | None = None,
            dtype: str = "float32", version: int = 1) -> str:
        opt = fb.AddOptionsT()
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(fb.BuiltinOperator.ADD, [a, b], [(out, shape)], fb.BuiltinOptions.AddOptions, opt,
                           dtype=dtype, version=version)[0]

    def concat(self, xs: Sequence[str], out: str, shape: Sequence[int], axis: int = -1) -> str:
        opt = fb.ConcatenationOptionsT()
        opt.axis, opt.fusedActivationFunction = axis, _ACT[None]
        return self.add_op(fb.BuiltinOperator.CONCATENATION, list(xs), [(out, shape)],
                           fb.BuiltinOptions.ConcatenationOptions, opt)[0]

    def reshape(self, x: str, shape_const: str, out: str, shape: Sequence[int]) -> str:
        opt = fb.ReshapeOptionsT()
        opt.newShape = [int(d) for d in shape]
        return self.add_op(fb.BuiltinOperator.RESHAPE, [x, shape_const], [(out, shape)],
                           fb.BuiltinOptions.ReshapeOptions, opt)[0]

    def fully_connected(self, x: str, w: str, b: str, out: str, shape: Sequence[int],
                        act: str | None = None) -> str:
        opt = fb.FullyConnectedOptionsT()
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(fb.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [(out, shape)],
                           fb.BuiltinOptions.FullyConnectedOptions, opt)[0]

    def build(self) -> bytes:
        self._model.subgraphs = [self._sg]
        return tflite.serialize(self._model)
