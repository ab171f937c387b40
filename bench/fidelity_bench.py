"""Fidelity of the measurements: is the uplink its framing-aware ideal, run after run,
and is the device anchor's compute time the same in every profile? Prints ratios.

Two measurements (issue 9), each on the real CLI (`testbed run`), per backend:

1. **Uplink ÷ ideal.** The smoke experiment (k = 0, 12, 31) at one ladder rung,
   run ``--runs`` times; per run the median over its shaped samples of
   uplink_s ÷ framing-aware ideal (frame bytes + 66 header bytes per 1448-byte
   segment, at the rung's rate). Goals: every run's median within 0.97 … 1.05,
   and max ÷ min of the runs' medians ≤ 1.05. Rungs: 5, 20 and 50 Mbit/s.
2. **Device anchor.** The flagship's nodes (as experiments/posenet_sweep.yaml sets them) at k = N over
   the flagship's five ladder rungs: the e2e p50 per profile (nothing crosses
   the link, so it is pure UE compute). Goal: max ÷ min ≤ 1.10.

``--hog`` keeps one busy-loop process running beside everything (the kernel
places it). ``--testbed PATH`` runs another checkout's CLI (e.g. the code before
a change, for a before/after table); run folders that predate the
``uplink_ideal_s`` column get the ideal computed here from ``cut_bytes_wire``
plus an estimated 200-byte frame header.

Not a test: it asserts nothing and takes minutes (60 smoke runs + 2 sweeps at
the defaults). Run on a quiet machine, as root, after `scripts/setup.sh`:

    .venv/bin/python bench/fidelity_bench.py [--runs 10] [--backends netns docker] [--hog]
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "smoke.yaml"
FLAGSHIP = ROOT / "experiments" / "posenet_sweep.yaml"
RUNGS = ("ladder-5mbit", "ladder-20mbit", "ladder-50mbit")
HEADER_ESTIMATE = 200  # frame prefix + JSON header, for folders without uplink_ideal_s


@contextmanager
def hog(enabled: bool) -> Iterator[None]:
    """One busy-loop process beside the measurement, placed by the kernel."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if enabled else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def run(testbed: str, experiment: Path, backend: str, out: Path) -> Path:
    before = set(out.iterdir()) if out.exists() else set()
    done = subprocess.run([testbed, "run", str(experiment), "--backend", backend, "--output", str(out),
                           "--metrics-listen", "127.0.0.1:0"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"testbed run {experiment.name} failed:\n{done.stderr[-2000:]}")
    (new,) = set(out.iterdir()) - before
    return new


def rows(folder: Path, name: str) -> list[dict[str, str]]:
    with (folder / name).open(newline="") as f:
        return list(csv.DictReader(f))


def uplink_ratio(folder: Path) -> float:
    """Median over the run's shaped samples of uplink ÷ framing-aware ideal."""
    rate = {r["profile"]: float(r["uplink_rate_bps"]) for r in rows(folder, "summary.csv")}
    ratios = []
    for s in rows(folder, "samples.csv"):
        if not s.get("uplink_s") or float(s["uplink_s"]) <= 0:
            continue
        if s.get("uplink_over_ideal"):
            ratios.append(float(s["uplink_over_ideal"]))
            continue
        payload = int(s["cut_bytes_wire"]) + HEADER_ESTIMATE
        ideal = (payload + math.ceil(payload / 1448) * 66) * 8 / rate[s["profile"]]
        ratios.append(float(s["uplink_s"]) / ideal)
    return statistics.median(ratios)


def experiment(base: Path, tmp: Path, name: str, **changes: object) -> Path:
    exp = yaml.safe_load(base.read_text())
    exp.update(changes, name=name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def uplink_table(testbed: str, backends: list[str], n: int, tmp: Path) -> None:
    print("\nuplink ÷ framing-aware ideal, median per run (goal: each 0.97-1.05; max/min <= 1.05)")
    print(f"{'backend':8} {'profile':15} {'min':>6} {'median':>7} {'max':>6} {'max/min':>8}  runs")
    for backend in backends:
        for rung in RUNGS:
            exp = experiment(SMOKE, tmp, f"fidelity-{rung}", network=[rung])
            out = tmp / f"out-{backend}-{rung}"
            meds = [uplink_ratio(run(testbed, exp, backend, out)) for _ in range(n)]
            print(f"{backend:8} {rung:15} {min(meds):6.3f} {statistics.median(meds):7.3f} {max(meds):6.3f} "
                  f"{max(meds) / min(meds):8.3f}  {' '.join(f'{m:.3f}' for m in meds)}", flush=True)


def anchor_table(testbed: str, backends: list[str], tmp: Path) -> None:
    flagship = yaml.safe_load(FLAGSHIP.read_text())
    print("\ndevice anchor (k = N) e2e p50 per flagship profile (goal: max/min <= 1.10)")
    for backend in backends:
        exp = experiment(FLAGSHIP, tmp, "fidelity-anchor", splits=[31],
                         runs={**flagship["runs"], "samples": 10, "kpi_runs": 1, "layer_runs": 1})
        folder = run(testbed, exp, backend, tmp / f"anchor-{backend}")
        p50 = {r["profile"]: float(r["e2e_p50_s"]) for r in rows(folder, "summary.csv")}
        print(f"{backend:8} " + "  ".join(f"{p}: {v * 1e3:.1f} ms" for p, v in p50.items())
              + f"  max/min {max(p50.values()) / min(p50.values()):.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=["netns", "docker"])
    ap.add_argument("--hog", action="store_true", help="one busy-loop process beside everything")
    ap.add_argument("--testbed", default=str(Path(sys.executable).with_name("testbed")),
                    help="the testbed CLI to measure (default: this venv's)")
    ap.add_argument("--skip-anchor", action="store_true")
    ap.add_argument("--skip-uplink", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fidelity-"))
    print(f"testbed: {args.testbed}; hog: {'one busy loop' if args.hog else 'none'}; runs: {args.runs}")
    try:
        with hog(args.hog):
            if not args.skip_uplink:
                uplink_table(args.testbed, args.backends, args.runs, tmp)
            if not args.skip_anchor:
                anchor_table(args.testbed, args.backends, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
