"""Benchmark of the model layer (prints ratios; not a test).

1. split cost: time to split the built-in PoseNet at all 32 points and write every
   part (+ sha256 + manifest) ÷ time to copy the same bytes (the same part files,
   ``shutil.copyfile``), best of ``--repeat``. Goal: <= 3.
2. Σ per-layer latency (one-layer models) ÷ whole-model steady-state latency.
3. head(k) + tail(k) ÷ whole model size for every k.

Usage: .venv/bin/python bench/split_bench.py [--repeat 3] [--runs 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from nodes import benchmark
from testbed.model.graph import ModelGraph
from testbed.model.layers import one_layer_models
from testbed.model.splitter import split_model
from testbed.model.zoo.posenet import build_posenet


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
        root = Path(tmp)
        model = root / "posenet.tflite"
        model.write_bytes(build_posenet(0))
        size = model.stat().st_size
        graph = ModelGraph.from_file(model)
        ks = list(range(graph.num_layers + 1))

        manifest = {}

        def do_split():
            manifest.update(split_model(model, ks, root / "parts", verify=False))

        parts = None

        def do_copy():
            dest = root / "copy"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            for p in parts:
                shutil.copyfile(p, dest / p.name)

        do_split()  # warm the page cache and imports once
        parts = sorted((root / "parts").glob("*.tflite"))
        total = sum(p.stat().st_size for p in parts)
        t_copy_first = _best(do_copy, 1)
        t_split, t_copy = [], []
        for _ in range(args.repeat):  # interleave so background load hits both alike
            t_split.append(_best(do_split, 1))
            t_copy.append(_best(do_copy, 1))
        ts, tc = min(t_split), min(t_copy)
        print(f"model: built-in PoseNet, {graph.num_layers} layers, {size} bytes")
        print(f"split all {len(ks)} points: {len(parts)} parts, {total / 1e6:.1f} MB written")
        print(f"  split+write (best of {args.repeat}): {ts:.3f} s   copy same bytes: {tc:.3f} s "
              f"(first copy {t_copy_first:.3f} s)")
        print(f"  RATIO split/copy = {ts / tc:.2f}   (goal <= 3)")

        kpis = benchmark.measure_in_fresh_process(str(model), args.runs, 3, args.threads)
        layers = benchmark.time_layers(one_layer_models(graph), args.runs, 3, args.threads)
        s = sum(r["mean_s"] for r in layers)
        print(f"\nlatency (threads={args.threads}, {args.runs} runs): whole steady mean "
              f"{kpis['steady_mean_s'] * 1e3:.2f} ms, Σ layers {s * 1e3:.2f} ms")
        print(f"  RATIO Σ layers / whole = {s / kpis['steady_mean_s']:.2f}")
        print(f"  KPIs: init {kpis['init_s'] * 1e3:.1f} ms, first {kpis['first_s'] * 1e3:.1f} ms, "
              f"init mem {kpis['init_memory_bytes'] / 1e6:.1f} MB, peak mem {kpis['peak_memory_bytes'] / 1e6:.1f} MB")

        print("\n  k  head_bytes  tail_bytes  (head+tail)/whole  cut_bytes")
        for sp in manifest["splits"]:
            both = sp["head_bytes"] + sp["tail_bytes"]
            cut = sum(c["bytes"] for c in sp["cut"])
            print(f" {sp['k']:2d}  {sp['head_bytes']:10d}  {sp['tail_bytes']:10d}  {both / size:17.5f}  {cut:9d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
