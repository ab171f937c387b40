"""The project's Shaper on a real sch_netem kernel, judged by measurement.

One QEMU boot (``conftest.vm_run``) runs every check in
``tests/vm/guest/checks.py``; each test here asserts one property on what the
guest measured, with the tolerances issue 3 sets. Failures print the measured
numbers, not just "False".
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.vm

MS = 1e-3


def test_kernel_has_netem_and_probes_work(check):
    got = check("platform")
    added = got["netem_40ms"]["mean_s"] - got["baseline"]["mean_s"]
    assert abs(added - got["set_delay_s"]) <= 2 * MS, f"plain tc netem delay added {added / MS:.2f} ms"


def test_delay(check):
    got = check("delay")
    added = got["shaped"]["mean_s"] - got["baseline"]["mean_s"]
    assert got["emulation"] and "netem" in got["emulation"]
    assert abs(added - got["set_delay_s"]) <= 2 * MS, (
        f"set {got['set_delay_s'] / MS:.1f} ms, mean RTT rose by {added / MS:.2f} ms "
        f"(baseline {got['baseline']['mean_s'] / MS:.2f} ms)")


def test_jitter(check):
    got = check("jitter")
    # The unshaped path has its own spread (TCG timing); variances add.
    shaped, base = got["shaped"]["stdev_s"], got["baseline"]["stdev_s"]
    spread = math.sqrt(max(shaped ** 2 - base ** 2, 0.0))
    expected = got["expected_stdev_s"]
    assert abs(spread - expected) <= 0.25 * expected, (
        f"{got['distribution']} jitter {got['set_jitter_s'] / MS:.1f} ms: expected stdev "
        f"{expected / MS:.2f} ms, measured {spread / MS:.2f} ms (raw {shaped / MS:.2f}, "
        f"baseline {base / MS:.2f})")


def test_random_loss(check):
    got = check("loss")["shaped"]
    assert got["count"] >= 2000
    assert 7.0 <= got["loss_pct"] <= 13.0, f"10 % loss set, {got['loss_pct']:.2f} % measured"


def test_gilbert_elliott_loss_is_bursty(check):
    got = check("gemodel")
    shaped = got["shaped"]
    assert shaped["loss_pct"] > 0, "no loss at all"
    assert shaped["mean_burst"] > 1.5, (
        f"mean burst {shaped['mean_burst']:.2f} packets over {shaped['bursts']} bursts "
        f"(random loss of the same rate gives ~{got['random_mean_burst']:.2f})")
    # Random loss at a similar rate, measured the same way, must not look bursty.
    assert got["random_mean_burst"] < shaped["mean_burst"]


def test_rate_and_asymmetry(check):
    got = check("rate")
    for direction in ("uplink", "downlink"):
        ratio = got[f"{direction}_goodput_bps"] / got[f"{direction}_set_bps"]
        assert 0.90 <= ratio <= 1.10, f"{direction}: goodput / set rate = {ratio:.3f}"
    assert got["uplink_set_bps"] != got["downlink_set_bps"]
    up, down = got["uplink_goodput_bps"], got["downlink_goodput_bps"]
    assert down > 1.5 * up, f"downlink {down / 1e6:.2f} vs uplink {up / 1e6:.2f} Mbit/s"


def test_change_in_place_keeps_tcp_alive(check):
    got = check("change")
    assert got["source"]["error"] is None and got["sink"]["error"] is None
    assert got["sink"]["bytes"] == got["source"]["bytes"], "bytes lost across the change"
    assert got["root_before"] == got["root_after"], "root qdisc was replaced, not changed"
    before, after = got["goodput_before_bps"], got["goodput_after_bps"]
    assert abs(after / got["after_set_bps"] - 1) <= 0.10, (
        f"after the change: {after / 1e6:.2f} Mbit/s, set {got['after_set_bps'] / 1e6:.2f}")
    assert abs(before / got["before_set_bps"] - 1) <= 0.10, (
        f"before the change: {before / 1e6:.2f} Mbit/s, set {got['before_set_bps'] / 1e6:.2f}")


def test_trace_steps_on_time(check):
    got = check("trace")
    assert len(got["steps"]) >= 2
    for step in got["steps"]:
        # A packet sent after the step sees the new delay; probes go every
        # probe_interval_s, so observation adds at most one interval.
        late = step["observed_at_s"] - step["at_s"]
        assert -got["probe_interval_s"] <= late <= 0.010 + got["probe_interval_s"], (
            f"step at {step['at_s']:.3f} s observed at {step['observed_at_s']:.3f} s")
    if got.get("stepper_max_error_s") is not None:
        assert got["stepper_max_error_s"] <= 0.010


def test_clear_restores_interface(check):
    got = check("clear")
    assert got["after_apply"] != got["before"], "apply changed nothing"
    assert got["after_clear"] == got["before"], (
        f"before {got['before']}\nafter clear {got['after_clear']}")
    assert got["shown_after_clear"] in (None, {}, []) or not got["shown_after_clear"].get("qdiscs")
