"""A small, self-consistent run folder made up for the report's rendering tests.

Test data, not a stand-in for the sweep: it is written through the sweep's own
writer (``testbed.analysis.results.RunFolder``), so its files have exactly the real
columns, and its numbers obey the measurement contract (e2e = sum of its parts
plus a little noise; uplink = bytes·8/rate + delay). The real end-to-end check
is tests/integration/test_report_smoke.py, which reports on a smoke-experiment run.
"""

from __future__ import annotations

import random
from pathlib import Path

from testbed.analysis.results import ConfigurationResult, RunFolder

N = 6
LOCAL_S = [0.010, 0.020, 0.015, 0.025, 0.005, 0.010]
REMOTE_S = [v / 8 for v in LOCAL_S]
# cut bytes at k = 0..N-1; k = N cuts the model outputs (sent back down for every k < N)
CUT = [600_000, 400_000, 200_000, 50_000, 80_000, 10_000]
OUTPUT_BYTES = 2_000
HEADER = 64  # framing bytes per message on the wire
PROFILES = {
    # name: (uplink bit/s, uplink delay, downlink bit/s, downlink delay)
    "fast": (100_000_000, 0.001, 100_000_000, 0.001),
    "slow": (2_000_000, 0.020, 10_000_000, 0.020),
}


def make_run(parent: Path, name: str = "synthetic-run", samples: int = 8, seed: int = 1,
             local_scale: float = 1.0, profiles: dict | None = None, repeats: int = 1) -> Path:
    rng = random.Random(seed)
    profiles = profiles or PROFILES
    folder = RunFolder.create(parent, name)
    folder.write_config({"name": "synthetic", "split_points": list(range(N + 1)),
                         "network": list(profiles),
                         "nodes": {"local": {"cpus": 1.0 * local_scale, "memory": 2**30}, "remote": {"cpus": 2.0}}})
    folder.write_environment({"testbed": "0.1.0", "python": "3.11.2", "kernel": "6.1.0-test",
                              "backend": "netns", "netem": False, "cpu": {"model": "Test CPU", "count": 2}})
    splits = []
    for k in range(N + 1):
        cut = [{"name": f"t{k}", "shape": [1, CUT[k]], "dtype": "uint8", "bytes": CUT[k]}] if k < N else \
            [{"name": "out", "shape": [1, OUTPUT_BYTES], "dtype": "uint8", "bytes": OUTPUT_BYTES}]
        splits.append({"k": k, "head": f"head_{k:02d}.tflite" if k else None,
                       "tail": f"tail_{k:02d}.tflite" if k < N else None,
                       "head_bytes": 1000 * k or None, "tail_bytes": 1000 * (N - k) or None,
                       "head_sha256": None, "tail_sha256": None, "cut": cut})
    folder.write_manifest({"model": {"path": "synthetic.tflite", "sha256": "0" * 64, "layers": N, "bytes": 6000},
                           "splits": splits})
    folder.append_layers(
        {"node": node, "layer": i, "op": "CONV_2D", "output_bytes": CUT[i + 1] if i + 1 < N else OUTPUT_BYTES,
         "params": 10 * i, "param_bytes": 40 * i, "macs": 1000 * i, "mean_s": lat[i], "std_s": lat[i] / 20,
         "p50_s": lat[i], "p90_s": lat[i] * 1.05, "runs": 10, "threads": 1, "cpus": 1.0}
        for node, lat in (("local", [v * local_scale for v in LOCAL_S]), ("remote", REMOTE_S)) for i in range(N))
    for repeat, (prof, (up_r, up_d, down_r, down_d)) in ((r, p) for r in range(repeats) for p in profiles.items()):
        for k in range(N + 1):
            rows = []
            for i in range(samples):
                jitter = lambda: 1.0 + rng.uniform(-0.03, 0.03)  # noqa: E731
                s = {"head_s": sum(LOCAL_S[:k]) * local_scale * jitter(), "tail_s": sum(REMOTE_S[k:]) * jitter()}
                if k < N:
                    wire = CUT[k] + HEADER
                    ideal = wire * 8 / up_r + up_d
                    s.update(uplink_ideal_s=ideal, uplink_over_ideal=1.0 + rng.uniform(0, 0.02))
                    s.update(encode_s=1e-4, uplink_s=ideal * s["uplink_over_ideal"], remote_decode_s=5e-5,
                             remote_encode_s=5e-5, downlink_s=((OUTPUT_BYTES + HEADER) * 8 / down_r + down_d) * jitter(),
                             decode_s=5e-5, cut_bytes_raw=CUT[k], cut_bytes_wire=wire,
                             result_bytes_wire=OUTPUT_BYTES + HEADER)
                else:
                    s.update(encode_s=0.0, uplink_s=0.0, remote_decode_s=0.0, remote_encode_s=0.0, downlink_s=0.0,
                             decode_s=0.0, cut_bytes_raw=0, cut_bytes_wire=0, result_bytes_wire=0)
                s["e2e_s"] = sum(s[f"{t}_s"] for t in ("head", "encode", "uplink", "remote_decode", "tail",
                                                        "remote_encode", "downlink", "decode")) + 2e-5
                s.update(sample=i, input_index=i % 4, codec="raw", input_encoding="raw", clock="shared",
                         emulation_uplink="tbf", emulation_downlink="tbf")
                rows.append(s)
            parts = []
            for part, node, size in (("head", "local", 1000 * k), ("tail", "remote", 1000 * (N - k))):
                if size:
                    lat = sum(LOCAL_S[:k]) * local_scale if part == "head" else sum(REMOTE_S[k:])
                    parts.append({"part": part, "node": node, "file_bytes": size, "sha256": "0" * 64,
                                  "delivery_s": (size * 8 / down_r + down_d) if part == "head" else None,
                                  "kpi_profile": prof, "init_s": 0.01, "first_s": lat * 2,
                                  "warmup_mean_s": lat * 1.2, "steady_mean_s": lat, "steady_std_s": lat / 50,
                                  "steady_p50_s": lat, "steady_p90_s": lat * 1.04,
                                  "init_memory_bytes": 20_000_000, "peak_memory_bytes": 20_000_000 + 5000 * size})
            summary = {"codec": "raw", "input_encoding": "raw", "emulation_uplink": "tbf",
                       "emulation_downlink": "tbf", "clock": "shared",
                       "uplink_rate_bps": up_r, "uplink_delay_s": up_d, "uplink_loss_pct": 0.0,
                       "downlink_rate_bps": down_r, "downlink_delay_s": down_d, "downlink_loss_pct": 0.0,
                       "warmup": 1, "head_file_bytes": 1000 * k or None, "tail_file_bytes": 1000 * (N - k) or None,
                       "delivery_s": (1000 * k * 8 / down_r + down_d) if k else None, "wall_s": 0.5,
                       # phases that add up to wall_s, as the sweep's PhaseClock writes them
                       "phase_delivery_s": 0.1, "phase_sampling_s": 0.3, "phase_warmup_s": 0.05,
                       "phase_tail_load_s": 0.03, "phase_other_s": 0.02}
            folder.append_configuration(ConfigurationResult(prof, k, rows, summary, parts, repeat=repeat))
    return folder.path
