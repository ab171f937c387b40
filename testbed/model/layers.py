"""Every layer of a model as a runnable one-layer model, for per-layer latency.

Layer ``i`` becomes a model whose inputs are that op's activation inputs and
whose outputs are its outputs, with its weights inside: constant tensors and the
constant operators folded into it (a float16 weight's DEQUANTIZE), which run
once at the first invocation and so stay out of the steady-state timing. The
nodes time them (``nodes.benchmark.time_layers``) on whichever node runs the
layer; this module only writes them (via ``surgery``).
"""

from __future__ import annotations

from pathlib import Path

from testbed.model import surgery
from testbed.model.graph import ModelGraph


def one_layer_model(graph: ModelGraph, index: int) -> bytes:
    """Layer ``index`` (computing layers only, as ``graph.layers`` numbers them) as a model."""
    op = graph.layer_op(index)
    inputs = []
    for t in op.inputs:
        if t >= 0 and not graph.is_const(t) and t not in inputs:
            inputs.append(t)
    return surgery.extract_bytes(graph, [index], inputs, list(op.outputs))


def one_layer_models(model_path: str | Path | ModelGraph) -> list[bytes]:
    """One TFLite model per layer (constant operators folded in), in execution order."""
    graph = model_path if isinstance(model_path, ModelGraph) else ModelGraph.from_file(model_path)
    return [one_layer_model(graph, i) for i in range(graph.num_layers)]
