"""The project's Shaper on a real sch_netem kernel, judged by measurement.

One QEMU boot (``conftest.vm_run``) runs every check in
``tests/vm/guest/checks.py``; each test here asserts one property on what the
guest measured. Timing properties are judged by ``tests/vm/judge.py`` against
baselines measured in the same boot (the calibration, the unshaped RTT
interleaved with the shaped one, and the kernel's record of how late it fired
the shaper's timers during that check), never against what this machine
happened to do once. Failures print the measured and calibrated numbers.
"""

from __future__ import annotations

import pytest

from tests.vm import judge

pytestmark = pytest.mark.vm

MS = 1e-3
# Fewer packets held by the qdisc than this (e.g. netem not installed at all)
# and the probe's own sleeps, seen from the kernel, stand for the lateness.
MIN_HELD_PACKETS = 50


def lateness(timers: dict) -> list[float]:
    """How late the host let the shaper's timers release packets during a
    check: per packet the qdisc held, an upper bound (``guest/timers.py``);
    if the shaper held too few, the probe's sleeps as the kernel saw them."""
    held = [packet[1] for packet in timers["packets"]]
    return held if len(held) >= MIN_HELD_PACKETS else timers.get("sleep_kernel", [])


def assert_verdict(verdict: judge.Verdict) -> None:
    assert verdict.ok, verdict.message
    print(f"\n[vm] {verdict.message}")


def test_calibration(check):
    """What this boot carries and how late its timers fire; the rates chosen from it."""
    got = check("calibration")
    cap, rates, late = got["capacity"], got["rates"], got["lateness"]
    print(f"\n[vm] calibration: unshaped capacity uplink {cap['uplink']['total_bps'] / 1e6:.1f} / downlink "
          f"{cap['downlink']['total_bps'] / 1e6:.1f} Mbit/s (MSS {cap['uplink']['mss']}, MTU {got['mtu']}); "
          f"unshaped RTT median {got['rtt']['median_s'] / MS:.3f} ms, IQR "
          f"{judge.iqr(got['rtt_samples']) / MS:.3f} ms; 5-40 ms sleeps late by median "
          f"{judge.median(late['sleep_kernel']) / MS:.3f} ms in the kernel, "
          f"{judge.median(late['sleep_user']) / MS:.3f} ms in user space (p90 "
          f"{judge.quantile(late['sleep_kernel'], 0.9) / MS:.3f} / {judge.quantile(late['sleep_user'], 0.9) / MS:.3f});"
          f" late timers cost a {rates['reference_bps'] / 1e6:g} Mbit/s bucket "
          f"{rates['reference_timer_loss']:.1%} of its time; rates: high {rates['high_bps'] / 1e6:.2f}, low "
          f"{rates['low_bps'] / 1e6:.2f}, rate+delay {rates['arrangement_bps'] / 1e6:.2f} Mbit/s "
          f"(capacity allows {rates['by_capacity_bps'] / 1e6:.2f}, timers {rates['by_timers_bps'] / 1e6:.2f})")
    for direction in ("uplink", "downlink"):
        assert cap[direction]["errors"] == [None, None], f"{direction} calibration transfer: {cap[direction]}"
        assert cap[direction]["total_bps"] > 0 and cap[direction]["mss"] > 0
    assert late["sleep_kernel"] and late["sleep_user"], "the lateness probe's sleeps were not traced"
    assert got["reference"]["errors"] == [None, None], f"reference bucket transfer: {got['reference']}"


def test_kernel_has_netem_and_probes_work(check):
    got = check("platform")
    assert_verdict(judge.judge_delay(label="plain tc netem", shaped=got["shaped_rtt"],
                                     baseline=got["baseline_rtt"], lateness=lateness(got["timers"]),
                                     set_delay_s=got["set_delay_s"]))


def test_delay(check):
    got = check("delay")
    assert got["emulation"] and "netem" in got["emulation"]
    assert_verdict(judge.judge_delay(label="delay", shaped=got["shaped_rtt"], baseline=got["baseline_rtt"],
                                     lateness=lateness(got["timers"]), set_delay_s=got["set_delay_s"]))


@pytest.mark.parametrize("name", ["jitter", "jitter_uniform"])
def test_jitter(check, name):
    got = check(name)
    late = lateness(got["timers"])
    assert_verdict(judge.judge_jitter(label=name, shaped=got["shaped_rtt"], baseline=got["baseline_rtt"],
                                      lateness=late, jitter_s=got["set_jitter_s"],
                                      distribution=got["distribution"]))
    # netem's distributions are symmetric about the delay: the median still is the delay.
    assert_verdict(judge.judge_delay(label=f"{name} (centre)", shaped=got["shaped_rtt"],
                                     baseline=got["baseline_rtt"], lateness=late,
                                     set_delay_s=got["set_delay_s"]))


def test_random_loss(check):
    got = check("loss")["shaped"]
    assert got["count"] >= 2000
    assert 7.0 <= got["loss_pct"] <= 13.0, f"10 % loss set, {got['loss_pct']:.2f} % measured"


def test_udp_delivery_counts_netem_loss_and_zero_fills(check):
    """The data path's UDP delivery (nodes/udp.py) under real netem loss: every lost
    datagram is counted, holes are zero, what arrived is intact, a forged datagram is
    dropped, and no frame waits past its deadline. Judged against the same boot's
    unshaped run of the same traffic (what the guest loses by itself)."""
    got = check("udp_loss")
    base, shaped = got["baseline"], got["shaped"]
    for run in (base, shaped):
        per = run["packets_per_frame"]
        assert run["packets_sent"] == len(run["frames"]) * per
        assert [f["frame"] for f in run["frames"]] == list(range(len(run["frames"])))
        assert all(f["holes_zero"] and f["intact"] for f in run["frames"]), run["frames"]
        assert max(f["waited_s"] for f in run["frames"]) <= got["deadline_s"] + 1.0
        assert run["rejected"] >= 1, "the forged datagram was accepted"
        assert all(f["received"] + f["lost"] == per for f in run["frames"])
    n = base["packets_sent"]
    q = sum(f["lost"] for f in base["frames"]) / n
    assert q <= 0.02, f"not meaningful on this host: the guest lost {100 * q:.2f} % of datagrams unshaped"
    p = 1 - (1 - got["set_loss_pct"] / 100) * (1 - q)
    measured = sum(f["lost"] for f in shaped["frames"]) / shaped["packets_sent"]
    sigma = (p * (1 - p) / shaped["packets_sent"]) ** 0.5
    assert abs(measured - p) <= 4 * sigma, (
        f"{got['set_loss_pct']} % netem loss (+{100 * q:.2f} % unshaped): {100 * measured:.2f} % of "
        f"{shaped['packets_sent']} datagrams counted lost, expected {100 * p:.2f} ± {400 * sigma:.2f} %")
    assert sum(1 for f in shaped["frames"] if f["lost"]) >= len(shaped["frames"]) // 2


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


def judge_transfer(label: str, run: dict, *, set_bps: int, burst_bytes: int | None, mtu: int,
                   start_s: float | None = None, end_s: float | None = None) -> judge.Verdict:
    """A shaped transfer's goodput from its sink timeline and timer record."""
    sink = run["sink"]
    return judge.judge_rate(
        label=label, sink=sink, set_bps=set_bps, burst_bytes=burst_bytes, mtu=mtu, mss=run["source"]["mss"],
        start_s=sink["first"] + 0.3 if start_s is None else start_s,
        end_s=sink["last"] if end_s is None else end_s, watchdog=run["timers"]["watchdog"])


def test_rate_and_asymmetry(check):
    got = check("rate")
    assert got["too_low"] is None, got["too_low"]
    verdicts = {}
    for direction in ("uplink", "downlink"):
        run = got[direction]
        assert [run["source"]["error"], run["sink"]["error"]] == [None, None], f"{direction}: {run['source']}"
        verdicts[direction] = judge_transfer(direction, run, set_bps=run["set_bps"],
                                             burst_bytes=run["burst_bytes"], mtu=got["mtu"])
        assert_verdict(verdicts[direction])
    up, down = got["uplink"]["set_bps"], got["downlink"]["set_bps"]
    assert up < down
    # What each direction's shaper delivered, the host's timer losses accounted
    # (the faster direction loses more to them: packets wait on timers more often).
    up_bps, down_bps = (verdicts[d].numbers["median_ratio_timer_aware"] * verdicts[d].numbers["ideal_bps"]
                        for d in ("uplink", "downlink"))
    assert down_bps > 2 * up_bps, (f"downlink {down_bps / 1e6:.2f} vs uplink {up_bps / 1e6:.2f} Mbit/s, "
                                   f"timer losses accounted (set {down / 1e6:.2f} / {up / 1e6:.2f})")


def test_rate_with_delay_per_arrangement(check):
    """Rate + delay: the default arrangement delivers the rate and the delay;
    every arrangement's numbers are printed for choosing the default."""
    got = check("arrangements")
    baseline = check("calibration")["rtt_samples"]
    rows, verdicts = got["arrangements"], {}
    for name, r in rows.items():
        verdicts[name] = (
            judge_transfer(f"{name} ({r['emulation']})", r, set_bps=got["set_rate_bps"],
                           burst_bytes=r["burst_bytes"], mtu=got["mtu"]),
            judge.judge_delay(label=f"{name} idle RTT", shaped=r["idle_rtt"], baseline=baseline,
                              lateness=lateness(r["idle_timers"]), set_delay_s=got["set_delay_s"]))
    print(f"\n[vm] rate {got['set_rate_bps'] / 1e6:.2f} Mbit/s + delay 20 ms: " + "; ".join(
        f"{name} ({r['emulation']}): goodput/ideal {verdicts[name][0].numbers.get('median_ratio', 0):.3f} "
        f"({verdicts[name][0].numbers.get('median_ratio_timer_aware', 0):.3f} less timer losses), idle RTT "
        f"median {judge.median(r['idle_rtt']) / MS:.2f} ms" for name, r in rows.items()))
    assert got["too_low"] is None, got["too_low"]
    default = rows["auto"]
    assert default["errors"] == [None, None]
    for verdict in verdicts["auto"]:
        assert_verdict(verdict)


def test_change_in_place_keeps_tcp_alive(check):
    got = check("change")
    assert got["source"]["error"] is None and got["sink"]["error"] is None
    assert got["sink"]["bytes"] == got["source"]["bytes"], "bytes lost across the change"
    assert got["root_before"] == got["root_after"], "root qdisc was replaced, not changed"
    assert got["too_low"] is None, got["too_low"]
    sink, at = got["sink"], got["changed_at"]
    for label, part, start, end in (
            ("before the change", got["before"], sink["first"] + 0.3, at),
            ("after the change", got["after"], at + got["change_took_s"] + got["settle_s"], sink["last"])):
        assert_verdict(judge_transfer(label, got, set_bps=part["set_bps"], burst_bytes=part["burst_bytes"],
                                      mtu=got["mtu"], start_s=start, end_s=end))


def test_trace_steps_on_time(check):
    """Each step's change starts on time, the stepper reports what the change
    took, and the packets saw the step while the change was being made.

    Under TCG one ``Shaper.change`` costs 50-90 ms of emulated Python (natively
    a few ms; more on a loaded host), so a change cannot *complete* within
    10 ms of its time here. What this tier asserts is that it *starts* within
    10 ms beyond what the host adds (``judge.judge_step``). The 10 ms
    completion target itself is asserted by the integration tier on the
    native kernel.
    """
    got = check("trace")
    report, errors, calls = got["stepper_report"], got["stepper_errors_s"], got["change_calls"]
    assert report["failure"] is None and len(errors) == len(got["steps"]), report
    # The stepper's thread rehearses before the first step; the steps are the last calls.
    first = len(calls) - len(got["steps"])
    assert first >= 0, f"{len(calls)} change calls for {len(got['steps'])} steps"
    woke_late = judge.quantile(got["timers"]["sleep_user"], 0.99)
    rtt_late = judge.quantile(got["timers"]["sleep_kernel"] + lateness(got["timers"]), 0.99)
    max_cost = max(b - a for a, b in calls)
    seen = judge.transitions(got["sent"], got["rtt"], 0.0225)
    print(f"\n[vm] trace: transitions seen at {[(round(t - got['t0'], 3), s) for t, s in seen]} s; "
          f"change calls cost {[round((b - a) * 1e3, 1) for a, b in calls]} ms")
    for i, (step, claimed) in enumerate(zip(got["steps"], errors)):
        call, free = calls[first + i], calls[first + i - 1][1] if first + i > 0 else None
        due = got["t0"] + step["at_s"]
        up = step["delay"] == "40ms"
        match = [t for t, s in seen if s == up and call[0] - 0.1 <= t <= call[1] + 0.3]
        near = [t for t in got["sent"] if call[0] - 0.05 <= t <= call[1] + 0.1]
        gap = max([b - a for a, b in zip(near, near[1:])] + [got["probe_interval_s"]])
        before = [r for t, r in zip(got["sent"], got["rtt"])
                  if r is not None and call[0] - judge.STEP_VISIBLE_S <= t < call[0]]
        old_visible = sum((r > 0.0225) != up for r in before) / len(before) if before else 0.0
        assert_verdict(judge.judge_step(label=f"step at {step['at_s']} s to {step['delay']}", due_s=due,
                                        call=call, claimed_error_s=claimed, seen_s=match[0] if match else None,
                                        probe_gap_s=gap, woke_late_s=woke_late, rtt_late_s=rtt_late,
                                        max_cost_s=max_cost, free_s=free, old_visible=old_visible, up=up))


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
