"""What a TFLite model is made of: layers in execution order and the cut at each split point.

A *layer* is one operator of the single subgraph, in the order the interpreter
runs them. For split point ``k`` the head is layers ``[0, k)`` and the tail
``[k, N)``; the *cut tensors* are every tensor produced before ``k`` (or a model
input) that is read at or after ``k``, or is a model output produced before ``k``.
Constant tensors (weights, reshape shapes) belong to the op that reads them and
are never cut. Works for DAGs: skips, concatenations, several inputs/outputs,
outputs produced early. Parsing lives in ``tflite``; writing parts in ``surgery``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from testbed.errors import ModelError
from testbed.model import tflite


@dataclass(frozen=True)
class TensorInfo:
    """A non-constant tensor as it would cross the link."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class Layer:
    """One operator. ``inputs``/``outputs`` are non-constant tensor names;
    ``params``/``param_bytes`` count its constant inputs; ``macs`` is
    multiply-accumulates for conv/depthwise/fully-connected/transpose-conv/
    batch-matmul and 0 for other ops."""

    index: int
    op: str
    inputs: list[str]
    outputs: list[str]
    output_shapes: list[tuple[int, ...]]
    output_bytes: int
    params: int
    param_bytes: int
    macs: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_shapes"] = [list(s) for s in self.output_shapes]
        return d


class ModelGraph:
    """The analysed graph of a validated single-subgraph TFLite model."""

    def __init__(self, model: fb.ModelT, path: str | None = None, size: int | None = None) -> None:
        self.model = model
        self.path = path
        self.size = size
        sg = model.subgraphs[0]
        self.subgraph = sg
        self._tensors = sg.tensors
        self._const = {i for i, t in enumerate(sg.tensors)
                       if t.buffer > 0 and tflite.buffer_nbytes(model.buffers[t.buffer]) > 0}
        self.producer: dict[int, int] = {}
        self.last_reader: dict[int, int] = {}
        for li, op in enumerate(sg.operators):
            for t in op.inputs:
                if t >= 0 and t not in self._const:
                    self.last_reader[t] = li
            for t in op.outputs:
                self.producer[t] = li
        self.input_ids: list[int] = list(sg.inputs)
        self.output_ids: list[int] = list(sg.outputs)
        self._check_names()
        self.layers = [self._layer(i, op) for i, op in enumerate(sg.operators)]

    # -- construction ----------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> ModelGraph:
        model, data = tflite.read(path)
        return cls(model, str(path), len(data))

    @classmethod
    def from_bytes(cls, data: bytes, path: str | None = None) -> ModelGraph:
        return cls(tflite.parse(data, path), path, len(data))

    def _check_names(self) -> None:
        # Parts are joined by tensor name, so activation names must be unique.
        seen: dict[str, int] = {}
        for i, t in enumerate(self._tensors):
            if i in self._const:
                continue
            name = tflite.tensor_name(t)
            if not name or name in seen:
                raise ModelError(f"unsupported model: tensor name {name!r} is empty or not unique "
                                 "(parts are joined by tensor name)", path=self.path)
            seen[name] = i

    # -- tensors ---------------------------------------------------------
    def is_const(self, t: int) -> bool:
        return t in self._const

    def info(self, t: int) -> TensorInfo:
        tensor = self._tensors[t]
        shape = tuple(tensor.shape)
        dtype = tflite.dtype_name(tensor.type)
        return TensorInfo(tflite.tensor_name(tensor), shape, dtype, math.prod(shape) * np.dtype(dtype).itemsize)

    def _layer(self, index: int, op: fb.OperatorT) -> Layer:
        ins = [t for t in op.inputs if t >= 0 and t not in self._const]
        consts = [t for t in op.inputs if t >= 0 and t in self._const]
        outs = [self.info(t) for t in op.outputs]
        params = sum(math.prod(self._tensors[t].shape) for t in consts)
        param_bytes = sum(tflite.buffer_nbytes(self.model.buffers[self._tensors[t].buffer]) for t in consts)
        name = tflite.op_name(self.model, op.opcodeIndex)
        return Layer(index, name, [tflite.tensor_name(self._tensors[t]) for t in ins],
                     [o.name for o in outs], [o.shape for o in outs], sum(o.bytes for o in outs),
                     params, param_bytes, self._macs(name, op, outs))

    def _macs(self, name: str, op: fb.OperatorT, outs: list[TensorInfo]) -> int:
        if not outs or len(op.inputs) < 2 or op.inputs[1] < 0:
            return 0
        out = math.prod(outs[0].shape)
        w = self._tensors[op.inputs[1]].shape
        if name == "CONV_2D" and len(w) == 4:
            return out * w[1] * w[2] * w[3]          # [cout, kh, kw, cin]
        if name == "DEPTHWISE_CONV_2D" and len(w) == 4:
            return out * w[1] * w[2]                 # [1, kh, kw, cout]
        if name == "FULLY_CONNECTED" and len(w) == 2:
            return out * w[1]                        # [units, in]
        if name == "TRANSPOSE_CONV" and len(op.inputs) > 2:
            x = self._tensors[op.inputs[2]].shape   # inputs: output_shape, weights, input
            return math.prod(x) * w[0] * w[1] * w[2] if len(w) == 4 else 0
        if name == "BATCH_MATMUL":
            a = self._tensors[op.inputs[0]].shape
            return out * (a[-1] if a else 0)
        return 0

    # -- public view -----------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [self.info(t) for t in self.input_ids]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [self.info(t) for t in self.output_ids]

    def check_k(self, k: int) -> None:
        if not isinstance(k, int) or not 0 <= k <= self.num_layers:
            raise ModelError(f"split point k={k} is out of range 0..{self.num_layers} "
                             f"({self.num_layers} layers)", path=self.path)

    def cut_ids(self, k: int) -> list[int]:
        """Cut tensor indices for split point ``k``: model inputs first (in input
        order), then tensors in the order they are produced."""
        self.check_k(k)
        outputs = set(self.output_ids)

        def crosses(t: int, produced_before: bool) -> bool:
            if not produced_before:
                return False
            return self.last_reader.get(t, -1) >= k or t in outputs

        cut = [t for t in self.input_ids if crosses(t, True)]
        for li in range(k):
            for t in self.subgraph.operators[li].outputs:
                if t not in cut and crosses(t, True):
                    cut.append(t)
        return cut

    def cut(self, k: int) -> list[TensorInfo]:
        return [self.info(t) for t in self.cut_ids(k)]

    def to_dict(self) -> dict:
        """Everything ``inspect --json`` prints."""
        return {
            "model": {"path": self.path, "bytes": self.size, "layers": self.num_layers},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "layers": [layer.to_dict() for layer in self.layers],
            "splits": [{"k": k, "cut": [t.to_dict() for t in self.cut(k)],
                        "cut_bytes": sum(t.bytes for t in self.cut(k))}
                       for k in range(self.num_layers + 1)],
        }
