"""How faithful is rate shaping on this kernel? Prints ratios; asserts nothing.

For each rung of the bandwidth ladder (the uplink of ``ladder-*mbit``), on a
veth between two fresh namespaces:

* measured ÷ ideal transfer time of one TCP transfer of 100 kB, 1 MB and 4 MB,
  where ideal = bytes·8/rate + RTT (RTT = the connection's handshake time).
  Goal ≤ 1.10 (and not far below 1: a ratio < 1 means the shaper let data
  through faster than the rate).
* plain TCP goodput (one 2-3 s transfer) ÷ iperf3 goodput on the same shaped
  link. Goal ≥ 0.95.
* the stepper's timing error over a short looping trace (goal ≤ 10 ms).

Run as root:  .venv/bin/python bench/link_bench.py [--arrangement tbf|htb] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.link.profile import Direction, load_profile  # noqa: E402
from testbed.link.shaper import Shaper, detect_capabilities  # noqa: E402
from testbed.link.stepper import Stepper  # noqa: E402
from testbed.link.target import Target  # noqa: E402
from tests.integration.linknet import iperf3_goodput, tcp_transfer, veth_pair  # noqa: E402

LADDER = [1, 2, 5, 10, 20, 50, 100]
SIZES = [100_000, 1_000_000, 4_000_000]


def transfer_ratios(pair, rate_bps: int, repeats: int) -> dict[int, float]:
    out = {}
    for size in SIZES:
        ratios = []
        for _ in range(repeats):
            t = tcp_transfer(pair, size)
            ratios.append(t.seconds / (size * 8 / rate_bps + t.connect_s))
        out[size] = statistics.median(ratios)
    return out


def goodput_ratio(pair, rate_bps: int) -> tuple[float, float, float]:
    seconds = 2.5
    nbytes = int(rate_bps * seconds / 8)
    t = tcp_transfer(pair, nbytes)
    plain = nbytes * 8 / t.seconds
    iperf = iperf3_goodput(pair, seconds)
    return plain / iperf, plain, iperf


def stepper_errors(shaper: Shaper) -> dict:
    schedule = [(0.0, Direction(rate_bps=10_000_000)), (0.25, Direction(rate_bps=2_000_000)),
                (0.5, Direction(rate_bps=30_000_000))]
    with Stepper(shaper, schedule, period_s=0.75) as st:
        time.sleep(4.0)
    return st.report()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arrangement", default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="transfers per size (median)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    caps = detect_capabilities()
    rows = []
    with veth_pair() as pair:
        shaper = Shaper(Target(pair.dev_a, netns=pair.ns_a), arrangement=args.arrangement, capabilities=caps,
                        state_dir="/tmp/testbed-link-bench-state")
        try:
            for i, rung in enumerate(LADDER):
                d = load_profile(f"ladder-{rung}mbit").uplink
                emulation = shaper.apply(d) if i == 0 else shaper.change(d)
                ratios = transfer_ratios(pair, d.rate_bps, args.repeats)
                g_ratio, plain, iperf = goodput_ratio(pair, d.rate_bps)
                rows.append({"rate_mbit": rung, "emulation": emulation,
                             **{f"time_ratio_{s // 1000}kB": round(r, 3) for s, r in ratios.items()},
                             "goodput_ratio": round(g_ratio, 3), "tcp_mbit": round(plain / 1e6, 2),
                             "iperf3_mbit": round(iperf / 1e6, 2)})
                if not args.json:
                    r = rows[-1]
                    print(f"{rung:>4} Mbit/s {emulation:<10} time ratio 100kB {r['time_ratio_100kB']:.3f}  "
                          f"1MB {r['time_ratio_1000kB']:.3f}  4MB {r['time_ratio_4000kB']:.3f}   "
                          f"TCP/iperf3 {r['goodput_ratio']:.3f} ({r['tcp_mbit']} / {r['iperf3_mbit']} Mbit/s)",
                          flush=True)
            steps = stepper_errors(shaper)
        finally:
            shaper.clear()
            shaper.close()
    worst_time = max(v for r in rows for k, v in r.items() if k.startswith("time_ratio"))
    best_time = min(v for r in rows for k, v in r.items() if k.startswith("time_ratio"))
    worst_goodput = min(r["goodput_ratio"] for r in rows)
    summary = {"kernel_netem": caps.netem, "rows": rows, "stepper": steps,
               "time_ratio_range": [best_time, worst_time], "goodput_ratio_min": worst_goodput,
               "goals": {"time_ratio_le_1.10": worst_time <= 1.10, "goodput_ratio_ge_0.95": worst_goodput >= 0.95,
                         "step_error_le_10ms": (steps["max_error_s"] or 0) <= 0.010}}
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"time ratio range {best_time:.3f}-{worst_time:.3f} (goal <= 1.10); "
              f"TCP/iperf3 min {worst_goodput:.3f} (goal >= 0.95); stepper: {steps['steps']} steps, "
              f"mean {steps['mean_error_s'] * 1e3:.2f} ms, max {steps['max_error_s'] * 1e3:.2f} ms (goal <= 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
