"""Write TFLite models from scratch (no TensorFlow): tensors, constants, ops, quantization schemes.

Two levels:

* ``ModelBuilder`` writes exactly what it is told: tensors, constants, operators,
  quantization parameters, extra subgraphs, custom ops. Shape inference is the
  caller's job: every op states its output shapes. Tests use it for models the
  splitter must refuse (control flow, variables, custom ops).
* ``Net`` describes a float network once (convolutions, depthwise, fully
  connected, adds, concatenations, reshapes, shape arithmetic on constants) and
  writes it in any scheme TFLite's converter produces (``SCHEMES``): float32;
  float16 weights (float16 buffers + DEQUANTIZE before their readers);
  dynamic-range (int8 weights with per-channel scales read by float ops:
  LiteRT's hybrid kernels; other float constants int8 + DEQUANTIZE); full
  integer int8 (QUANTIZE at the inputs, DEQUANTIZE at the outputs, per-channel
  int8 weights, int32 biases); uint8 (the converter's uint8 interface: uint8
  inputs/outputs requantized to an int8 body); 16x8 (int16 activations with
  zero point 0, int8 weights, int64 biases). Activation ranges for the integer
  schemes come from running the float32 version with LiteRT on deterministic
  inputs (post-training calibration, as the converter does with a
  representative dataset).

Used by the built-in PoseNet (``zoo.posenet``) and by tests. Reading models is ``tflite``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from testbed.model import tflite

_ACT = {None: fb.ActivationFunctionType.NONE, "relu": fb.ActivationFunctionType.RELU,
        "relu6": fb.ActivationFunctionType.RELU6}
_PAD = {"same": fb.Padding.SAME, "valid": fb.Padding.VALID}
OP = fb.BuiltinOperator


class ModelBuilder:
    """Accumulates one subgraph (plus optional extra ones); ``build()`` returns the TFLite bytes."""

    def __init__(self, description: str = "testbed model builder", *, _parent: ModelBuilder | None = None,
                 _name: str = "main") -> None:
        self._root = _parent is None
        if _parent is None:
            self._model = fb.ModelT()
            self._model.version = 3
            self._model.description = description
            self._model.operatorCodes = []
            self._model.buffers = [fb.BufferT()]  # buffer 0: the empty buffer, by convention
            self._opcodes: dict[tuple[int, str | bytes | None], int] = {}
            self._children: list[ModelBuilder] = []
        else:
            self._model, self._opcodes, self._children = _parent._model, _parent._opcodes, _parent._children
        self._sg = fb.SubGraphT()
        self._sg.name = _name
        self._sg.tensors, self._sg.operators, self._sg.inputs, self._sg.outputs = [], [], [], []
        self._index: dict[str, int] = {}

    def subgraph(self, name: str) -> ModelBuilder:
        """Another subgraph of the same model (index 1, 2, … in creation order), e.g. a WHILE body."""
        child = ModelBuilder(_parent=self, _name=name)
        self._children.append(child)
        return child

    # -- tensors ---------------------------------------------------------
    def _tensor(self, name: str, shape: Sequence[int], dtype: str, buffer: int = 0) -> str:
        return self.raw_tensor(name, shape, tflite.type_code(dtype), buffer)

    def raw_tensor(self, name: str, shape: Sequence[int], tensor_type: int, buffer: int = 0,
                   variable: bool = False) -> str:
        """A tensor of any TensorType (e.g. RESOURCE), optionally a variable tensor."""
        if name in self._index:
            raise ValueError(f"duplicate tensor name {name!r}")
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [int(d) for d in shape], tensor_type, buffer
        t.isVariable = variable
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
        """Attach affine quantization to a tensor; per-channel when lists are given (``axis``:
        the channel dimension: 0 for conv/fully-connected weights, 3 for depthwise)."""
        q = fb.QuantizationParametersT()
        q.scale = [float(v) for v in np.atleast_1d(scale)]
        q.zeroPoint = [int(v) for v in np.atleast_1d(zero_point)]
        q.quantizedDimension = axis
        self._sg.tensors[self._index[name]].quantization = q
        return name

    def output(self, name: str) -> None:
        self._sg.outputs.append(self._index[name])

    # -- operators -------------------------------------------------------
    def _opcode(self, op: int, version: int, custom: str | bytes | None = None) -> int:
        key = (op, custom)
        if key not in self._opcodes:
            code = fb.OperatorCodeT()
            code.builtinCode, code.deprecatedBuiltinCode, code.version = op, min(op, 127), version
            code.customCode = custom
            self._opcodes[key] = len(self._model.operatorCodes)
            self._model.operatorCodes.append(code)
        return self._opcodes[key]

    def add_op(self, op: int, inputs: Sequence[str | None], outputs: Sequence[tuple[str, Sequence[int]]],
               options_type: int = fb.BuiltinOptions.NONE, options=None, dtype: str = "float32",
               version: int = 1) -> list[str]:
        """Append an operator; ``outputs`` are (name, shape) pairs created here with ``dtype``."""
        return self._append(self._opcode(op, version), inputs, [self._tensor(n, s, dtype) for n, s in outputs],
                            options_type, options)

    def op_on(self, op: int, inputs: Sequence[str | None], outputs: Sequence[str],
              options_type: int = fb.BuiltinOptions.NONE, options=None, version: int = 1) -> None:
        """Append an operator writing existing tensors (e.g. ones made with ``raw_tensor``)."""
        self._append(self._opcode(op, version), inputs, list(outputs), options_type, options)

    def custom_op(self, name: str | bytes, inputs: Sequence[str], outputs: Sequence[tuple[str, Sequence[int]]],
                  options: bytes = b"", dtype: str = "float32") -> list[str]:
        """A custom operator (``name`` as bytes writes it unchecked, e.g. not UTF-8)."""
        index = self._opcode(OP.CUSTOM, 1, name)
        names = self._append(index, inputs, [self._tensor(n, s, dtype) for n, s in outputs])
        self._sg.operators[-1].customOptions = list(options) or None
        return names

    def _append(self, opcode_index: int, inputs: Sequence[str | None], outputs: list[str],
                options_type: int = fb.BuiltinOptions.NONE, options=None) -> list[str]:
        o = fb.OperatorT()
        o.opcodeIndex = opcode_index
        o.inputs = [-1 if n is None else self._index[n] for n in inputs]
        o.outputs = [self._index[n] for n in outputs]
        o.builtinOptionsType, o.builtinOptions = options_type, options
        self._sg.operators.append(o)
        return outputs

    def conv2d(self, x: str, w: str, b: str, out: str, shape: Sequence[int], stride: int = 1,
               padding: str = "same", act: str | None = None, dtype: str = "float32", version: int = 1) -> str:
        opt = fb.Conv2DOptionsT()
        opt.padding, opt.strideW, opt.strideH = _PAD[padding], stride, stride
        opt.dilationWFactor = opt.dilationHFactor = 1
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(OP.CONV_2D, [x, w, b], [(out, shape)],
                           fb.BuiltinOptions.Conv2DOptions, opt, dtype=dtype, version=version)[0]

    def depthwise(self, x: str, w: str, b: str, out: str, shape: Sequence[int], stride: int = 1,
                  padding: str = "same", act: str | None = None, dtype: str = "float32", version: int = 1) -> str:
        opt = fb.DepthwiseConv2DOptionsT()
        opt.padding, opt.strideW, opt.strideH, opt.depthMultiplier = _PAD[padding], stride, stride, 1
        opt.dilationWFactor = opt.dilationHFactor = 1
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(OP.DEPTHWISE_CONV_2D, [x, w, b], [(out, shape)],
                           fb.BuiltinOptions.DepthwiseConv2DOptions, opt, dtype=dtype, version=version)[0]

    def add(self, a: str, b: str, out: str, shape: Sequence[int], act: str | None = None,
            dtype: str = "float32", version: int = 1, pot_scale_int16: bool = True) -> str:
        """Elementwise add. int16 models want ``pot_scale_int16=False`` (general scales, as the
        converter writes them); the schema's default True asks for power-of-two scales."""
        opt = fb.AddOptionsT()
        opt.fusedActivationFunction = _ACT[act]
        opt.potScaleInt16 = pot_scale_int16
        return self.add_op(OP.ADD, [a, b], [(out, shape)], fb.BuiltinOptions.AddOptions, opt,
                           dtype=dtype, version=version)[0]

    def mul(self, a: str, b: str, out: str, shape: Sequence[int], dtype: str = "float32", version: int = 1) -> str:
        opt = fb.MulOptionsT()
        opt.fusedActivationFunction = _ACT[None]
        return self.add_op(OP.MUL, [a, b], [(out, shape)], fb.BuiltinOptions.MulOptions, opt,
                           dtype=dtype, version=version)[0]

    def concat(self, xs: Sequence[str], out: str, shape: Sequence[int], axis: int = -1,
               dtype: str = "float32", version: int = 1) -> str:
        opt = fb.ConcatenationOptionsT()
        opt.axis, opt.fusedActivationFunction = axis, _ACT[None]
        return self.add_op(OP.CONCATENATION, list(xs), [(out, shape)],
                           fb.BuiltinOptions.ConcatenationOptions, opt, dtype=dtype, version=version)[0]

    def reshape(self, x: str, shape_const: str, out: str, shape: Sequence[int], dtype: str = "float32") -> str:
        opt = fb.ReshapeOptionsT()
        opt.newShape = [int(d) for d in shape]
        return self.add_op(OP.RESHAPE, [x, shape_const], [(out, shape)],
                           fb.BuiltinOptions.ReshapeOptions, opt, dtype=dtype)[0]

    def fully_connected(self, x: str, w: str, b: str, out: str, shape: Sequence[int],
                        act: str | None = None, dtype: str = "float32", version: int = 1) -> str:
        opt = fb.FullyConnectedOptionsT()
        opt.fusedActivationFunction = _ACT[act]
        return self.add_op(OP.FULLY_CONNECTED, [x, w, b], [(out, shape)],
                           fb.BuiltinOptions.FullyConnectedOptions, opt, dtype=dtype, version=version)[0]

    def dequantize(self, x: str, out: str, shape: Sequence[int], version: int = 1) -> str:
        """float32 from float16 (version 3), int8 (2), uint8 (1) or int16 (3)."""
        return self.add_op(OP.DEQUANTIZE, [x], [(out, shape)], dtype="float32", version=version)[0]

    def quantize_op(self, x: str, out: str, shape: Sequence[int], dtype: str, version: int = 1) -> str:
        """QUANTIZE: float32 -> int8/uint8/int16, or requantize between integer types.
        The output's scale/zero point are set with ``quantize`` afterwards."""
        return self.add_op(OP.QUANTIZE, [x], [(out, shape)], dtype=dtype, version=version)[0]

    def build(self) -> bytes:
        if not self._root:
            raise ValueError("build() the model from its first subgraph")
        self._model.subgraphs = [self._sg] + [c._sg for c in self._children]
        return tflite.serialize(self._model)


# --------------------------------------------------------------------------- schemes

SCHEMES = ("float32", "float16", "dynamic", "int8", "uint8", "int16x8")

# Operator versions as TFLite's converter writes them (tools/versioning/op_version.cc).
_VERSIONS = {
    OP.CONV_2D: {"float32": 1, "hybrid": 5, "int8": 3, "int16": 4},
    OP.DEPTHWISE_CONV_2D: {"float32": 1, "hybrid": 6, "int8": 3, "int16": 5},
    OP.FULLY_CONNECTED: {"float32": 1, "hybrid": 3, "int8": 4, "int16": 7},
    OP.ADD: {"float32": 1, "int8": 2, "int16": 3},
    OP.CONCATENATION: {"float32": 1, "int8": 2, "int16": 3},
}


@dataclass
class _Record:
    kind: str
    args: dict = field(default_factory=dict)


class Net:
    """A float network recorded once and written in any of ``SCHEMES`` by ``build``.

    Activations and constants are named; ``const`` takes float32 weights or int32
    shape data. Every op returns its output name. Weights are quantized where
    their reader is written, so a weight tensor belongs to one reader (a bias
    scale depends on the reader's input scale).
    """

    def __init__(self, description: str = "testbed model builder") -> None:
        self.description = description
        self._records: list[_Record] = []
        self._consts: dict[str, np.ndarray] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._outputs: list[str] = []

    def _record(self, kind: str, out: str | None = None, shape: Sequence[int] | None = None, **args) -> str:
        if out is not None:
            if out in self._shapes or out in self._consts:
                raise ValueError(f"duplicate tensor name {out!r}")
            self._shapes[out] = tuple(int(d) for d in shape)
        self._records.append(_Record(kind, {"out": out, "shape": shape, **args}))
        return out

    def input(self, name: str, shape: Sequence[int]) -> str:
        return self._record("input", name, shape)

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        if value.dtype not in (np.float32, np.int32):
            raise ValueError(f"const {name!r}: float32 weights or int32 shape data, not {value.dtype}")
        if name in self._shapes or name in self._consts:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._consts[name] = value
        return name

    def conv2d(self, x: str, w: str, b: str, out: str, shape: Sequence[int], stride: int = 1,
               padding: str = "same", act: str | None = None) -> str:
        return self._record("conv", out, shape, x=x, w=w, b=b, stride=stride, padding=padding, act=act)

    def depthwise(self, x: str, w: str, b: str, out: str, shape: Sequence[int], stride: int = 1,
                  padding: str = "same", act: str | None = None) -> str:
        return self._record("depthwise", out, shape, x=x, w=w, b=b, stride=stride, padding=padding, act=act)

    def fully_connected(self, x: str, w: str, b: str, out: str, shape: Sequence[int],
                        act: str | None = None) -> str:
        return self._record("fc", out, shape, x=x, w=w, b=b, act=act)

    def add(self, a: str, b: str, out: str, shape: Sequence[int], act: str | None = None) -> str:
        """``a + b``; ``b`` may be a float32 constant (a learned bias map, say)."""
        return self._record("add", out, shape, a=a, b=b, act=act)

    def concat(self, xs: Sequence[str], out: str, shape: Sequence[int], axis: int = -1) -> str:
        return self._record("concat", out, shape, xs=list(xs), axis=axis)

    def reshape(self, x: str, shape_tensor: str, out: str, shape: Sequence[int]) -> str:
        """``shape_tensor``: an int32 constant or the result of ``shape_op``."""
        return self._record("reshape", out, shape, x=x, s=shape_tensor)

    def shape_op(self, op: int, a: str, b: str, out: str) -> str:
        """int32 ADD or MUL of two int32 constants/shape results: shape arithmetic on
        constants, a chain of constant operators in every scheme."""
        self._consts[out] = (self._consts[a] + self._consts[b] if op == OP.ADD
                             else self._consts[a] * self._consts[b]).astype(np.int32)
        self._records.append(_Record("shape_op", {"op": op, "a": a, "b": b, "out": out}))
        return out

    def const_mul(self, a: str, b: str, out: str) -> str:
        """``a * b`` of two float32 constants, left in the graph as a constant operator
        (float schemes: a DEQUANTIZE -> MUL chain in float16; integer schemes fold it
        to one constant, as the converter does)."""
        self._consts[out] = (self._consts[a] * self._consts[b]).astype(np.float32)
        self._records.append(_Record("const_mul", {"a": a, "b": b, "out": out}))
        return out

    def output(self, name: str) -> None:
        self._outputs.append(name)

    def build(self, scheme: str = "float32", calibration_seed: int = 0, calibration_samples: int = 4) -> bytes:
        """The TFLite bytes of this network in ``scheme`` (one of ``SCHEMES``)."""
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r} (have: {', '.join(SCHEMES)})")
        ranges = None
        if scheme in ("int8", "uint8", "int16x8"):
            ranges = _calibrate(_Writer(self, "float32").write(), self._shapes, calibration_seed,
                                calibration_samples)
            ranges = _same_scale_groups(self._records, ranges)
        return _Writer(self, scheme, ranges).write()


def _calibrate(float_model: bytes, shapes: dict[str, tuple[int, ...]], seed: int, samples: int) -> dict:
    """min/max of every activation over ``samples`` deterministic inputs (float32 model, LiteRT)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    interp = Interpreter(model_content=float_model, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
    rng = np.random.default_rng(seed)
    ranges: dict[str, tuple[float, float]] = {}
    for _ in range(samples):
        for d in interp.get_input_details():
            interp.set_tensor(d["index"], rng.uniform(-1.0, 1.0, d["shape"]).astype(np.float32))
        interp.invoke()
        for name in shapes:
            v = interp.get_tensor(index[name])
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(v.min())), max(hi, float(v.max())))
    return ranges


def _same_scale_groups(records: list[_Record], ranges: dict) -> dict:
    """Concatenation and reshape keep scale and zero point (TFLite's integer kernels
    require it): give every tensor of such a group the group's joint range."""
    parent: dict[str, str] = {}

    def find(n: str) -> str:
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    for r in records:
        members = r.args["xs"] if r.kind == "concat" else [r.args["x"]] if r.kind == "reshape" else []
        for m in members:
            parent[find(m)] = find(r.args["out"])
    joint: dict[str, tuple[float, float]] = {}
    for name, (lo, hi) in ranges.items():
        root = find(name)
        jl, jh = joint.get(root, (lo, hi))
        joint[root] = (min(jl, lo), max(jh, hi))
    return {name: joint[find(name)] for name in ranges}


def _affine(lo: float, hi: float, dtype: str) -> tuple[float, int]:
    """Scale and zero point of a range: asymmetric int8/uint8, symmetric int16 (zero point 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if dtype == "int16":
        return max(abs(lo), abs(hi), 1e-6) / 32767.0, 0
    scale = max(hi - lo, 1e-6) / 255.0
    qmin = -128 if dtype == "int8" else 0
    return scale, int(np.clip(round(qmin - lo / scale), qmin, qmin + 255))


def _symmetric(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights with zero point 0, per channel along ``axis`` (or per tensor)."""
    if axis is None:
        m = np.array([np.abs(w).max()])
    else:
        m = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    scale = np.maximum(m, 1e-8) / 127.0
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float64)


class _Writer:
    """Writes a ``Net``'s records through a ``ModelBuilder`` in one scheme."""

    def __init__(self, net: Net, scheme: str, ranges: dict | None = None) -> None:
        self.net, self.scheme, self.ranges = net, scheme, ranges or {}
        self.b = ModelBuilder(net.description)
        self.integer = scheme in ("int8", "uint8", "int16x8")
        self.act = "int16" if scheme == "int16x8" else "int8" if self.integer else "float32"
        self.kind = "int16" if scheme == "int16x8" else "int8" if self.integer else "float32"
        self.names: dict[str, str] = {}     # logical tensor -> written tensor its readers use
        self.scales: dict[str, float] = {}  # written activation -> scale (integer schemes)

    def write(self) -> bytes:
        for r in self.net._records:
            getattr(self, f"_{r.kind}")(**r.args)
        for name in self.net._outputs:
            self.b.output(name)
        return self.b.build()

    # -- activations -----------------------------------------------------
    def _out(self, out: str) -> str:
        """Name of the written tensor for activation ``out`` (model outputs get a float/uint8
        twin under the logical name in integer schemes)."""
        name = f"{out}_q" if self.integer and out in self.net._outputs else out
        self.names[out] = name
        return name

    def _qparams(self, name: str, logical: str) -> None:
        if self.integer:
            scale, zp = _affine(*self.ranges[logical], self.act)
            self.b.quantize(name, scale, zp)
            self.scales[name] = scale

    def _finish(self, out: str, name: str, shape) -> None:
        """Quantize an op's output and, for a model output, write its interface twin."""
        self._qparams(name, out)
        if not self.integer or out not in self.net._outputs:
            return
        if self.scheme == "uint8":
            scale, zp = _affine(*self.ranges[out], "int8")
            self.b.quantize(self.b.quantize_op(name, out, shape, "uint8"), scale, zp + 128)
        else:
            self.b.dequantize(name, out, shape, version=3 if self.act == "int16" else 2)

    def _input(self, out: str, shape) -> None:
        if not self.integer:
            self.names[out] = self.b.input(out, shape)
            return
        q = f"{out}_q"
        if self.scheme == "uint8":
            scale, zp = _affine(*self.ranges[out], "int8")
            self.b.quantize(self.b.input(out, shape, "uint8"), scale, zp + 128)
        else:
            self.b.input(out, shape)
        self.b.quantize_op(out, q, shape, self.act, version=2 if self.act == "int16" else 1)
        self._qparams(q, out)
        self.names[out] = q

    # -- weights -----------------------------------------------------------
    def _weight(self, name: str, axis: int | None) -> str:
        """A weight for a conv/depthwise (``axis``: channel dim) or fully-connected (None) reader."""
        w = self.net._consts[name]
        if self.scheme == "float32":
            return self.b.const(name, w)
        if self.scheme == "float16":
            return self._fp16(name, w)
        q, scale = _symmetric(w, axis)
        self.b.quantize(self.b.const(name, q), scale, [0] * len(scale), axis or 0)
        self.scales[name] = scale
        return name

    def _bias(self, name: str, x: str, w: str) -> str:
        b = self.net._consts[name]
        if not self.integer:
            return self.b.const(name, b) if self.scheme != "float16" else self._fp16(name, b)
        scale = self.scales[x] * self.scales[w]
        dtype = np.int64 if self.act == "int16" else np.int32
        q = np.round(b / (scale if scale.size > 1 else scale[0])).astype(dtype)
        self.b.quantize(self.b.const(name, q), scale, [0] * scale.size)
        return name

    def _fp16(self, name: str, value: np.ndarray) -> str:
        # TFLite's float16 post-training quantization: float16 buffer, DEQUANTIZE to float32.
        self.b.const(name, value.astype(np.float16))
        return self.b.dequantize(name, f"{name}/dequantize", value.shape, version=3)

    def _operand(self, name: str) -> str:
        """A float constant read by an op without a hybrid kernel (an ADD)."""
        if name in self.names:
            return self.names[name]
        v = self.net._consts[name]
        if self.scheme == "float32":
            return self.b.const(name, v)
        if self.scheme == "float16":
            return self._fp16(name, v)
        if self.scheme == "dynamic":
            q, scale = _symmetric(v, None)
            self.b.quantize(self.b.const(name, q), scale, 0)
            return self.b.dequantize(name, f"{name}/dequantize", v.shape, version=2)
        scale, zp = _affine(float(v.min()), float(v.max()), self.act)
        q = np.round(v / scale) + zp
        info = np.iinfo(self.act)
        self.b.quantize(self.b.const(name, np.clip(q, info.min, info.max).astype(self.act)), scale, zp)
        self.scales[name] = scale
        return name

    def _version(self, op: int, hybrid: bool = False) -> int:
        return _VERSIONS[op]["hybrid" if hybrid else self.kind]

    # -- ops -------------------------------------------------------------
    def _conv(self, out, shape, x, w, b, stride, padding, act) -> None:
        self._weighted(OP.CONV_2D, 0, out, shape, x, w, b, stride=stride, padding=padding, act=act)

    def _depthwise(self, out, shape, x, w, b, stride, padding, act) -> None:
        self._weighted(OP.DEPTHWISE_CONV_2D, 3, out, shape, x, w, b, stride=stride, padding=padding, act=act)

    def _fc(self, out, shape, x, w, b, act) -> None:
        self._weighted(OP.FULLY_CONNECTED, None, out, shape, x, w, b, act=act)

    def _weighted(self, op: int, axis: int | None, out: str, shape, x: str, w: str, b: str, **opt) -> None:
        hybrid = self.scheme == "dynamic"
        xs = self.names[x]
        wt = self._weight(w, axis)
        bt = self._bias(b, xs, w)
        name = self._out(out)
        make = {OP.CONV_2D: self.b.conv2d, OP.DEPTHWISE_CONV_2D: self.b.depthwise,
                OP.FULLY_CONNECTED: self.b.fully_connected}[op]
        make(xs, wt, bt, name, shape, dtype=self.act, version=self._version(op, hybrid), **opt)
        self._finish(out, name, shape)

    def _add(self, out, shape, a, b, act) -> None:
        operands = [self.names[n] if n in self.names else self._operand(n) for n in (a, b)]
        name = self._out(out)
        self.b.add(*operands, name, shape, act=act, dtype=self.act, version=self._version(OP.ADD),
                   pot_scale_int16=self.act != "int16")
        self._finish(out, name, shape)

    def _concat(self, out, shape, xs, axis) -> None:
        name = self._out(out)
        self.b.concat([self.names[x] for x in xs], name, shape, axis=axis, dtype=self.act,
                      version=self._version(OP.CONCATENATION))
        self._finish(out, name, shape)

    def _reshape(self, out, shape, x, s) -> None:
        st = self.names.get(s) or self.b.const(s, self.net._consts[s])
        self.names.setdefault(s, st)
        name = self._out(out)
        self.b.reshape(self.names[x], st, name, shape, dtype=self.act)
        self._finish(out, name, shape)

    def _const_mul(self, a, b, out) -> None:
        if self.integer:
            return   # written as one constant by its reader (_operand)
        ins = [self._operand(a), self._operand(b)]
        self.names[out] = self.b.mul(ins[0], ins[1], out, self.net._consts[out].shape)

    def _shape_op(self, op, a, b, out) -> None:
        ins = []
        for n in (a, b):
            if n not in self.names:
                self.names[n] = self.b.const(n, self.net._consts[n])
            ins.append(self.names[n])
        shape = self.net._consts[out].shape
        make = self.b.add if op == OP.ADD else self.b.mul
        self.names[out] = make(ins[0], ins[1], out, shape, dtype="int32")
