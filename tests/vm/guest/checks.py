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

NS_A, NS_B = "tbvmA", "tbvmB"          # A = local (uplink sender), B = remote
DEV_A, DEV_B = "tbvA", "tbvB"
IP_A, IP_B = "10.77.0.1", "10.77.0.2"
ECHO_PORT, SINK_PORT = 7007, 7008
PY = [sys.executable, "-m", "tests.vm.guest.probe"]


def sh(*cmd: str, check: bool = True) -> str:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Net:
    """Two namespaces and a veth; echo server in B. Torn down by ``close``."""

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
        self.echo = subprocess.Popen(in_ns(NS_B, *PY, "echo", str(ECHO_PORT)),
                                     stdout=subprocess.PIPE, text=True)
        self.echo.stdout.readline()  # wait until it listens

    def close(self) -> None:
        self.echo.kill()
        self.echo.wait()
        for ns in (NS_A, NS_B):
            sh("ip", "netns", "del", ns, check=False)

    # -- measurements -------------------------------------------------------
    def ping(self, count: int, interval_s: float) -> dict:
        out = sh(*in_ns(NS_A, *PY, "ping", IP_B, str(ECHO_PORT), str(count), str(interval_s)))
        return json.loads(out)

    def ping_async(self, count: int, interval_s: float) -> subprocess.Popen:
        return subprocess.Popen(in_ns(NS_A, *PY, "ping", IP_B, str(ECHO_PORT), str(count),
                                      str(interval_s)), stdout=subprocess.PIPE, text=True)

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


def qdisc_dump(ns: str, dev: str) -> list:
    """The kernel's qdiscs on ``dev`` (tc's JSON, for comparing states only)."""
    return json.loads(sh(*in_ns(ns, "tc", "-j", "qdisc", "show", "dev", dev)) or "[]")


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
    return {"baseline": base, "netem_40ms": shaped, "set_delay_s": 0.040,
            "modules": sh("lsmod").split("\n")}


# -- the link under test --------------------------------------------------------

class TcLink:
    """CALIBRATION ONLY (until testbed.link lands): the same specs through tc.

    Not the thing under test; used to see what TCG timing allows.
    """

    def __init__(self, ns: str, dev: str) -> None:
        self.ns, self.dev = ns, dev

    @staticmethod
    def _args(spec: dict) -> list[str]:
        args = []
        if "delay" in spec:
            args += ["delay", spec["delay"]]
            if "jitter" in spec:
                args += [spec["jitter"]]
            if "distribution" in spec:
                args += ["distribution", spec["distribution"]]
        if "loss" in spec:
            loss = spec["loss"]
            if isinstance(loss, dict):
                g = loss["gemodel"]
                args += ["loss", "gemodel", g["p"], g["r"], g["1-h"], g["1-k"]]
            else:
                args += ["loss", str(loss)]
        if "rate" in spec:
            args += ["rate", spec["rate"]]
            if not any(k in spec for k in ("delay",)):
                pass
        return args

    def apply(self, spec: dict) -> str:
        sh(*in_ns(self.ns, "tc", "qdisc", "add", "dev", self.dev, "root", "handle", "1:", "netem",
                  *self._args(spec), "limit", "10000"))
        return "netem"

    def change(self, spec: dict) -> None:
        sh(*in_ns(self.ns, "tc", "qdisc", "change", "dev", self.dev, "root", "handle", "1:",
                  "netem", *self._args(spec), "limit", "10000"))

    def clear(self) -> None:
        sh(*in_ns(self.ns, "tc", "qdisc", "del", "dev", self.dev, "root"), check=False)

    def show(self) -> dict:
        return {"qdiscs": [q for q in qdisc_dump(self.ns, self.dev) if q.get("kind") != "noqueue"]}

    def stepper(self, steps: list[dict]):
        return None


def make_link(ns: str, dev: str):
    return TcLink(ns, dev)


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
    link = make_link(NS_A, DEV_A)
    base = summarize_rtt(net.ping(300, 0.005))
    spec = {"delay": "30ms"}
    emulation = link.apply(spec)
    try:
        shaped = summarize_rtt(net.ping(300, 0.005))
    finally:
        link.clear()
    return {"set_delay_s": 0.030, "emulation": emulation, "baseline": base, "shaped": shaped}


def check_jitter(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    base = summarize_rtt(net.ping(300, 0.005))
    spec = {"delay": "40ms", "jitter": "8ms", "distribution": "normal"}
    emulation = link.apply(spec)
    try:
        shaped = summarize_rtt(net.ping(500, 0.004))
    finally:
        link.clear()
    # netem's normal table is scaled so its standard deviation is the jitter.
    return {"set_delay_s": 0.040, "set_jitter_s": 0.008, "distribution": "normal",
            "expected_stdev_s": 0.008, "emulation": emulation, "baseline": base, "shaped": shaped}


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
    try:
        shaped = summarize_rtt(net.ping(2500, 0.001))
    finally:
        link.clear()
    # Good->bad 5 %, bad->good 30 %: stationary loss p/(p+r) = 14.3 %, mean burst 1/r = 3.3.
    return {"params": params, "expected_loss_pct": 100 * 0.05 / 0.35, "expected_mean_burst": 1 / 0.3,
            "emulation": emulation, "shaped": shaped}


def check_rate(net: Net) -> dict:
    up_bps, down_bps = 4_000_000, 12_000_000
    up, down = make_link(NS_A, DEV_A), make_link(NS_B, DEV_B)
    emulation = {"uplink": up.apply({"rate": "4mbit"}), "downlink": down.apply({"rate": "12mbit"})}
    try:
        a = net.transfer("A", 3.0)
        b = net.transfer("B", 3.0)
    finally:
        up.clear()
        down.clear()
    return {"emulation": emulation, "uplink_set_bps": up_bps, "downlink_set_bps": down_bps,
            "uplink_goodput_bps": goodput(a["sink"]), "downlink_goodput_bps": goodput(b["sink"]),
            "uplink_errors": [a["source"]["error"], a["sink"]["error"]],
            "downlink_errors": [b["source"]["error"], b["sink"]["error"]]}


def check_change(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    before_bps, after_bps, at_s, total_s = 3_000_000, 9_000_000, 2.5, 5.0
    emulation = link.apply({"rate": "3mbit"})
    root_before = root_of(NS_A, DEV_A)
    changed = {}

    def during(t0: float) -> dict:
        time.sleep(max(0.0, t0 + at_s - time.monotonic()))
        changed["at"] = time.monotonic()
        link.change({"rate": "9mbit"})
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
    post = b[cut + 3:-1]
    return {"emulation": emulation, "before_set_bps": before_bps, "after_set_bps": after_bps,
            "goodput_before_bps": 8 * sum(pre) / (len(pre) * w) if pre else 0.0,
            "goodput_after_bps": 8 * sum(post) / (len(post) * w) if post else 0.0,
            "change_took_s": changed["took_s"], "root_before": root_before,
            "root_after": root_after, "source": run["source"],
            "sink": {k: v for k, v in sink.items() if k != "buckets"}}


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
    link = make_link(NS_A, DEV_A)
    steps = [{"at": "0s", "delay": "5ms"}, {"at": "1s", "delay": "40ms"},
             {"at": "2s", "delay": "5ms"}]
    link.apply({"delay": "5ms"})
    interval = 0.002
    try:
        probe = net.ping_async(1600, interval)
        time.sleep(0.5)  # let the prober's python start and send a while at 5 ms
        stepper = link.stepper(steps)
        t0 = time.monotonic()
        if stepper is None:  # calibration: step by hand
            for at, d in ((1.0, "40ms"), (2.0, "5ms")):
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                link.change({"delay": d})
            report = None
        else:
            stepper.start()
            time.sleep(2.5)
            stepper.stop()
            report = getattr(stepper, "report", lambda: None)()
        ping = json.loads(probe.communicate(timeout=60)[0])
    finally:
        link.clear()
    seen = _transitions(ping, 0.0225)
    planned = [(1.0, True), (2.0, False)]
    got = []
    for at, up in planned:
        match = [t for t, s in seen if s == up and t0 + at - 0.2 <= t <= t0 + at + 0.2]
        got.append({"at_s": at, "observed_at_s": (match[0] - t0) if match else float("nan")})
    return {"steps": got, "probe_interval_s": interval, "stepper_report": report,
            "transitions": [(t - t0, s) for t, s in seen]}


def check_clear(net: Net) -> dict:
    link = make_link(NS_A, DEV_A)
    before = state_of(NS_A, DEV_A)
    emulation = link.apply({"rate": "5mbit", "delay": "20ms"})
    after_apply = state_of(NS_A, DEV_A)
    link.clear()
    return {"emulation": emulation, "before": before, "after_apply": after_apply,
            "after_clear": state_of(NS_A, DEV_A), "shown_after_clear": link.show()}


CHECKS = {"platform": check_platform, "delay": check_delay, "jitter": check_jitter,
          "loss": check_loss, "gemodel": check_gemodel, "rate": check_rate,
          "change": check_change, "trace": check_trace, "clear": check_clear}


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
