"""``testbed profile``: whole-model KPIs plus per-layer latency and memory, on this host.

Whole-model KPIs come from ``nodes.benchmark`` in a fresh process (so this
process's earlier work does not pollute init time and memory); per-layer latency
from one-layer models (``layers``) timed by ``nodes.benchmark.time_layers``.
Per-layer memory is the layer's output bytes and weight bytes from ``graph``.
Layers are computing operators only: constant operators (float16 DEQUANTIZE,
shape arithmetic) ride inside the one-layer models of their readers, run once at
the first invocation, and are counted in ``model.folded_ops``, never timed as layers.
On a deployed node the same two calls run inside the agent instead.
"""

from __future__ import annotations

from pathlib import Path

from nodes import benchmark
from testbed.errors import ModelError
from testbed.model import layers as layer_models
from testbed.model.graph import ModelGraph
from testbed.model.verify import custom_ops_registered


def profile(model_path: str | Path, runs: int = 50, warmup: int = 5, threads: int | None = None,
            layer_runs: int | None = None) -> dict:
    """KPIs, per-layer rows and the ratio Σ layer means / whole-model steady mean.

    Raises:
        ModelError: bad model, a custom op this runtime lacks, or the benchmark process failed.
    """
    if runs < 1 or warmup < 0:
        raise ModelError(f"--runs must be >= 1 and --warmup >= 0 (got {runs}, {warmup})", path=str(model_path))
    graph = ModelGraph.from_file(model_path)
    missing = sorted(name for name, ok in custom_ops_registered(graph).items() if not ok)
    if missing:
        raise ModelError(f"custom operator(s) {', '.join(map(repr, missing))} not registered in this host's "
                         "runtime: cannot profile here", path=str(model_path))
    try:
        kpis = benchmark.measure_in_fresh_process(str(model_path), runs, warmup, threads)
        timings = benchmark.time_layers(layer_models.one_layer_models(graph), layer_runs or runs, warmup, threads)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"profiling failed: {e}", path=str(model_path)) from e
    rows = []
    for layer, t in zip(graph.layers, timings):
        row = layer.to_dict()
        row.update(t)
        rows.append(row)
    total = sum(r["mean_s"] for r in rows)
    whole = kpis["steady_mean_s"]
    return {"model": {"path": str(model_path), "bytes": graph.size, "layers": graph.num_layers,
                      "operators": graph.num_operators, "folded_ops": len(graph.folded)},
            "kpis": kpis, "layers": rows, "sum_layers_mean_s": total,
            "sum_layers_over_whole": total / whole if whole > 0 else None}
