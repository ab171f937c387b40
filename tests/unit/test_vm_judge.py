"""The VM tier's judge, calibration and trace reading on made-up records (no VM, no root).

Each judgement must pass what a right shaper on a busy host produces and
fail what a broken shaper produces, whatever the host did.
"""

import random

import pytest

from tests.vm import judge
from tests.vm.guest import calibrate, timers

pytestmark = pytest.mark.unit

MTU, MSS = 1500, 1448


def test_framing_aware_ideal_goodput():
    assert judge.wire_bytes(MTU) == 1514
    assert judge.ideal_goodput_bps(2e6, MSS, MTU) == pytest.approx(2e6 * 1448 / 1514)


def test_late_timer_costs_the_bucket_what_overflows_it():
    rate = 2e6
    burst = 1500 + int(rate / 8 * 0.001)           # MTU + 1 ms of tokens
    slack = judge.bucket_slack_s(burst, rate, MTU)
    assert slack == pytest.approx(0.001 - 14 / (rate / 8), abs=1e-6)
    fires = [[1.0, slack + 0.004], [2.0, slack / 2]]   # 4 ms beyond the slack, then on time
    assert judge.lost_time_s(fires, slack, 0.0, 10.0) == pytest.approx(0.004)
    assert judge.lost_time_s(fires, slack, 0.998, 10.0) == pytest.approx(0.002)   # split at the window edge


def sink_at(goodput_bps: float, seconds: float = 4.0, bucket_s: float = 0.01, stall: tuple | None = None) -> dict:
    """A sink timeline receiving ``goodput_bps`` (optionally nothing during ``stall``)."""
    per = goodput_bps / 8 * bucket_s
    buckets = []
    for k in range(int(seconds / bucket_s)):
        t = k * bucket_s
        buckets.append(0 if stall and stall[0] <= t < stall[1] else int(per))
    return {"first": 100.0, "last": 100.0 + seconds, "bucket_s": bucket_s, "buckets": buckets}


def rate_verdict(sink: dict, set_bps: float = 2e6, watchdog=(), burst: int | None = 1600) -> judge.Verdict:
    return judge.judge_rate(label="t", sink=sink, start_s=sink["first"] + 0.3, end_s=sink["last"],
                            set_bps=set_bps, mss=MSS, mtu=MTU, burst_bytes=burst, watchdog=list(watchdog))


def test_rate_right_shaper_passes_and_wrong_rates_fail():
    ideal = judge.ideal_goodput_bps(2e6, MSS, MTU)
    assert rate_verdict(sink_at(ideal)).ok
    assert not rate_verdict(sink_at(0.9 * ideal)).ok          # e.g. overhead counted twice
    assert not rate_verdict(sink_at(2e6)).ok                  # the link's bytes counted as payload (+4.6 %)


def test_rate_losses_explained_by_late_timers_pass_unexplained_ones_fail():
    ideal = judge.ideal_goodput_bps(2e6, MSS, MTU)
    # The bucket lost 20 % of every interval to watchdog fires 1.2 ms late every 6 ms.
    slack = judge.bucket_slack_s(1600, 2e6, MTU)
    fires = [[100.0 + i * 0.006, slack + 0.0012] for i in range(700)]
    assert rate_verdict(sink_at(0.8 * ideal), watchdog=fires).ok
    assert not rate_verdict(sink_at(0.8 * ideal)).ok
    # netem's own rate has no bucket: late timers cost it nothing.
    assert not rate_verdict(sink_at(0.8 * ideal), watchdog=fires, burst=None).ok


def test_rate_median_ignores_a_host_stall_the_timers_do_not_explain():
    ideal = judge.ideal_goodput_bps(2e6, MSS, MTU)
    verdict = rate_verdict(sink_at(ideal, stall=(1.0, 1.3)))
    assert verdict.ok, verdict.message
    assert verdict.numbers["total_ratio"] < 0.95


def test_rate_too_short_or_too_late_is_not_meaningful():
    ideal = judge.ideal_goodput_bps(2e6, MSS, MTU)
    short = rate_verdict(sink_at(ideal, seconds=1.0))
    assert not short.ok and "not meaningful" in short.message
    slack = judge.bucket_slack_s(1600, 2e6, MTU)
    fires = [[100.0 + i * 0.006, slack + 0.0036] for i in range(700)]   # 60 % lost
    late = rate_verdict(sink_at(0.4 * ideal), watchdog=fires)
    assert not late.ok and "not meaningful" in late.message


def rtts(rnd: random.Random, n: int, base_s: float = 0.0003) -> list[float]:
    return [base_s + abs(rnd.gauss(0, 0.00005)) for _ in range(n)]


def test_delay_judged_on_medians_against_set_plus_lateness():
    rnd = random.Random(1)
    base = rtts(rnd, 400)
    shaped = [r + 0.030 for r in rtts(rnd, 400)]
    assert judge.judge_delay(label="t", shaped=shaped, baseline=base, lateness=[], set_delay_s=0.030).ok
    # 5 % of probes hit by a 60 ms stall move the mean by 3 ms, not the median.
    stalled = [r + (0.060 if i % 20 == 0 else 0.0) for i, r in enumerate(shaped)]
    assert judge.judge_delay(label="t", shaped=stalled, baseline=base, lateness=[], set_delay_s=0.030).ok
    # Delay not applied, or applied twice: fails.
    assert not judge.judge_delay(label="t", shaped=base, baseline=base, lateness=[], set_delay_s=0.030).ok
    assert not judge.judge_delay(label="t", shaped=[r + 0.060 for r in base], baseline=base, lateness=[],
                                 set_delay_s=0.030).ok
    # 3 ms more than set: only late timers that late explain it.
    late = [r + 0.033 for r in rtts(rnd, 400)]
    assert not judge.judge_delay(label="t", shaped=late, baseline=base, lateness=[0.0001] * 100,
                                 set_delay_s=0.030).ok
    assert judge.judge_delay(label="t", shaped=late, baseline=base, lateness=[0.003] * 100,
                             set_delay_s=0.030).ok
    hopeless = judge.judge_delay(label="t", shaped=late, baseline=base, lateness=[0.010] * 100,
                                 set_delay_s=0.030)
    assert not hopeless.ok and "not meaningful" in hopeless.message


def netem_sample(rnd: random.Random, distribution: str, n: int) -> list[float]:
    draw = judge.netem_jitter(distribution, 0.008)
    return [0.0403 + draw(rnd) for _ in range(n)]


def test_jitter_tells_normal_from_uniform():
    rnd = random.Random(2)
    base = rtts(rnd, 800)
    normal, uniform = netem_sample(rnd, "normal", 800), netem_sample(rnd, "uniform", 800)
    kw = {"label": "t", "baseline": base, "lateness": [0.0002] * 200, "jitter_s": 0.008}
    assert judge.judge_jitter(shaped=normal, distribution="normal", **kw).ok
    assert judge.judge_jitter(shaped=uniform, distribution="uniform", **kw).ok
    assert not judge.judge_jitter(shaped=uniform, distribution="normal", **kw).ok
    assert not judge.judge_jitter(shaped=normal, distribution="uniform", **kw).ok
    no_jitter = [0.0403 + r for r in rtts(rnd, 800)]
    assert not judge.judge_jitter(shaped=no_jitter, distribution="normal", **kw).ok


def test_step_transitions_outlast_host_stalls():
    sent = [i * 0.002 for i in range(1000)]
    rtt = [0.045 if t >= 1.0 else 0.005 for t in sent]
    for i in range(200, 215):                  # a 30 ms stall inflates 15 probes at 0.4 s
        rtt[i] = 0.035
    assert judge.transitions(sent, rtt, 0.0225) == [(1.0, True)]


def test_step_judged_on_when_the_change_started():
    kw = {"label": "t", "due_s": 10.0, "probe_gap_s": 0.002, "woke_late_s": 0.003, "rtt_late_s": 0.001,
          "max_cost_s": 0.08}
    assert judge.judge_step(call=(9.95, 10.01), claimed_error_s=0.0101, seen_s=9.99, **kw).ok
    late_start = judge.judge_step(call=(10.02, 10.08), claimed_error_s=0.08, seen_s=10.05, **kw)
    assert not late_start.ok and "start" in late_start.message
    unseen = judge.judge_step(call=(9.95, 10.01), claimed_error_s=0.01, seen_s=10.2, **kw)
    assert not unseen.ok and "packets" in unseen.message
    # Late because the previous change only ended then: the thread could not start earlier.
    assert judge.judge_step(call=(10.16, 10.27), claimed_error_s=0.27, seen_s=10.24, free_s=10.159, **kw).ok
    starved = judge.judge_step(call=(9.95, 10.01), claimed_error_s=0.01, seen_s=9.99, old_visible=0.2, **kw)
    assert not starved.ok and "not meaningful" in starved.message
    faked = judge.judge_step(call=(9.95, 10.01), claimed_error_s=0.01, seen_s=9.93, **kw)
    assert not faked.ok and "not meaningful" in faked.message
    # Stepping down, a stall can neither hide 40 ms nor fake 5 ms: both are failures.
    for kw_down in ({"old_visible": 0.2, "seen_s": 9.99}, {"seen_s": 9.93}):
        down = judge.judge_step(call=(9.95, 10.01), claimed_error_s=0.01, up=False, **{**kw, **kw_down})
        assert not down.ok and "not meaningful" not in down.message


#: Lines as the kernel prints them (ftrace), so longer than the style's limit.
TRACE = """\
# tracer: nop
      python3-212     [000] D..2.   112.234046: hrtimer_start: hrtimer=0000000085576b24 function=qdisc_watchdog expires=112236084970 softexpires=112236084970 mode=ABS|PINNED was_armed=0
      python3-212     [000] b....   112.234050: net_dev_queue: dev=tbvA skbaddr=00000000aaaa len=1514
      python3-212     [000] d.h..   112.236166: hrtimer_expire_entry: hrtimer=0000000085576b24 function=qdisc_watchdog now=112236164140
  ksoftirqd/0-13      [000] ..s1.   112.236900: net_dev_start_xmit: dev=tbvA queue_mapping=0 skbaddr=00000000aaaa vlan_tagged=0 len=1514
  ksoftirqd/0-13      [000] ..s1.   112.236950: net_dev_start_xmit: dev=tbvB queue_mapping=0 skbaddr=00000000bbbb vlan_tagged=0 len=66
      python3-300     [001] d..2.   112.240000: hrtimer_start: hrtimer=00000000cccc function=hrtimer_wakeup expires=112250000000 softexpires=112250000000 mode=ABS was_armed=0
       <idle>-0       [001] d.h1.   112.250300: hrtimer_expire_entry: hrtimer=00000000cccc function=hrtimer_wakeup now=112250300000
"""  # noqa: E501


def test_trace_gives_effective_watchdog_lateness_and_held_packets():
    fires, packets = timers.parse(TRACE.splitlines(), "tbvA")
    (fire,) = fires["qdisc_watchdog"]
    assert fire[1] == pytest.approx(112.236900 - 112.236084970)      # expiry -> transmit on tbvA
    assert fire[2] == pytest.approx((112236164140 - 112236084970) / 1e9)   # the hrtimer alone
    (wake,) = fires["hrtimer_wakeup"]
    assert wake[1] == pytest.approx(0.0003) and wake[3] == 300
    (packet,) = packets
    assert packet[1] == pytest.approx(112.236900 - 112.236084970) and packet[2] == pytest.approx(0.00285)


def test_rates_follow_capacity_and_timers_down_to_a_floor():
    quiet = calibrate.choose_rates(400e6, 0.02)
    assert (quiet["high_bps"], quiet["low_bps"], quiet["arrangement_bps"], quiet["too_low"]) == \
        (5_000_000, 2_000_000, 4_000_000, None)
    slow = calibrate.choose_rates(6e6, 0.02)            # 35 % of 6 Mbit/s
    assert slow["high_bps"] == 2_100_000 and slow["low_bps"] == 800_000 and slow["too_low"] is None
    late = calibrate.choose_rates(400e6, 0.16)           # 16 % at 2 Mbit/s: 20 % at 2.5
    assert late["high_bps"] == 2_500_000 and late["predicted_timer_loss"]["high"] == pytest.approx(0.20)
    for hopeless in (calibrate.choose_rates(2e6, 0.02), calibrate.choose_rates(400e6, 0.4)):
        assert hopeless["too_low"] and "floor" in hopeless["too_low"] and hopeless["low_bps"] == 500_000
