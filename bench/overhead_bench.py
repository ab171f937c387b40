"""How much the testbed itself costs, as ratios against baselines measured in the same run.

1. inference:  in-node head_s + tail_s of the split model  ÷  direct LiteRT invoke of the
               unsplit model in this process (same threads)                     goal <= 1.10
2. sweep:      wall time of a small sweep  ÷  sum of its samples' e2e             goal <= 1.30
               (printed for the whole run and for the sampling phase alone)
3. goodput:    data-plane goodput of the k = 0 input crossing a shaped uplink  ÷
               iperf3 TCP goodput on the same shaped link, same namespaces       goal >= 0.95

Needs root (namespaces, qdiscs) and iperf3. Prints ratios; never fails on speed.

    .venv/bin/python bench/overhead_bench.py [--backend netns|docker] [--rate 50mbit]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.deploy import NodeSpec, deploy  # noqa: E402
from testbed.model.graph import ModelGraph  # noqa: E402
from testbed.model.splitter import split_model  # noqa: E402
from testbed.model.zoo import resolve  # noqa: E402
from testbed.units import parse_rate  # noqa: E402

SPLITS = [4, 12, 20, 28]


def direct_invoke(model: Path, runs: int, threads: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model), num_threads=threads)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.random.default_rng(0).uniform(-1, 1, d["shape"]).astype(np.float32))
    for _ in range(5):
        it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(graph: ModelGraph) -> list[dict]:
    from testbed.inputs import synthetic_images

    info = graph.inputs[0]
    return [{info.name: a} for a in synthetic_images(tuple(info.shape), info.dtype, 4)]


def _ns_prefix(target) -> list[str]:
    if target.netns:
        return ["ip", "netns", "exec", target.netns]
    return ["nsenter", "-t", str(target.pid), "-n"]


def inference_ratio(backend: str, runs: int) -> None:
    model = resolve({"builtin": "posenet"})
    graph = ModelGraph.from_file(model)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = split_model(model, SPLITS, tmp)
        token, run_id = secrets.token_hex(8), "tbb" + secrets.token_hex(3)
        with deploy(run_id, NodeSpec(threads=1), NodeSpec(threads=1), backend=backend, token=token) as dep:
            local, remote = dep.local.client(token), dep.remote.client(token)
            local.set_inputs(_inputs(graph))
            local.connect_peer(dep.remote.data_host, dep.remote.data_port)
            ratios = []
            for s in manifest["splits"]:
                head = (Path(tmp) / s["head"]).read_bytes()
                tail = (Path(tmp) / s["tail"]).read_bytes()
                local.load_part("head", head, s["head_sha256"], threads=1)
                remote.load_part("tail", tail, s["tail_sha256"], threads=1)
                # measured back to back with the baseline: the machine is shared, so the
                # baseline is taken again for each split instead of once
                direct = direct_invoke(model, runs, threads=1)
                rows = local.run(samples=runs, warmup=5)
                inode = statistics.median(r["head_s"] + r["tail_s"] for r in rows)
                ratios.append(inode / direct)
                print(f"  k={s['k']:2d}: head+tail {inode * 1e3:7.2f} ms  direct {direct * 1e3:7.2f} ms  "
                      f"ratio {inode / direct:.3f}")
    print(f"1. inference overhead: median ratio {statistics.median(ratios):.3f}, "
          f"mean {statistics.mean(ratios):.3f} (goal <= 1.10)")


def sweep_ratio(backend: str) -> None:
    import yaml
    from rich.console import Console

    from testbed.analysis.results import RunFolder
    from testbed.sweep import SweepOptions, run_experiment

    exp = yaml.safe_load((ROOT / "experiments" / "smoke.yaml").read_text())
    exp.update(name="overhead-bench", splits=[0, 12, 31])
    exp["runs"] = {"warmup": 2, "samples": 100, "max_seconds": 30, "kpi_runs": 3, "layer_runs": 3}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        exp["network"] = [str(ROOT / "netem_profiles" / f"{n}.yaml") if "/" not in n else n
                          for n in exp["network"]]
        path.write_text(yaml.safe_dump(exp))
        t0 = time.monotonic()
        run_dir = run_experiment(path, SweepOptions(backend=backend, output=Path(tmp) / "out",
                                                    metrics_listen="127.0.0.1:0", progress=False),
                                 console=Console(file=io.StringIO()))
        wall = time.monotonic() - t0
        run = RunFolder(run_dir)
        e2e = sum(s["e2e_s"] for s in run.samples())
        sampling = sum(r["sampling_s"] for r in run.summary())
        configs = sum(r["wall_s"] for r in run.summary())
    print(f"2. sweep overhead: whole run {wall:.1f} s / sum e2e {e2e:.1f} s = {wall / e2e:.2f}; "
          f"configurations {configs / e2e:.2f}; sampling phase {sampling / e2e:.2f} (goal <= 1.30)")


def goodput_ratio(backend: str, rate_bps: int, samples: int) -> None:
    from testbed.link.profile import Direction
    from testbed.link.shaper import Shaper

    model = resolve({"builtin": "posenet"})
    graph = ModelGraph.from_file(model)
    data = model.read_bytes()
    token, run_id = secrets.token_hex(8), "tbb" + secrets.token_hex(3)
    with deploy(run_id, NodeSpec(), NodeSpec(), backend=backend, token=token) as dep:
        local, remote = dep.local.client(token), dep.remote.client(token)
        shapers = [Shaper(node.shaping) for node in (dep.local, dep.remote)]
        for shaper in shapers:
            shaper.apply(Direction(rate_bps=rate_bps))
        local.set_inputs(_inputs(graph))
        local.connect_peer(dep.remote.data_host, dep.remote.data_port)
        local.load_part("head", None)
        remote.load_part("tail", data, hashlib.sha256(data).hexdigest())
        rows = local.run(samples=samples, warmup=1)
        ours = statistics.median(r["cut_bytes_wire"] * 8 / r["uplink_s"] for r in rows)
        server = subprocess.Popen([*_ns_prefix(dep.remote.shaping), "iperf3", "-s", "-1", "-B",
                                   dep.remote.data_host, "-p", "5299"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            out = subprocess.run([*_ns_prefix(dep.local.shaping), "iperf3", "-c", dep.remote.data_host,
                                  "-p", "5299", "-t", "5", "-J"], capture_output=True, text=True, timeout=60)
            ref = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
        finally:
            server.kill()
            server.wait()
            for shaper in shapers:
                shaper.clear()
                shaper.close()
    print(f"3. goodput at {rate_bps / 1e6:g} Mbit/s: data plane {ours / 1e6:.2f} Mbit/s, iperf3 "
          f"{ref / 1e6:.2f} Mbit/s, ratio {ours / ref:.3f} (goal >= 0.95)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="netns", choices=["netns", "docker"])
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--only", choices=["inference", "sweep", "goodput"])
    args = ap.parse_args()
    if args.only in (None, "inference"):
        inference_ratio(args.backend, args.runs)
    if args.only in (None, "sweep"):
        sweep_ratio(args.backend)
    if args.only in (None, "goodput"):
        goodput_ratio(args.backend, parse_rate(args.rate), 10)


if __name__ == "__main__":
    main()
