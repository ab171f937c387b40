"""The VM tier's measurements, run inside the guest (a kernel with sch_netem).

Owns: the two namespaces joined by a veth, driving the project's Shaper on
them, and turning probe output (``tests/vm/guest/probe.py``) into numbers.
Leaves every judgement to the host-side test (``tests/vm/test_netem_vm.py``):
this writes raw-ish measurements and the values that were set, never pass/fail,
so a tolerance lives in one place and a failure shows what was measured.

Each check is isolated: an exception is recorded under that check's name with
its traceback and the next check runs on a cleared link.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from testbed.link.profile import LinkProfile

NS_A, NS_B = "tbvmA", "tbvmB"          # A = local (uplink sender), B = remote
DEV_A, DEV_B = "tbvA", "tbvB"
IP_A, IP_B = "10.77.0.1", "10.77.0.2"
SINK_PORT = 7008
PY = [sys.executable, "-m", "tests.vm.guest.probe"]


def sh(*cmd: str, check: bool = True) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Net:
    """Two namespaces and a veth (B's kernel answers pings). Torn down by ``close``."""

    def __init__(self) -> None:
        sh("ip", "netns", "add", NS_A)
        sh("ip", "netns", "add", NS_B)
        sh("ip", "link", "add", DEV_A, "netns", NS_A, "type", "veth", "peer", "name", DEV_B,
           "netns", NS_B)
        for ns, dev, ip in ((NS_A, DEV_A, IP_A), (NS_B, DEV_B, IP_B)):
            sh(*in_ns(ns, "ip", "link", "set", "lo", "up"))
            sh(*in_ns(ns, "ip", "addr", "add", f"{ip}/24", "dev", dev))
            sh(*in_ns(ns, "ip", "link", "set", dev, "up"))
            # Segmentation offloads would let one "packet" be 64 kB on the
            # shaped qdisc; real links carry MTU-sized frames.
            sh(*in_ns(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"),
               check=False)

    def close(self) -> None:
        for ns in (NS_A, NS_B):
            sh("ip", "netns", "del", ns, check=False)

    # -- measurements -------------------------------------------------------
    def ping(self, count: int, interval_s: float) -> dict:
        out = sh(*in_ns(NS_A, *PY, "ping", IP_B, str(count), str(interval_s)))
        return json.loads(out)

    def ping_async(self, count: int, interval_s: float) -> subprocess.Popen:
        return subprocess.Popen(in_ns(NS_A, *PY, "ping", IP_B, str(count), str(interval_s)), stdout=subprocess.PIPE, text=True)

    def transfer(self, sender: str, seconds: float, during=None) -> dict:
        """TCP for ``seconds`` from ``sender`` ("A" = uplink, "B" = downlink).

        ``during(t0)`` runs in this process while the transfer is going.
        """
        src_ns, dst_ns, dst_ip = (NS_A, NS_B, IP_B) if sender == "A" else (NS_B, NS_A, IP_A)
        sink = subprocess.Popen(in_ns(dst_ns, *PY, "sink", str(SINK_PORT)),
                                stdout=subprocess.PIPE, text=True)
        sink.stdout.readline()
        src = subprocess.Popen(in_ns(src_ns, *PY, "source", dst_ip, str(SINK_PORT),
                                     str(seconds)), stdout=subprocess.PIPE, text=True)
        extra = during(time.monotonic()) if during else None
        src_out, _ = src.communicate(timeout=seconds + 60)
        sink_out, _ = sink.communicate(timeout=60)
        return {"source": json.loads(src_out), "sink": json.loads(sink_out), "during": extra}


def qdisc_dump(ns: str, dev: str, stats: bool = False) -> list:
    """The kernel's qdiscs on ``dev`` (tc's JSON: for comparing states and
    reading counters only; shaping itself goes through the project's Shaper)."""
    return json.loads(sh(*in_ns(ns, "tc", *(["-s"] if stats else []), "-j", "qdisc", "show",
                                "dev", dev)) or "[]")


def summarize_rtt(ping: dict) -> dict:
    got = [r for r in ping["rtt"] if r is not None]
    lost = [r is None for r in ping["rtt"]]
    bursts, run = [], 0
    for x in lost:
        if x:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    if run:
        bursts.append(run)
    return {
        "count": len(ping["rtt"]), "received": len(got),
        "loss_pct": 100.0 * sum(lost) / len(lost),
        "mean_s": statistics.fmean(got) if got else None,
        "median_s": statistics.median(got) if got else None,
        "stdev_s": statistics.stdev(got) if len(got) > 1 else None,
        "min_s": min(got) if got else None, "max_s": max(got) if got else None,
        "bursts": len(bursts), "mean_burst": statistics.fmean(bursts) if bursts else 0.0,
    }


def goodput(sink: dict, skip_s: float = 0.3) -> float:
    """Bits/s at the receiver, skipping slow start's first ``skip_s``."""
    b = sink["buckets"]
    k = int(round(skip_s / sink["bucket_s"]))
    body = b[k:-1] if len(b) > k + 1 else b  # the last bucket is partial
    return 8.0 * sum(body) / (len(body) * sink["bucket_s"]) if body else 0.0


def check_platform(net: Net) -> dict:
    """Plain tc: proves the kernel has netem and the measurement path works."""
    sh("modprobe", "sch_netem")
    base = summarize_rtt(net.ping(200, 0.005))
    sh(*in_ns(NS_A, "tc", "qdisc", "replace", "dev", DEV_A, "root", "netem", "delay", "40ms"))
    shaped = summarize_rtt(net.ping(200, 0.005))
    sh(*in_ns(NS_A, "tc", "qdisc", "del", "dev", DEV_A, "root"))
    # What tc itself makes of the harder options: the kernel's view to compare
    # the Shaper's against when one of them misbehaves.
    reference = {}
    for name, args in (("gemodel", ["loss", "gemodel", "5%", "30%", "100%", "0%"]),
                       ("jitter_normal", ["delay", "40ms", "8ms", "distribution", "normal"])):
        done = subprocess.run(in_ns(NS_A, "tc", "qdisc", "replace", "dev", DEV_A, "root", "netem", *args),
                              capture_output=True, text=True)
        reference[name] = {"tc_args": args, "stderr": done.stderr.strip(),
                           "kernel_view": qdisc_dump(NS_A, DEV_A)}
        sh(*in_ns(NS_A, "tc", "qdisc", "del", "dev", DEV_A, "root"), check=False)
    return {"baseline": base, "netem_40ms": shaped, "set_delay_s": 0.040, "tc_reference": reference}


# -- the link under test --------------------------------------------------------

_profiles = iter(range(10**6))


def make_profile(uplink: dict | None = None, downlink: dict | None = None,
                 trace: dict | None = None) -> LinkProfile:
    """A profile the way users write one (a file with human units), loaded
    through the project's own loader. JSON is YAML, so no writer is needed."""
    from testbed.link.profile import load_profile

    doc = {"name": "vmcheck", "source": "tests/vm/guest/checks.py", "uplink": uplink,
           "downlink": downlink, "trace": trace}
    path = Path(f"/tmp/vmcheck-{next(_profiles)}.yaml")
    path.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return load_profile(path)


class Link:
    """The project's Shaper on one end of the veth, driven by human-unit specs."""

    def __init__(self, ns: str, dev: str, arrangement: str = "auto") -> None:
        from testbed.link.shaper import Shaper
        from testbed.link.target import Target

        self.shaper = Shaper(Target(dev, netns=ns), arrangement=arrangement,
                             state_dir="/run/testbed-vm")

    def apply(self, spec: dict) -> str:
        return self.shaper.apply(make_profile(uplink=spec).uplink, "vmcheck")

    def change(self, spec: dict) -> str:
        return self.shaper.change(make_profile(uplink=spec).uplink, "vmcheck")

    def clear(self) -> bool:
        return self.shaper.clear()

    def show(self) -> dict:
        return self.shaper.show()

    def stepper(self, base: dict, steps: list[dict]):
        from testbed.link.stepper import Stepper

        profile = make_profile(uplink=base, trace={"steps": steps, "direction": "uplink"})
        return Stepper.for_profile(self.shaper, profile, "uplink")


def make_link(ns: str, dev: str) -> Link:
    return Link(ns, dev)


def toggled(net: Net, link: Link, spec: dict, count: int, interval_s: float, window_s: float,
            settle_s: float) -> dict:
    """One ping stream while ``spec`` is applied and cleared every ``window_s``.

    Shaped and unshaped probes interleave in time, so a slow drift of the
    host's load (other work on the same cores moves TCG's timing by
    milliseconds) hits both alike. Probes sent within ``settle_s`` of an
    apply/clear are left out (a packet queued in netem when clear deletes it
    is dropped, not measured).
    """
    link.shaper.capabilities()  # probing the kernel takes seconds under TCG: not inside a window
    probe = net.ping_async(count, interval_s)
    time.sleep(0.3)  # let the prober start
    spans: list[tuple[float, float, bool]] = []  # (op start, op end, shaped after)
    emulation = None
    end = time.monotonic() + count * interval_s
    shaped = False
    while time.monotonic() + window_s < end:
        t = time.monotonic()
        if shaped:
            link.clear()
        else:
            emulation = link.apply(spec)
        shaped = not shaped
        spans.append((t, time.monotonic(), shaped))
        time.sleep(max(0.0, t + window_s - time.monotonic()))
    if shaped:  # the last window ends here, not at the end of the stream
        t = time.monotonic()
        link.clear()
        spans.append((t, time.monotonic(), False))
    ping = json.loads(probe.communicate(timeout=120)[0])
    on = {"sent": [], "rtt": []}
    off = {"sent": [], "rtt": []}
    for i, (_op_start, op_end, state) in enumerate(spans):
        nxt = spans[i + 1][0] if i + 1 < len(spans) else end
        lo, hi = op_end + settle_s, nxt - settle_s
        bucket = on if state else off
        for t, r in zip(ping["sent"], ping["rtt"]):
            if lo <= t <= hi:
                bucket["sent"].append(t)
                bucket["rtt"].append(r)
    return {"shaped": summarize_rtt(on), "baseline": summarize_rtt(off), "emulation": emulation,
            "windows": len(spans), "ops_s": [round(b - a, 4) for a, b, _ in spans]}


def root_of(ns: str, dev: str) -> dict | None:
    for q in qdisc_dump(ns, dev):
        if q.get("root"):
            return {"kind": q.get("kind"), "handle": q.get("handle")}
    return None


def state_of(ns: str, dev: str) -> list:
    """What identifies the qdisc tree (not counters or reference counts)."""
    keep = ("kind", "handle", "parent", "root", "options")
    return [{k: q[k] for k in keep if k in q} for q in qdisc_dump(ns, dev)]


# -- checks ------------------------------------------------------------------

def check_delay(net: Net) -> dict:
    got = toggled(net, make_link(NS_A, DEV_A), {"delay": "30ms"}, count=1200, interval_s=0.005,
                  window_s=0.6, settle_s=0.05)
    return {"set_delay_s": 0.030, **got}


def check_jitter(net: Net) -> dict:
    spec = {"delay": "40ms", "jitter": "8ms", "distribution": "normal"}
    got = toggled(net, make_link(NS_A, DEV_A), spec, count=1200, interval_s=0.004,
                  window_s=0.8, settle_s=0.08)
    # netem's normal table is scaled so its standard deviation is the jitter.
    return {"set_delay_s": 0.040, "set_jitter_s": 0.008, "distribution": "normal",
            "expected_stdev_s": 0.008, **got}


def check_jitter_uniform(net: Net) -> dict:
    spec = {"delay": "40ms", "jitter": "8ms"}  # no distribution: netem draws uniformly
    got = toggled(net, make_link(NS_A, DEV_A), spec, count=1200, interval_s=0.004,
                  window_s=0.8, settle_s=0.08)
    # Uniform on [-jitter, +jitter] has standard deviation jitter / sqrt(3).
    return {"set_delay_s": 0.040, "set_jitter_s": 0.008, "distribution": "uniform",
            "expected_stdev_s": 0.008 / 3 ** 0.5, **got}


def check_loss(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    emulation = link.apply({"loss": "10%"})
    try:
        shaped = summarize_rtt(net.ping(2500, 0.001))
    finally:
        link.clear()
    return {"set_loss_pct": 10.0, "emulation": emulation, "shaped": shaped}


def check_gemodel(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    params = {"p": "5%", "r": "30%", "1-h": "100%", "1-k": "0%"}
    emulation = link.apply({"loss": {"gemodel": params}})
    kernel_view = qdisc_dump(NS_A, DEV_A)
    try:
        shaped = summarize_rtt(net.ping(2500, 0.001))
    finally:
        link.clear()
    # Good->bad 5 %, bad->good 30 %: stationary loss p/(p+r) = 14.3 %, mean burst 1/r = 3.3.
    return {"params": params, "expected_loss_pct": 100 * 0.05 / 0.35, "expected_mean_burst": 1 / 0.3,
            "emulation": emulation, "shaped": shaped, "kernel_view": kernel_view}


# Rates stay where the emulated CPU is not the bottleneck: under TCG, with the
# host's two cores shared, Python's TCP source/sink sustain ~8 Mbit/s only
# unevenly (measured 0.86-0.95 of 9-12 Mbit/s), which would test QEMU, not the qdisc.
def check_rate(net: Net) -> dict:
    up_bps, down_bps = 2_000_000, 5_000_000
    up, down = make_link(NS_A, DEV_A), make_link(NS_B, DEV_B)
    prof = make_profile(uplink={"rate": "2mbit"}, downlink={"rate": "5mbit"})
    emulation = {"uplink": up.shaper.apply(prof.uplink), "downlink": down.shaper.apply(prof.downlink)}
    try:
        a = net.transfer("A", 3.0)
        b = net.transfer("B", 3.0)
        # Drops and overlimits on each shaped egress: a goodput short of the
        # rate with drops here means the queue is too small, not slow TCG.
        stats = {"uplink": qdisc_dump(NS_A, DEV_A, stats=True),
                 "downlink": qdisc_dump(NS_B, DEV_B, stats=True)}
    finally:
        up.clear()
        down.clear()
    return {"emulation": emulation, "uplink_set_bps": up_bps, "downlink_set_bps": down_bps,
            "uplink_goodput_bps": goodput(a["sink"]), "downlink_goodput_bps": goodput(b["sink"]),
            "uplink_errors": [a["source"]["error"], a["sink"]["error"]],
            "downlink_errors": [b["source"]["error"], b["sink"]["error"]],
            "uplink_buckets": a["sink"]["buckets"], "downlink_buckets": b["sink"]["buckets"],
            "qdisc_stats": stats}


def check_change(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    before_bps, after_bps, at_s, total_s = 2_000_000, 5_000_000, 2.5, 5.0
    emulation = link.apply({"rate": "2mbit"})
    root_before = root_of(NS_A, DEV_A)
    changed = {}

    def during(t0: float) -> dict:
        time.sleep(max(0.0, t0 + at_s - time.monotonic()))
        changed["at"] = time.monotonic()
        link.change({"rate": "5mbit"})
        changed["took_s"] = time.monotonic() - changed["at"]
        return changed

    try:
        run = net.transfer("A", total_s, during=during)
        root_after = root_of(NS_A, DEV_A)
    finally:
        link.clear()
    sink = run["sink"]
    b, w = sink["buckets"], sink["bucket_s"]
    cut = int((changed["at"] - sink["first"]) / w)
    pre = b[int(0.3 / w):cut - 1]
    # TCP needs a moment to use the new rate; after the source stops, the
    # receiver only sees the queue drain, so the window ends there.
    stop = int((run["source"]["stopped"] - sink["first"]) / w)
    post = b[cut + int(0.5 / w):stop]
    return {"emulation": emulation, "before_set_bps": before_bps, "after_set_bps": after_bps,
            "goodput_before_bps": 8 * sum(pre) / (len(pre) * w) if pre else 0.0,
            "goodput_after_bps": 8 * sum(post) / (len(post) * w) if post else 0.0,
            "change_took_s": changed["took_s"], "root_before": root_before,
            "root_after": root_after, "source": run["source"],
            "sink": sink}


def check_arrangements(net: Net) -> dict:
    """Rate + delay through each qdisc arrangement the Shaper offers: which
    one measures best on a real netem kernel (the link layer's default)."""
    rate_bps, spec = 4_000_000, {"rate": "4mbit", "delay": "20ms"}
    out = {"set_rate_bps": rate_bps, "set_delay_s": 0.020, "arrangements": {}}
    for arrangement in ("auto", "tbf", "htb", "netem"):
        link = Link(NS_A, DEV_A, arrangement)
        try:
            emulation = link.apply(spec)
            idle = summarize_rtt(net.ping(100, 0.005))
            run = net.transfer("A", 3.0)
        finally:
            link.clear()
        out["arrangements"][arrangement] = {
            "emulation": emulation, "goodput_bps": goodput(run["sink"]),
            "idle_rtt_s": idle["mean_s"], "errors": [run["source"]["error"], run["sink"]["error"]]}
    return out


def _transitions(ping: dict, threshold_s: float) -> list[tuple[float, bool]]:
    """Send times where RTTs cross ``threshold_s`` and stay across 3 probes."""
    states = [(t, r > threshold_s) for t, r in zip(ping["sent"], ping["rtt"]) if r is not None]
    out, cur = [], states[0][1] if states else None
    for i in range(1, len(states) - 3):
        s = states[i][1]
        if s != cur and all(x[1] == s for x in states[i:i + 3]):
            out.append((states[i][0], s))
            cur = s
    return out


def check_trace(net: Net) -> dict:
    """Delay steps 5 -> 40 -> 5 -> 40 ms; packets tell when each step took effect."""
    link = make_link(NS_A, DEV_A)
    plan = [(0.0, "5ms"), (0.8, "40ms"), (1.6, "5ms"), (2.4, "40ms")]
    steps = [{"at": f"{at}s", "delay": d} for at, d in plan]
    interval = 0.002
    # How long one Shaper.change takes from this (main) thread under TCG, for
    # reading the stepper's errors.
    link.apply({"delay": "5ms"})
    change_s = []
    for d in ("40ms", "5ms", "40ms", "5ms"):
        t = time.monotonic()
        link.change({"delay": d})
        change_s.append(time.monotonic() - t)
    link.clear()
    try:
        probe = net.ping_async(1900, interval)
        time.sleep(0.5)  # the prober starts and sends unshaped for a while
        stepper = link.stepper({"delay": "5ms"}, steps)
        stepper.start()
        t0 = stepper.started_at
        time.sleep(max(0.0, t0 + 3.0 - time.monotonic()))
        stepper.stop()
        report = stepper.report()
        errors = list(stepper.errors_s)
        ping = json.loads(probe.communicate(timeout=60)[0])
    finally:
        link.clear()
    seen = _transitions(ping, 0.0225)
    got = []
    for at, d in plan[1:]:
        up = d == "40ms"
        match = [t for t, s in seen if s == up and t0 + at - 0.2 <= t <= t0 + at + 0.3]
        got.append({"at_s": at, "observed_at_s": (match[0] - t0) if match else None})
    return {"steps": got, "probe_interval_s": interval, "stepper_report": report,
            "stepper_errors_s": errors, "main_thread_change_s": change_s,
            "transitions": [(t - t0, s) for t, s in seen]}


def check_clear(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    before = state_of(NS_A, DEV_A)
    emulation = link.apply({"rate": "5mbit", "delay": "20ms"})
    after_apply = state_of(NS_A, DEV_A)
    link.clear()
    shown = link.show()
    return {"emulation": emulation, "before": before, "after_apply": after_apply,
            "after_clear": state_of(NS_A, DEV_A), "shown_after_clear_ours": shown["ours"],
            "shown_after_clear_root": shown["root"]}


CHECKS = {"platform": check_platform, "delay": check_delay, "jitter": check_jitter,
          "jitter_uniform": check_jitter_uniform,
          "loss": check_loss, "gemodel": check_gemodel, "rate": check_rate,
          "change": check_change, "arrangements": check_arrangements, "trace": check_trace, "clear": check_clear}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    wanted = json.loads((out / "args.json").read_text()).get("checks") if (out / "args.json").exists() else None
    results: dict = {"kernel": os.uname().release, "checks": {}}
    net = Net()
    try:
        for name, fn in CHECKS.items():
            if wanted and name not in wanted:
                continue
            t0 = time.monotonic()
            print(f"guest: check {name} ...", flush=True)
            try:
                results["checks"][name] = {"ok": True, **fn(net)}
            except Exception as e:  # recorded for the host-side assertion
                results["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                           "traceback": traceback.format_exc()}
                print(traceback.format_exc(), flush=True)
            results["checks"][name]["seconds"] = round(time.monotonic() - t0, 2)
            print(f"guest: check {name} done in {results['checks'][name]['seconds']} s", flush=True)
            (out / "results.json").write_text(json.dumps(results))
    finally:
        net.close()
    results["done"] = True
    (out / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
