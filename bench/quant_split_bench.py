"""Benchmark: splitting models in every quantization scheme (prints counts and ratios; not a test).

Per model: operators, layers, constant ops folded into their readers, split points,
how many split points run head -> tail bitwise equal to the whole model / differ /
fail to load or run (LiteRT, default XNNPACK delegate and builtin kernels only),
the same count without folding (every operator a layer: the splitter before issue
16) for models that have constant ops, and

    split time ÷ copy time: writing every part (+ sha256 + manifest, no verification)
    ÷ copying the same part files with shutil.copyfile, best of --repeat, interleaved.

Models: the built-in PoseNet (float32) and the same network written by
``builder.Net`` as float16 / dynamic-range / int8 / uint8 / 16x8; the unit-test DAG
(tests/unit/model_samples.scheme_dag) in every scheme; and "deep fp16", a 48-block
residual network in float16 (336 operators, like the pose models of issue 16).

Usage: .venv/bin/python bench/quant_split_bench.py [--repeat 3] [--only posenet]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.errors import ModelError  # noqa: E402
from testbed.model.builder import SCHEMES, Net  # noqa: E402
from testbed.model.graph import ModelGraph  # noqa: E402
from testbed.model.splitter import split_model  # noqa: E402
from testbed.model.verify import reference, verify_split  # noqa: E402
from testbed.model.zoo.posenet import build_posenet  # noqa: E402
from tests.unit.model_samples import scheme_dag  # noqa: E402


def deep_net(scheme: str = "float16", blocks: int = 48, ch: int = 160, seed: int = 0) -> bytes:
    """blocks x (1x1 conv -> 3x3 depthwise -> residual add) on a 16x16 map."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, scale: float = 0.1) -> np.ndarray:
        return rng.uniform(-scale, scale, shape).astype(np.float32)
    n = Net(f"bench deep residual net, {blocks} blocks, {scheme}")
    x = n.conv2d(n.input("image", (1, 16, 16, 3)), n.const("stem/w", w(ch, 3, 3, 3)), n.const("stem/b", w(ch)),
                 "stem", (1, 16, 16, ch), act="relu6")
    for i in range(blocks):
        p = n.conv2d(x, n.const(f"b{i}/pw/w", w(ch, 1, 1, ch, scale=0.08)), n.const(f"b{i}/pw/b", w(ch)),
                     f"b{i}/pw", (1, 16, 16, ch), act="relu6")
        d = n.depthwise(p, n.const(f"b{i}/dw/w", w(1, 3, 3, ch, scale=0.3)), n.const(f"b{i}/dw/b", w(ch)),
                        f"b{i}/dw", (1, 16, 16, ch))
        x = n.add(x, d, f"b{i}/out", (1, 16, 16, ch), act="relu6")
    n.output(x)
    return n.build(scheme)


def models() -> list[tuple[str, Callable[[], bytes]]]:
    out = [("posenet fp32", lambda: build_posenet(0))]
    out += [(f"posenet {s}", lambda s=s: build_posenet(0, s)) for s in SCHEMES if s != "float32"]
    out += [(f"dag {s}", lambda s=s: scheme_dag(s)) for s in SCHEMES]
    out.append(("deep fp16", deep_net))
    return out


def _count(graph: ModelGraph, parts: Path, manifest: dict, delegate: bool) -> tuple[int, int, int]:
    """(exact, differs, failed) over every split point."""
    ref = reference(graph, delegate)
    exact = differs = failed = 0
    for entry in manifest["splits"]:
        try:
            r = verify_split(graph, parts, entry, ref, delegate)
        except ModelError:
            failed += 1
            continue
        exact += r["exact"] is True
        differs += r["exact"] is False
    return exact, differs, failed


def _timed_split_vs_copy(graph: ModelGraph, ks: list[int], root: Path, repeat: int) -> tuple[float, float, int]:
    parts = root / "parts"
    split_model(graph, ks, parts, verify=False)   # warm caches and imports
    files = sorted(parts.glob("*.tflite"))
    total = sum(p.stat().st_size for p in files)

    def copy() -> None:
        dest = root / "copy"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        for p in files:
            shutil.copyfile(p, dest / p.name)
    t_split, t_copy = [], []
    for _ in range(repeat):   # interleaved so background load hits both alike
        t = time.perf_counter()
        split_model(graph, ks, parts, verify=False)
        t_split.append(time.perf_counter() - t)
        t = time.perf_counter()
        copy()
        t_copy.append(time.perf_counter() - t)
    shutil.rmtree(root / "copy", ignore_errors=True)
    return min(t_split), min(t_copy), total


def bench_one(name: str, make: Callable[[], bytes], repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tb-qbench-") as tmp:
        root = Path(tmp)
        path = root / "model.tflite"
        path.write_bytes(make())
        graph = ModelGraph.from_file(path)
        ks = list(range(graph.num_layers + 1))
        t_split, t_copy, total = _timed_split_vs_copy(graph, ks, root, repeat)
        manifest = split_model(graph, ks, root / "parts", verify=False)
        t = time.perf_counter()
        with_delegate = _count(graph, root / "parts", manifest, True)
        t_verify = time.perf_counter() - t
        without = _count(graph, root / "parts", manifest, False)
        unfolded = None
        if graph.folded:
            old = ModelGraph.from_file(path, fold_constants=False)
            old_manifest = split_model(old, range(old.num_layers + 1), root / "old", verify=False)
            unfolded = (old.num_layers + 1, _count(old, root / "old", old_manifest, True))
        return {"name": name, "bytes": path.stat().st_size, "ops": graph.num_operators,
                "layers": graph.num_layers, "folded": len(graph.folded), "points": len(ks),
                "xnnpack": with_delegate, "none": without, "unfolded": unfolded, "written": total,
                "split_s": t_split, "copy_s": t_copy, "verify_s": t_verify}


def _fmt(c: tuple[int, int, int]) -> str:
    return f"{c[0]}/{c[1]}/{c[2]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="substring of the model names to run")
    args = ap.parse_args(argv)
    print(f"{'model':18s} {'MB':>6s} {'ops':>4s} {'layers':>6s} {'folded':>6s} {'points':>6s} "
          f"{'xnnpack e/d/f':>13s} {'none e/d/f':>11s} {'unfolded: points, xnnpack e/d/f':>32s} "
          f"{'written MB':>10s} {'split s':>8s} {'copy s':>7s} {'split/copy':>10s} {'verify s':>8s}")
    for name, make in models():
        if args.only not in name:
            continue
        r = bench_one(name, make, args.repeat)
        old = f"{r['unfolded'][0]}, {_fmt(r['unfolded'][1])}" if r["unfolded"] else "-"
        print(f"{r['name']:18s} {r['bytes'] / 1e6:6.2f} {r['ops']:4d} {r['layers']:6d} {r['folded']:6d} "
              f"{r['points']:6d} {_fmt(r['xnnpack']):>13s} {_fmt(r['none']):>11s} {old:>32s} "
              f"{r['written'] / 1e6:10.1f} {r['split_s']:8.3f} {r['copy_s']:7.3f} "
              f"{r['split_s'] / r['copy_s']:10.2f} {r['verify_s']:8.2f}", flush=True)
    print("\ne/d/f = split points whose head -> tail output is bitwise equal / differs / fails to load or run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
