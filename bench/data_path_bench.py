"""The data path's costs and gains, as ratios against baselines measured in the same run (issue 13).

1. codec:   encode + decode of a 2 MB float32 activation through each chain  ÷  a memcpy
            of it (numpy copy, best of N)                                      goal raw <= 2
2. size:    int8+zstd wire bytes ÷ raw bytes of PoseNet's cut at k = 12 and 24  goal <= 0.25
            with the keypoint drift (mean px over 17 keypoints) of the final
            outputs against the uncompressed split on the same inputs          goal <= 1 px
            (head, codec, tail run in this process with LiteRT; the codec is the nodes')
3. stream:  a stream's achieved throughput at the max sustainable rate  ÷  1 / (slowest
            stage time measured in single mode just before), on real agents in
            network namespaces, PoseNet k = 12, fp16, a shaped 20 Mbit/s uplink  goal >= 0.9

Prints a table; asserts nothing. Part 3 needs root (namespaces, qdiscs).

    .venv/bin/python bench/data_path_bench.py [--skip-stream] [--repeat 20]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nodes.tensor_codecs import make_codec, parse_chain  # noqa: E402

CHAINS = ("raw", "fp16", "int8", "int8-per-channel", "zstd", "zstd:9", "lz4", "fp16+zstd", "int8+zstd", "int8+lz4")


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def codec_ratios(repeat: int) -> list[tuple[str, float, float]]:
    """(chain, encode+decode ÷ memcpy, wire ÷ raw) for a 2 MB ReLU6-like activation."""
    from nodes.protocol import TensorDesc

    rng = np.random.default_rng(0)
    x = np.clip(rng.standard_normal((1, 32, 32, 512)).astype(np.float32) * 2, 0, 6)  # 2 MiB
    copy_s = _best(lambda: x.copy(), repeat)
    print(f"   (memcpy of {x.nbytes / 2**20:.0f} MiB: {copy_s * 1e3:.3f} ms, best of {repeat})")
    out = []
    for name in CHAINS:
        codec = make_codec(parse_chain(name))

        def both(codec=codec) -> int:
            bufs, params = codec.encode(x)
            view = memoryview(bufs[0]).cast("B")
            desc = TensorDesc("t", "float32", x.shape, codec.name, view.nbytes, params)
            codec.decode(view, desc)
            return view.nbytes

        wire = both()
        out.append((name, _best(both, repeat) / copy_s, wire / x.nbytes))
    return out


def posenet_sizes(ks: tuple[int, ...] = (12, 24), inputs: int = 4,
                  chains: tuple[str, ...] = ("int8+zstd",)) -> list[tuple[int, str, float, float, float]]:
    """(k, chain, wire ÷ raw, mean drift px, max drift px) over ``inputs`` inputs."""
    from nodes.fidelity import compare
    from nodes.part import Part
    from nodes.tensor_codecs import round_trip
    from testbed.inputs import synthetic_images
    from testbed.model.splitter import split_model
    from testbed.model.zoo.registry import resolve

    path = Path(resolve({"builtin": "posenet"}))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        man = split_model(path, ks, d, verify=False)
        for split in man["splits"]:
            head = Part(Path(d) / split["head"], split["head_sha256"], 1)
            tail = Part(Path(d) / split["tail"], split["tail_sha256"], 1)
            images = synthetic_images((1, 257, 257, 3), "float32", inputs, 0)
            cuts = [head.run({"sub_2": img}) for img in images]
            refs = [tail.run(cut) for cut in cuts]
            for chain in chains:
                raw = wire = 0
                drifts = []
                for cut, ref in zip(cuts, refs):
                    coded = {}
                    for n, a in cut.items():
                        coded[n], w = round_trip(a, chain)
                        raw, wire = raw + a.nbytes, wire + w
                    drifts.append(compare(ref, tail.run({n: coded[n] for n in tail.input_names}), 257))
                rows.append((split["k"], chain, wire / raw,
                             float(np.mean([f["kp_drift_mean_px"] for f in drifts])),
                             float(max(f["kp_drift_max_px"] for f in drifts))))
    return rows


def stream_ratio(duration_s: float) -> tuple[float, float, float, dict]:
    """(achieved ÷ 1/slowest, offered fps, 1/slowest, stream totals) on netns nodes."""
    from testbed.deploy import NodeSpec, deploy
    from testbed.inputs import synthetic_images
    from testbed.link.link import Link
    from testbed.link.profile import load_profile
    from testbed.model.splitter import split_model
    from testbed.model.zoo.registry import resolve
    from testbed.sweep.data_path import max_sustainable_fps

    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory() as d, deploy("dpb" + secrets.token_hex(2), NodeSpec(cpus=1.0, threads=1),
                                                    NodeSpec(cpus=1.0, threads=1), backend="netns",
                                                    token=token) as dep:
        split = split_model(Path(resolve({"builtin": "posenet"})), [12], d, verify=False)["splits"][0]
        local, remote = dep.local.client(token), dep.remote.client(token)
        link = Link(dep.local.shaping, dep.remote.shaping)
        try:
            link.apply(load_profile("ladder-20mbit"))
            local.set_inputs([{"sub_2": a} for a in synthetic_images((1, 257, 257, 3), "float32", 2, 0)])
            local.connect_peer(dep.remote.data_host, dep.remote.data_port)
            remote.load_part("tail", (Path(d) / split["tail"]).read_bytes(), split["tail_sha256"])
            local.load_part("head", (Path(d) / split["head"]).read_bytes(), split["head_sha256"])
            single = local.run_detailed(10, 2, codec="fp16")["samples"]
            fps = max_sustainable_fps(single, 1)
            st = local.run_detailed(1, 1, codec="fp16", stream={"fps": fps, "duration_s": duration_s,
                                                                 "queue": 2})["stream"]
            return st["throughput_fps"] / fps, fps, fps, st
        finally:
            link.teardown()
            local.close()
            remote.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--duration", type=float, default=10.0)
    args = ap.parse_args()
    print("1. codec encode+decode of a 2 MB float32 tensor ÷ memcpy (goal raw <= 2)")
    print(f"   {'chain':<20} {'÷ memcpy':>10} {'wire ÷ raw':>11}")
    for name, ratio, size in codec_ratios(args.repeat):
        print(f"   {name:<20} {ratio:>10.2f} {size:>11.3f}")
    print("2. PoseNet cut: wire ÷ raw (goal int8+zstd <= 0.25), keypoint drift (goal <= 1 px mean)")
    for k, chain, size, mean, worst in posenet_sizes(chains=("int8+zstd", "int8-per-channel+zstd", "fp16+zstd")):
        print(f"   k = {k:<3} {chain:<22} wire ÷ raw {size:.3f}   drift mean {mean:.2f} px   max {worst:.2f} px")
    if not args.skip_stream:
        ratio, offered, ideal, st = stream_ratio(args.duration)
        print("3. stream throughput at the sustainable rate ÷ 1/(slowest stage) (goal >= 0.9)")
        print(f"   offered {offered:.2f} fps = 1/slowest {ideal:.2f}; achieved {st['throughput_fps']:.2f} fps, "
              f"{st['frames_dropped']} of {st['frames_offered']} dropped -> ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
