"""Cut a contiguous run of layers out of a model as a runnable model of its own.

Pure flatbuffer surgery on the parsed ``ModelT``: keep the chosen layers, the
constant operators they need (``ModelGraph.ops_for``: a float16 weight's
DEQUANTIZE goes with every part whose layers read it), the tensors they touch
and the constant buffers they read; renumber tensors, buffers
and operator codes; drop everything else (unused tensors and buffers, signature
defs, metadata other than ``min_runtime_version``) so that parts add up to about
the original size. Tensor objects and weight arrays are shared with the source,
not copied, until serialisation. Which layers and which inputs/outputs is decided
by ``splitter`` and ``layers``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from testbed.model import tflite
from testbed.model.graph import ModelGraph

_KEEP_METADATA = {b"min_runtime_version", "min_runtime_version"}


def _i32(values) -> np.ndarray:
    # The generated Pack writes a list element by element in Python but a numpy
    # array in one copy: index vectors and shapes of parts go out as int32 arrays.
    return np.asarray(values, dtype=np.int32)


def extract(graph: ModelGraph, layer_ids: Sequence[int], inputs: Sequence[int],
            outputs: Sequence[int]) -> fb.ModelT:
    """A model running ``layer_ids`` (and the constant operators they need, in the
    model's order) with the given input and output tensor indices."""
    src, sg = graph.model, graph.subgraph
    ops = [sg.operators[i] for i in graph.ops_for(layer_ids)]

    tensor_map: dict[int, int] = {}
    for t in list(inputs) + [t for op in ops for t in (op.inputs + op.outputs + (op.intermediates or []))] \
            + list(outputs):
        if t >= 0 and t not in tensor_map:
            tensor_map[t] = len(tensor_map)

    buffers = [fb.BufferT()]
    buffer_map: dict[int, int] = {}
    tensors = []
    for old in tensor_map:
        t = copy.copy(sg.tensors[old])
        if graph.has_data(old):
            if t.buffer not in buffer_map:
                buffer_map[t.buffer] = len(buffers)
                buffers.append(src.buffers[t.buffer])
            t.buffer = buffer_map[t.buffer]
        else:
            t.buffer = 0
        t.shape = _i32(t.shape)
        tensors.append(t)

    code_map: dict[int, int] = {}
    new_ops = []
    for op in ops:
        o = copy.copy(op)
        if o.opcodeIndex not in code_map:
            code_map[o.opcodeIndex] = len(code_map)
        o.opcodeIndex = code_map[o.opcodeIndex]
        o.inputs = _i32([tensor_map[t] if t >= 0 else -1 for t in op.inputs])
        o.outputs = _i32([tensor_map[t] for t in op.outputs])
        if op.intermediates:
            o.intermediates = _i32([tensor_map[t] for t in op.intermediates])
        new_ops.append(o)

    new_sg = copy.copy(sg)
    new_sg.tensors, new_sg.operators = tensors, new_ops
    new_sg.inputs = _i32([tensor_map[t] for t in inputs])
    new_sg.outputs = _i32([tensor_map[t] for t in outputs])

    model = copy.copy(src)
    model.subgraphs = [new_sg]
    model.operatorCodes = [src.operatorCodes[i] for i in code_map]
    model.signatureDefs = None
    model.metadataBuffer = None
    metadata = []
    for m in src.metadata or []:
        if m.name in _KEEP_METADATA and 0 < m.buffer < len(src.buffers):
            mm = copy.copy(m)
            buffers.append(src.buffers[m.buffer])
            mm.buffer = len(buffers) - 1
            metadata.append(mm)
    model.metadata = metadata or None
    model.buffers = buffers
    return model


def extract_bytes(graph: ModelGraph, layer_ids: Sequence[int], inputs: Sequence[int],
                  outputs: Sequence[int]) -> bytes:
    return tflite.serialize(extract(graph, layer_ids, inputs, outputs))


def extract_view(graph: ModelGraph, layer_ids: Sequence[int], inputs: Sequence[int],
                 outputs: Sequence[int], builder=None) -> memoryview:
    """``extract_bytes`` without the final copy (see ``tflite.serialize_view``)."""
    return tflite.serialize_view(extract(graph, layer_ids, inputs, outputs), builder)
