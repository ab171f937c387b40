"""benchmark_model-style KPIs for a TFLite model, and per-layer timing.

``python -m nodes.benchmark MODEL --runs N --warmup W --threads T --json`` measures
one model in the process it runs in; ``measure_in_fresh_process`` starts that
command so earlier work (allocations, warm caches, other models) does not pollute
init time and memory. KPIs follow TFLite's benchmark_model:

* ``init_s``: interpreter creation + ``allocate_tensors`` (delegate applied here);
* ``first_s``: the first inference; ``warmup_mean_s``: mean of the W warm-up runs
  after it; ``steady_*``: the N steady-state runs (mean, std, p50, p90);
* ``init_memory_bytes``: RSS growth across init; ``peak_memory_bytes``: peak RSS
  of the process minus its RSS before the model was loaded (benchmark_model's
  "overall" footprint delta, so the Python interpreter itself is not counted).

Inputs are fixed pseudo-random tensors (``runtime.random_inputs``). Imports
numpy, psutil and the runtime only, never ``testbed``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from nodes import runtime
from nodes.stats import describe


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a
    # child started by a big parent would report the parent's peak as its own.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _stats(times: Sequence[float]) -> dict[str, float]:
    """mean, std (ddof = 1), p50, p90 in seconds: ``nodes.stats``, as every table."""
    d = describe(times, (50, 90))
    return {"mean_s": d["mean"], "std_s": d["std"], "p50_s": d["p50"], "p90_s": d["p90"]}


def measure(model: str | bytes, runs: int = 50, warmup: int = 5, threads: int | None = None) -> dict:
    """KPIs of ``model`` measured in THIS process (see the module docstring)."""
    if runs < 1 or warmup < 0:
        raise ValueError("runs must be >= 1 and warmup >= 0")
    base = _rss()
    t0 = time.perf_counter()
    interp = runtime.make_interpreter(model, threads)
    interp.allocate_tensors()
    init_s = time.perf_counter() - t0
    init_mem = _rss() - base
    runtime.set_inputs(interp, runtime.random_inputs(interp))

    def once() -> float:
        t = time.perf_counter()
        interp.invoke()
        return time.perf_counter() - t

    first_s = once()
    warm = [once() for _ in range(warmup)]
    steady = _stats([once() for _ in range(runs)])
    return {"init_s": init_s, "first_s": first_s,
            "warmup_mean_s": float(np.mean(warm)) if warm else first_s,
            "steady_mean_s": steady["mean_s"], "steady_std_s": steady["std_s"],
            "steady_p50_s": steady["p50_s"], "steady_p90_s": steady["p90_s"],
            "init_memory_bytes": int(init_mem), "peak_memory_bytes": int(max(0, _peak_rss() - base)),
            "runs": runs, "warmup": warmup, "threads": threads, "runtime": runtime.RUNTIME}


def measure_in_fresh_process(model_path: str, runs: int = 50, warmup: int = 5,
                             threads: int | None = None, timeout: float = 600.0) -> dict:
    """Run ``python -m nodes.benchmark`` on ``model_path`` in a new process and return its KPIs.

    Raises:
        RuntimeError: the child failed (its last stderr line is in the message).
    """
    cmd = [sys.executable, "-m", "nodes.benchmark", os.fspath(model_path), "--runs", str(runs),
           "--warmup", str(warmup), "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark of {model_path} failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_layers(model_bytes_list: Sequence[bytes], runs: int = 20, warmup: int = 3,
                threads: int | None = None) -> list[dict]:
    """Latency of each (one-layer) model, measured back to back in this process.

    Returns one dict per model with mean_s, p50_s, p90_s, std_s.
    """
    out = []
    for blob in model_bytes_list:
        interp = runtime.make_interpreter(blob, threads)
        interp.allocate_tensors()
        runtime.set_inputs(interp, runtime.random_inputs(interp))
        for _ in range(warmup):
            interp.invoke()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            interp.invoke()
            times.append(time.perf_counter() - t)
        out.append(_stats(times))
        del interp
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nodes.benchmark",
                                 description="benchmark_model KPIs of a TFLite model "
                                             "(example: python -m nodes.benchmark m.tflite --runs 50 --json)")
    ap.add_argument("model")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    try:
        kpis = measure(args.model, args.runs, args.warmup, args.threads)
    except (ValueError, OSError) as e:
        print(f"error: {args.model}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(kpis))
    else:
        for k, v in kpis.items():
            print(f"{k:20s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
