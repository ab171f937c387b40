"""What a TFLite model is made of: layers in execution order and the cut at each split point.

A *layer* is one operator of the single subgraph that computes on activations,
in the order the interpreter runs them. For split point ``k`` the head is layers
``[0, k)`` and the tail ``[k, N)``; the *cut tensors* are every tensor produced
before ``k`` (or a model input) that is read at or after ``k``, or is a model
output produced before ``k``. Works for DAGs: skips, concatenations, several
inputs/outputs, outputs produced early.

*Weights* are constant tensors (a buffer with data) and the outputs of
*constant operators*: operators whose inputs are all weights, e.g. the
DEQUANTIZE that turns float16 weights into float32 for the next convolution, or
shape arithmetic on constants. Constant operators are folded into the layers
that read them: they are not layers, never a split point, their outputs are never
cut; every part (and every one-layer model) that holds a reader also holds the
constant operators it needs, duplicated when both parts need them. Splitting
between a DEQUANTIZE and its convolution would send a weight over the link and
hand the tail a convolution with a non-constant filter, which XNNPACK refuses.
Parsing lives in ``tflite``; writing parts in ``surgery``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
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


# Operators never folded though their inputs are constant: their output changes
# from one invocation to the next (a copy in each part would draw different numbers).
_NOT_CONSTANT = {"RANDOM_UNIFORM", "RANDOM_STANDARD_NORMAL", "MULTINOMIAL"}


@dataclass(frozen=True)
class Layer:
    """One computing operator. ``inputs``/``outputs`` are activation tensor names;
    ``params`` counts the elements of its weight inputs, ``param_bytes`` the bytes
    of the constant buffers behind them (float16 buffers of a folded DEQUANTIZE,
    not its float32 output); ``macs`` is multiply-accumulates for conv/depthwise/
    fully-connected/transpose-conv/batch-matmul and 0 for other ops. ``operator``
    is its index in the model's operator list; ``folded_ops`` how many constant
    operators it carries."""

    index: int
    op: str
    inputs: list[str]
    outputs: list[str]
    output_shapes: list[tuple[int, ...]]
    output_bytes: int
    params: int
    param_bytes: int
    macs: int
    operator: int
    folded_ops: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output_shapes"] = [list(s) for s in self.output_shapes]
        return d


class ModelGraph:
    """The analysed graph of a validated single-subgraph TFLite model.

    ``fold_constants=False`` makes every operator a layer (the behaviour before
    constant folding; ``bench/quant_split_bench.py`` uses it to show what folding
    prevents). ``data`` keeps the file bytes (weights are views into them).
    """

    def __init__(self, model: fb.ModelT, path: str | None = None, size: int | None = None,
                 data: bytes | None = None, fold_constants: bool = True) -> None:
        self.model = model
        self.path = path
        self.size = size
        self.data = data
        sg = model.subgraphs[0]
        self.subgraph = sg
        self._tensors = sg.tensors
        self._has_data = {i for i, t in enumerate(sg.tensors)
                          if t.buffer > 0 and tflite.buffer_nbytes(model.buffers[t.buffer]) > 0}
        self.input_ids: list[int] = list(sg.inputs)
        self.output_ids: list[int] = list(sg.outputs)
        self._weights = set(self._has_data)
        self.folded: list[int] = []              # operator indices of constant operators
        self.layer_ops: list[int] = []           # operator index of each layer
        self._needs: dict[int, frozenset[int]] = {}   # operator -> constant operators it needs
        self._classify(fold_constants)
        self.producer: dict[int, int] = {}       # activation tensor -> layer
        self.last_reader: dict[int, int] = {}    # activation tensor -> last layer reading it
        for li, oi in enumerate(self.layer_ops):
            op = sg.operators[oi]
            for t in op.inputs:
                if t >= 0 and t not in self._weights:
                    self.last_reader[t] = li
            for t in op.outputs:
                self.producer[t] = li
        self._check_names()
        self.layers = [self._layer(li, oi) for li, oi in enumerate(self.layer_ops)]

    # -- construction ----------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, fold_constants: bool = True) -> ModelGraph:
        model, data = tflite.read(path)
        return cls(model, str(path), len(data), data, fold_constants)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | None = None, fold_constants: bool = True) -> ModelGraph:
        return cls(tflite.parse(data, path), path, len(data), data, fold_constants)

    def _classify(self, fold: bool) -> None:
        """Split operators into layers and constant operators (see the module docstring)."""
        outputs = set(self.output_ids)
        made_by: dict[int, int] = {}   # folded tensor -> constant operator
        for oi, op in enumerate(self.subgraph.operators):
            ins = [t for t in op.inputs if t >= 0]
            needs = frozenset().union(*[{made_by[t]} | self._needs[made_by[t]] for t in ins if t in made_by])
            self._needs[oi] = needs
            # Custom ops are never folded: nothing says they are pure functions of their inputs.
            constant = (fold and ins and op.outputs and all(t in self._weights for t in ins)
                        and not outputs.intersection(op.outputs)
                        and not tflite.is_custom(self.model, op.opcodeIndex)
                        and tflite.op_name(self.model, op.opcodeIndex) not in _NOT_CONSTANT)
            if constant:
                self.folded.append(oi)
                self._weights.update(op.outputs)
                made_by.update((t, oi) for t in op.outputs)
            else:
                self.layer_ops.append(oi)

    def _check_names(self) -> None:
        # Parts are joined by tensor name, so activation names must be unique.
        seen: dict[str, int] = {}
        for i, t in enumerate(self._tensors):
            if i in self._weights:
                continue
            name = tflite.tensor_name(t)
            if not name or name in seen:
                raise ModelError(f"unsupported model: tensor name {name!r} is empty or not unique "
                                 "(parts are joined by tensor name)", path=self.path)
            seen[name] = i

    # -- tensors and operators -------------------------------------------
    def is_const(self, t: int) -> bool:
        """A weight: constant data or the output of a constant operator (never cut)."""
        return t in self._weights

    def has_data(self, t: int) -> bool:
        """A tensor whose value is stored in the file (parts copy its buffer)."""
        return t in self._has_data

    def layer_op(self, index: int) -> fb.OperatorT:
        return self.subgraph.operators[self.layer_ops[index]]

    def ops_for(self, layer_ids: Iterable[int]) -> list[int]:
        """Operator indices a part running ``layer_ids`` holds: the layers and every
        constant operator they need, in the model's execution order."""
        ops: set[int] = set()
        for li in layer_ids:
            oi = self.layer_ops[li]
            ops.add(oi)
            ops |= self._needs[oi]
        return sorted(ops)

    def buffers_for(self, layer_ids: Iterable[int]) -> set[int]:
        """Buffer indices (constant data) a part running ``layer_ids`` carries."""
        ops = self.subgraph.operators
        return {self._tensors[t].buffer for oi in self.ops_for(layer_ids) for t in ops[oi].inputs
                if t >= 0 and t in self._has_data}

    def part_bytes(self, layer_ids: Iterable[int]) -> int:
        """About the file size of a part running ``layer_ids``: its weights plus a
        small per-tensor table cost (for size warnings, not for the manifest)."""
        layer_ids = list(layer_ids)
        if not layer_ids:
            return 0
        weights = sum(tflite.buffer_nbytes(self.model.buffers[b]) for b in self.buffers_for(layer_ids))
        ops = self.ops_for(layer_ids)
        tensors = {t for oi in ops for t in self.subgraph.operators[oi].inputs + self.subgraph.operators[oi].outputs}
        return weights + 96 * len(tensors) + 64 * len(ops) + 1024

    def info(self, t: int) -> TensorInfo:
        tensor = self._tensors[t]
        shape = tuple(tensor.shape)
        dtype = tflite.dtype_name(tensor.type)
        return TensorInfo(tflite.tensor_name(tensor), shape, dtype, math.prod(shape) * np.dtype(dtype).itemsize)

    def _layer(self, index: int, operator: int) -> Layer:
        op = self.subgraph.operators[operator]
        ins = [t for t in op.inputs if t >= 0 and t not in self._weights]
        consts = [t for t in op.inputs if t >= 0 and t in self._weights]
        outs = [self.info(t) for t in op.outputs]
        params = sum(math.prod(self._tensors[t].shape) for t in consts)
        param_bytes = sum(tflite.buffer_nbytes(self.model.buffers[b]) for b in self.buffers_for([index]))
        name = tflite.op_name(self.model, op.opcodeIndex)
        return Layer(index, name, [tflite.tensor_name(self._tensors[t]) for t in ins],
                     [o.name for o in outs], [o.shape for o in outs], sum(o.bytes for o in outs),
                     params, param_bytes, self._macs(name, op, outs), operator, len(self._needs[operator]))

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
    def num_operators(self) -> int:
        return len(self.subgraph.operators)

    def custom_ops(self) -> dict[str, list[int]]:
        """Custom operator name -> the layers that use it (custom ops are never folded)."""
        found: dict[str, list[int]] = {}
        for li, oi in enumerate(self.layer_ops):
            op = self.subgraph.operators[oi]
            if tflite.is_custom(self.model, op.opcodeIndex):
                found.setdefault(tflite.op_name(self.model, op.opcodeIndex), []).append(li)
        return found

    def describe_operator(self, operator: int) -> str:
        """``operator 12 CONV_2D (layer 7, output 'name')`` for error messages."""
        op = self.subgraph.operators[operator]
        name = tflite.op_name(self.model, op.opcodeIndex)
        li = self.layer_ops.index(operator) if operator in self.layer_ops else None
        role = f"layer {li}" if li is not None else "constant operator folded into its readers"
        out = tflite.tensor_name(self._tensors[op.outputs[0]]) if op.outputs else "?"
        return f"operator {operator} {name} ({role}, output {out!r})"

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
            for t in self.layer_op(li).outputs:
                if t not in cut and crosses(t, True):
                    cut.append(t)
        return cut

    def cut(self, k: int) -> list[TensorInfo]:
        return [self.info(t) for t in self.cut_ids(k)]

    def to_dict(self) -> dict:
        """Everything ``inspect --json`` prints."""
        return {
            "model": {"path": self.path, "bytes": self.size, "layers": self.num_layers,
                      "operators": self.num_operators, "folded_ops": len(self.folded)},
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "custom_ops": [{"name": n, "layers": ls} for n, ls in sorted(self.custom_ops().items())],
            "layers": [layer.to_dict() for layer in self.layers],
            "splits": [{"k": k, "cut": [t.to_dict() for t in self.cut(k)],
                        "cut_bytes": sum(t.bytes for t in self.cut(k))}
                       for k in range(self.num_layers + 1)],
        }
