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


@pytest.mark.parametrize("name", ["jitter", "jitter_uniform"])
def test_jitter(check, name):
    got = check(name)
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
    shaped = check("gemodel")["shaped"]
    random_burst = check("loss")["shaped"]["mean_burst"]
    assert shaped["loss_pct"] > 0, "no loss at all"
    assert shaped["mean_burst"] > 1.5, (
        f"mean burst {shaped['mean_burst']:.2f} packets over {shaped['bursts']} bursts "
        f"(10 % random loss measured the same way: {random_burst:.2f})")
    # Random loss, measured the same way, must not look bursty: the burstiness
    # comes from the model, not from how bursts are counted.
    assert random_burst < 1.5


def test_rate_and_asymmetry(check):
    got = check("rate")
    for direction in ("uplink", "downlink"):
        ratio = got[f"{direction}_goodput_bps"] / got[f"{direction}_set_bps"]
        assert 0.90 <= ratio <= 1.10, f"{direction}: goodput / set rate = {ratio:.3f}"
    assert got["uplink_set_bps"] != got["downlink_set_bps"]
    up, down = got["uplink_goodput_bps"], got["downlink_goodput_bps"]
    assert down > 2 * up, f"downlink {down / 1e6:.2f} vs uplink {up / 1e6:.2f} Mbit/s"


def test_rate_with_delay_per_arrangement(check):
    """Rate + delay: the default arrangement delivers the rate and the delay;
    every arrangement's numbers are printed for choosing the default."""
    got = check("arrangements")
    rows = got["arrangements"]
    print("\n[vm] rate 4 Mbit/s + delay 20 ms: " + "; ".join(
        f"{name} ({r['emulation']}): goodput/rate {r['goodput_bps'] / got['set_rate_bps']:.3f}, "
        f"idle RTT {r['idle_rtt_s'] * 1e3:.1f} ms" for name, r in rows.items()))
    default = rows["auto"]
    assert default["errors"] == [None, None]
    ratio = default["goodput_bps"] / got["set_rate_bps"]
    assert 0.90 <= ratio <= 1.10, f"default arrangement {default['emulation']}: goodput/rate {ratio:.3f}"
    # 2 ms tolerance on top of the unshaped RTT (under 1 ms here: see test_delay).
    assert 0 <= default["idle_rtt_s"] - got["set_delay_s"] <= 0.003, (
        f"idle RTT {default['idle_rtt_s'] * 1e3:.2f} ms with 20 ms set")


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
    """The stepper's error report is what the packets see, and each step starts on time.

    Under TCG one ``Shaper.change`` costs 50-90 ms of emulated Python (measured
    in the guest as ``main_thread_change_s``; natively it is a few ms), so a
    change cannot *complete* within 10 ms of its time here. What this tier
    asserts is that it *starts* within 10 ms: completion lateness at most one
    change's cost + 10 ms. The 10 ms completion target itself is asserted by
    the integration tier on the native kernel.
    """
    got = check("trace")
    report, errors = got["stepper_report"], got["stepper_errors_s"]
    cost = sorted(got["main_thread_change_s"])[len(got["main_thread_change_s"]) // 2]
    late = [None if s["observed_at_s"] is None else s["observed_at_s"] - s["at_s"] for s in got["steps"]]
    print(f"\n[vm] trace: stepper errors {[round(e * 1e3, 1) for e in errors]} ms, packets saw "
          f"{[None if x is None else round(x * 1e3, 1) for x in late]} ms; one Shaper.change costs "
          f"{cost * 1e3:.1f} ms under TCG")
    assert report["failure"] is None and len(errors) == len(got["steps"])
    for step, seen, claimed in zip(got["steps"], late, errors):
        assert seen is not None, f"no step seen near {step['at_s']} s; transitions {got['transitions']}"
        # The stepper times a change's *completion*; the kernel takes it
        # somewhere during the call (which costs up to max(change) here), and
        # probes only place it to within one probe interval.
        slack = got["probe_interval_s"] + 0.005
        assert claimed - max(got["main_thread_change_s"]) - slack <= seen <= claimed + slack, (
            f"step at {step['at_s']} s: packets saw it {seen * 1e3:.1f} ms late, "
            f"the stepper says it completed {claimed * 1e3:.1f} ms late")
    worst_cost = max(got["main_thread_change_s"])
    assert max(abs(e) for e in errors) <= worst_cost + 0.010, (
        f"step errors {[round(e * 1e3, 1) for e in errors]} ms: a change started more than 10 ms "
        f"late (one change costs up to {worst_cost * 1e3:.1f} ms under TCG)")


def test_clear_restores_interface(check):
    got = check("clear")
    assert got["after_apply"] != got["before"], "apply changed nothing"
    assert got["after_clear"] == got["before"], (
        f"before {got['before']}\nafter clear {got['after_clear']}")
    assert got["shown_after_clear_ours"] is False


def test_hung_guest_is_killed_at_deadline(vm_image):
    """A guest that has not powered off by the deadline is killed and reported.

    Booting alone takes longer than 3 s under TCG, so this guest "hangs"."""
    from tests.vm import qemu

    run = qemu.boot(vm_image[0], deadline_s=3)
    assert run.timed_out and run.returncode is None
    assert run.results is None
    assert run.seconds < 3 + 10, "QEMU was not killed promptly"
