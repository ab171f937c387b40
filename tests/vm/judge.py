"""Judging the VM tier's measurements against baselines measured in the same boot.

Owns: the expectations and tolerances of ``tests/vm/test_netem_vm.py`` as pure
functions over what the guest recorded (no VM, no root: unit-tested in
``tests/unit/test_vm_judge.py``), and the framing and token-bucket arithmetic
the guest also uses to choose its rates (``tests/vm/guest/checks.py``
measures what late timers cost a reference bucket with it), so one formula
both chooses and judges. Leaves measuring to ``tests/vm/guest/``.

The rule (ARCHITECTURE.md, "Test tiers"): no expectation is a number this
machine happened to produce. Each check is judged against

- what was set, made framing-aware (TCP payload per Ethernet frame), and
- what the host took from the guest *during that check*: the kernel's own
  record of how late it fired the shaper's timers (``guest/timers.py``) and
  the unshaped RTT measured interleaved with the shaped one,

with a tolerance that grows with the measured spread above a fixed floor,
and fails with the reason ("not meaningful") where that spread is too wide
for the check to tell a broken shaper from a busy host.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

ETH_HEADER_BYTES = 14        # what tbf/htb/netem count on a veth beyond the IP packet
DELAY_TOL_FLOOR_S = 0.002    # issue 3's delay tolerance: kept as the floor
DELAY_MEANINGFUL_SHARE = 0.25   # late timers adding 1/4 of the delay leave it untestable
JITTER_TOL_FLOOR = 0.10      # relative; netem's normal table and 4 ms probes are not exact
RATE_TOL_FLOOR = 0.03        # relative; framing, sink timing and the timer model's own error
RATE_MEANINGFUL = 0.10       # a rate tolerance above 10 % would pass a wrongly converted unit
# Timers this late leave too little of the rate to judge. The accounting
# held to +-2 % with 30 % of the time lost (loaded host, 5 Mbit/s).
RATE_MAX_TIMER_LOSS = 0.5
RATE_MIN_INTERVALS = 5
SEGMENTS_PER_INTERVAL = 40   # +-1 segment at an interval's edge is then 2.5 %
MC_DRAWS = 20000
NORMAL_IQR_PER_SIGMA = 1.3490


@dataclass
class Verdict:
    """A judgement: ``ok``, a message with the measured and calibrated numbers,
    and those numbers for the record."""

    ok: bool
    message: str
    numbers: dict = field(default_factory=dict)


# -- statistics -------------------------------------------------------------------

def quantile(xs: Sequence[float], p: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sample."""
    s = sorted(xs)
    k = (len(s) - 1) * p
    i = int(k)
    return s[i] + (s[min(i + 1, len(s) - 1)] - s[i]) * (k - i)


def median(xs: Sequence[float]) -> float:
    return quantile(xs, 0.5)


def iqr(xs: Sequence[float]) -> float:
    return quantile(xs, 0.75) - quantile(xs, 0.25)


def robust_sigma(xs: Sequence[float]) -> float:
    """The standard deviation a normal sample with this IQR would have: unlike
    the stdev, one 60 ms host stall among 400 probes does not move it."""
    return iqr(xs) / NORMAL_IQR_PER_SIGMA


def median_se(xs: Sequence[float]) -> float:
    """Standard error of the sample median (normal approximation, robust sigma)."""
    return 1.2533 * robust_sigma(xs) / math.sqrt(len(xs))


Sampler = Callable[[random.Random], float]


def empirical(xs: Sequence[float]) -> Sampler:
    xs = list(xs)
    return lambda rnd: xs[rnd.randrange(len(xs))]


def convolve(*parts: Sampler, n: int = MC_DRAWS, seed: int = 7) -> list[float]:
    """Monte Carlo sample of the sum of independent parts (seeded: the
    expectation of a given record never changes between runs)."""
    rnd = random.Random(seed)
    return [sum(part(rnd) for part in parts) for _ in range(n)]


def bootstrap_se(xs: Sequence[float], stat: Callable[[Sequence[float]], float], n: int = 300,
                 seed: int = 11, size: int | None = None) -> float:
    """Standard error of ``stat`` over samples of ``size`` (default: as many as
    ``xs``) drawn from ``xs`` with replacement."""
    rnd = random.Random(seed)
    xs = list(xs)
    size = size or len(xs)
    vals = [stat([xs[rnd.randrange(len(xs))] for _ in range(size)]) for _ in range(n)]
    mean = sum(vals) / n
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))


def ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


# -- framing and the token bucket ----------------------------------------------------

def wire_bytes(mtu: int) -> int:
    """Bytes a full-size segment costs the rate limiter (IP packet + Ethernet header)."""
    return mtu + ETH_HEADER_BYTES


def ideal_goodput_bps(rate_bps: float, mss: int, mtu: int) -> float:
    """TCP payload bits/s a link of ``rate_bps`` carries at full-size segments:
    ``mss`` payload bytes (the socket's TCP_MAXSEG: options such as timestamps
    already taken off, 1448 at MTU 1500) per ``mtu + 14`` bytes on the wire."""
    return rate_bps * mss / wire_bytes(mtu)


def bucket_slack_s(burst_bytes: int, rate_bps: float, mtu: int) -> float:
    """How late the token bucket's timer may fire before tokens are lost.

    tbf/htb keep at most ``burst`` bytes of tokens; when the head packet
    lacks tokens they arm a watchdog for the moment it has them. Fired
    ``late`` seconds after that, the bucket would hold one packet plus
    ``late`` of tokens; whatever exceeds ``burst`` is discarded, i.e. the
    link loses ``max(0, late - slack)`` of sending time per late fire.
    """
    return (burst_bytes - wire_bytes(mtu)) / (rate_bps / 8)


def lost_time_s(fires: Sequence[Sequence[float]], slack_s: float, start_s: float, end_s: float) -> float:
    """Sending time a token bucket lost within [start_s, end_s) to late watchdog fires
    (``[fired_at_s, late_s, ...]`` each; a loss spans the ``late - slack`` before the fire)."""
    lost = 0.0
    for fire in fires:
        at, late = fire[0], fire[1]
        gap = late - slack_s
        if gap > 0:
            lost += max(0.0, min(at, end_s) - max(at - gap, start_s))
    return lost


# -- rate --------------------------------------------------------------------------

def interval_s(rate_bps: float, mtu: int, bucket_s: float) -> float:
    """Per-interval goodput over intervals of at least 0.2 s and 40 segments."""
    want = max(0.2, SEGMENTS_PER_INTERVAL * wire_bytes(mtu) * 8 / rate_bps)
    return math.ceil(want / bucket_s - 1e-9) * bucket_s


def judge_rate(*, label: str, sink: dict, start_s: float, end_s: float, set_bps: float, mss: int, mtu: int,
               burst_bytes: int | None, watchdog: Sequence[Sequence[float]]) -> Verdict:
    """Goodput of one shaped transfer against the framing-aware ideal.

    The window [start_s, end_s) (monotonic) is cut into intervals; each
    interval's goodput is compared with the ideal less the sending time the
    kernel's late timers cost the bucket in that interval (``lost_time_s``).
    The verdict uses the *median over intervals* of goodput / that ideal:
    a host stall that the timer record does not explain (the sink process
    descheduled, so bytes land in the next interval) moves one or two
    intervals, never the median, while a wrong rate moves every interval.
    The total over the window is kept beside it and must not exceed the
    ideal: load can only take rate away, so a total above the rate is the
    shaper's. Lower bound: ideal less timer losses; upper: the ideal itself.
    ``burst_bytes`` None: no token bucket (netem's own rate paces each packet
    from the last one's time, so a late timer delays it but costs no rate).
    """
    w = sink["bucket_s"]
    span = interval_s(set_bps, mtu, w)
    per = round(span / w)
    ideal = ideal_goodput_bps(set_bps, mss, mtu)
    slack = math.inf if burst_bytes is None else bucket_slack_s(burst_bytes, set_bps, mtu)
    k0 = math.ceil((start_s - sink["first"]) / w - 1e-9)
    k_end = min(int((end_s - sink["first"]) / w), len(sink["buckets"]) - 1)  # last bucket is partial
    rows = []
    for k in range(k0, k_end - per + 1, per):
        a = sink["first"] + k * w
        got = 8 * sum(sink["buckets"][k:k + per]) / span
        lost = lost_time_s(watchdog, slack, a, a + span)
        rows.append((got, lost))
    nums = {"set_bps": set_bps, "ideal_bps": ideal, "mss": mss, "mtu": mtu, "interval_s": span,
            "intervals": len(rows), "bucket_slack_s": slack}
    if len(rows) < RATE_MIN_INTERVALS:
        return Verdict(False, f"{label}: only {len(rows)} intervals of {span:.2f} s in the transfer "
                              f"(need {RATE_MIN_INTERVALS}): not meaningful", nums)
    total = sum(g for g, _ in rows) / len(rows)
    lost_share = sum(lost for _, lost in rows) / (len(rows) * span)
    judged = [g / (ideal * (1 - lost / span)) for g, lost in rows if lost / span < 0.5]
    raw = [g / ideal for g, _ in rows]
    lo, hi = median(judged) if judged else 0.0, median(raw)
    tol = max(RATE_TOL_FLOOR, 3 * median_se(judged)) if len(judged) > 1 else 1.0
    nums.update(total_bps=total, total_ratio=total / ideal, timer_loss=lost_share,
                median_ratio_timer_aware=lo, median_ratio=hi, tolerance=tol,
                per_interval_bps=[round(g) for g, _ in rows])
    said = (f"{label}: set {set_bps / 1e6:.3f} Mbit/s, framing-aware ideal {ideal / 1e6:.3f} Mbit/s "
            f"(MSS {mss} / {wire_bytes(mtu)} wire bytes); goodput median over {len(rows)} x {span:.2f} s "
            f"intervals {hi * ideal / 1e6:.3f} Mbit/s = {hi:.3f} x ideal, {lo:.3f} x the ideal less "
            f"late-timer losses ({lost_share:.1%} of the time, bucket slack {ms(slack)}, "
            f"{len(watchdog)} watchdog fires); total {total / 1e6:.3f} Mbit/s = {total / ideal:.3f}; "
            f"tolerance {tol:.3f}")
    if lost_share > RATE_MAX_TIMER_LOSS or tol > RATE_MEANINGFUL:
        return Verdict(False, f"not meaningful on this host: {said}", nums)
    ok = lo >= 1 - tol and hi <= 1 + tol and total / ideal <= 1 + tol
    return Verdict(ok, said, nums)


# -- delay and jitter -----------------------------------------------------------------

def judge_delay(*, label: str, shaped: Sequence[float], baseline: Sequence[float], lateness: Sequence[float],
                set_delay_s: float) -> Verdict:
    """Median RTT added by the shaper against the set delay plus late timers.

    Medians, because one host stall of tens of ms among hundreds of probes
    moved the mean by 2.8 ms. Accepted: from the set delay (a timer never
    fires early) to the set delay plus what the packets' lateness adds to
    the median of the unshaped RTT (``median(baseline + lateness) -
    median(baseline)``, Monte Carlo; ``lateness`` is an upper bound per
    packet, see ``guest/timers.py``), each end widened by 3 standard errors
    of the measured difference of medians, never by less than 2 ms. Not
    meaningful when late timers alone could add a quarter of the delay.
    """
    added = median(shaped) - median(baseline)
    late = lateness if lateness else [0.0]
    extra = median(convolve(empirical(baseline), empirical(late))) - median(baseline)
    se = math.hypot(median_se(shaped), median_se(baseline))
    tol = max(DELAY_TOL_FLOOR_S, 3 * se)
    lo, hi = set_delay_s - tol, set_delay_s + extra + tol
    nums = {"set_delay_s": set_delay_s, "added_s": added, "lateness_median_extra_s": extra, "tolerance_s": tol,
            "median_se_s": se, "baseline_median_s": median(baseline), "lateness_median_s": median(late),
            "lateness_p90_s": quantile(late, 0.9), "samples": [len(shaped), len(baseline), len(lateness)]}
    said = (f"{label}: set {ms(set_delay_s)}; median RTT rose by {ms(added)} (shaped median "
            f"{ms(median(shaped))}, unshaped {ms(median(baseline))}, n = {len(shaped)}/{len(baseline)}, "
            f"se {ms(se)}); late timers add up to {ms(extra)} to the median (packets late by median "
            f"{ms(median(late))}, p90 {ms(quantile(late, 0.9))}, n = {len(lateness)}); accepted {ms(lo)} .. "
            f"{ms(hi)} (tolerance {ms(tol)})")
    if extra > DELAY_MEANINGFUL_SHARE * set_delay_s:
        return Verdict(False, f"not meaningful on this host (late timers alone could add over "
                              f"{DELAY_MEANINGFUL_SHARE:.0%} of the delay): {said}", nums)
    return Verdict(lo <= added <= hi, said, nums)


def netem_jitter(distribution: str, jitter_s: float) -> Sampler:
    """What netem adds around the delay: its normal table scaled by the jitter
    (the table the shaper sends, ``testbed.link.distributions``), or uniform on
    [-jitter, +jitter) when no distribution is set."""
    if distribution == "uniform":
        return lambda rnd: rnd.uniform(-jitter_s, jitter_s)
    from testbed.link.distributions import DIST_SCALE, table

    values = [v * jitter_s / DIST_SCALE for v in table(distribution)]
    return lambda rnd: values[rnd.randrange(len(values))]


def judge_jitter(*, label: str, shaped: Sequence[float], baseline: Sequence[float], lateness: Sequence[float],
                 jitter_s: float, distribution: str) -> Verdict:
    """The spread of the shaped RTT (IQR) against netem's distribution
    convolved with the unshaped RTT and, for the upper end, the packets'
    lateness (Monte Carlo). The IQR, not the stdev: 1 % of probes delayed by
    a host stall added 3.5 ms to an 8 ms stdev.

    Tolerance: 3 standard errors of an IQR of this many probes drawn from
    the expected distribution (a bootstrap under the hypothesis that the
    shaper is right: resampling the measured probes themselves gave errors
    that varied by half from run to run), never below 10 %. Not meaningful
    when the band accepted would also accept the other distribution (normal
    for uniform, uniform for normal) of the same jitter: then it could not
    catch the shaper sending the wrong one.
    """
    got = iqr(shaped)
    late = empirical(lateness if lateness else [0.0])

    def band(dist: str) -> tuple[float, float, list[float]]:
        draw = netem_jitter(dist, jitter_s)
        wide = convolve(empirical(baseline), draw, late)
        return iqr(convolve(empirical(baseline), draw)), iqr(wide), wide

    lo, hi, pool = band(distribution)
    se = bootstrap_se(pool, iqr, size=len(shaped))
    tol = max(JITTER_TOL_FLOOR, 3 * se / lo)
    accept = (lo * (1 - tol), hi * (1 + tol))
    other = "normal" if distribution == "uniform" else "uniform"
    other_lo, other_hi, _ = band(other)
    nums = {"jitter_s": jitter_s, "distribution": distribution, "iqr_s": got, "expected_iqr_s": [lo, hi],
            "accepted_iqr_s": accept, "other_expected_iqr_s": [other_lo, other_hi], "iqr_se_s": se,
            "tolerance": tol, "samples": len(shaped)}
    said = (f"{label}: {distribution} jitter {ms(jitter_s)}: shaped RTT IQR {ms(got)} (n = {len(shaped)}); "
            f"expected {ms(lo)} (netem's table with the unshaped RTT's spread, IQR {ms(iqr(baseline))}) .. "
            f"{ms(hi)} (and late timers, packets late by median {ms(median(lateness or [0.0]))}, p90 "
            f"{ms(quantile(lateness or [0.0], 0.9))}); accepted {ms(accept[0])} .. {ms(accept[1])} "
            f"(tolerance {tol:.0%}: 3 x se {ms(se)}); {other} would give {ms(other_lo)} .. {ms(other_hi)}")
    if accept[0] <= other_hi and other_lo <= accept[1]:
        return Verdict(False, f"not meaningful on this host (the band also accepts {other} jitter): {said}", nums)
    return Verdict(accept[0] <= got <= accept[1], said, nums)


# -- trace steps -----------------------------------------------------------------------

STEP_HOLD_S = 0.1       # a new state counts once it holds for this long ...
STEP_HOLD_SHARE = 0.9   # ... in this share of the probes sent meanwhile
STEP_START_TOL_S = 0.010   # the stepper's target: a change starts within 10 ms of its time
STEP_VISIBLE_S = 0.15      # the old delay must show in the probes this long before a change


def transitions(sent: Sequence[float], rtt: Sequence[float | None], threshold_s: float) -> list[tuple[float, bool]]:
    """Send times where the RTT crosses ``threshold_s`` and the new side holds.

    "Holds" means 90 % of the probes sent in the next 100 ms are on the new
    side: a host stall inflates every RTT in flight for its length (p99 of
    36 ms on a loaded host), which three consecutive probes at 2 ms did not
    outlast; it can never make an RTT shorter.
    """
    states = [(t, r > threshold_s) for t, r in zip(sent, rtt) if r is not None]
    out: list[tuple[float, bool]] = []
    cur = states[0][1] if states else None
    for i, (t, state) in enumerate(states):
        if state == cur:
            continue
        window = [s for u, s in states[i:] if u <= t + STEP_HOLD_S]
        if len(window) >= 5 and sum(s == state for s in window) >= STEP_HOLD_SHARE * len(window):
            out.append((t, state))
            cur = state
    return out


def judge_step(*, label: str, due_s: float, call: Sequence[float], claimed_error_s: float, seen_s: float | None,
               probe_gap_s: float, woke_late_s: float, rtt_late_s: float, max_cost_s: float,
               free_s: float | None = None, old_visible: float = 1.0, up: bool = True) -> Verdict:
    """One trace step: the stepper's change started on time, its error report
    is when the change call completed, and the packets saw the step during the call.

    "On time" under TCG, where one ``Shaper.change`` costs tens of ms of
    emulated Python: the call *starts* no later than 10 ms after the step's
    time, or after the stepper's previous change ended (``free_s``: on a
    loaded host one change took a second, and the thread cannot start the
    next before), beyond how late user-space timers woke beside it
    (``woke_late_s``, p99 of the probe's sleeps); and no earlier than one
    change's cost before it (the stepper starts early by what changes have
    cost). Packets place
    the step to within the gap between probes around it, plus how late the
    kernel's timers were (a stall can hold back the first probe on the new
    side).

    A host stall can only make an RTT longer. So for a step *up* (``up``)
    it can hide the old delay and fake the new one: if fewer than half the
    probes sent just before the change show the old delay
    (``old_visible``), or probes show the new delay before the change began,
    the step is "not meaningful on this host". For a step down neither can
    come from the host, and both are failures.
    """
    start, end = call
    start_late, completed = start - due_s, end - due_s
    busy = max(0.0, (free_s if free_s is not None else due_s) - due_s)
    nums = {"start_late_s": start_late, "busy_until_s": busy, "completed_late_s": completed,
            "claimed_error_s": claimed_error_s,
            "seen_late_s": None if seen_s is None else seen_s - due_s, "woke_late_s": woke_late_s}
    said = (f"{label}: change started {ms(start_late)} after the step's time"
            f"{f' (the previous change ended {ms(busy)} after it)' if busy else ''} and completed "
            f"{ms(completed)} after it (stepper says {ms(claimed_error_s)}); packets saw it "
            f"{'never' if seen_s is None else ms(seen_s - due_s)}; user-space timers beside it late by p99 "
            f"{ms(woke_late_s)}, kernel p99 {ms(rtt_late_s)}, probe gap {ms(probe_gap_s)}, "
            f"one change costs up to {ms(max_cost_s)}")
    hidden = old_visible < 0.5
    if up and (hidden or (seen_s is not None and seen_s < start - 0.005)):
        why = (f"only {old_visible:.0%} of the probes sent in the {STEP_VISIBLE_S * 1e3:.0f} ms before the "
               f"change show the old delay" if hidden else "probes showed the new delay before the change began")
        return Verdict(False, f"not meaningful on this host ({why}: the host held them back): {said}", nums)
    problems = ["the old delay was not in place before the change"] if hidden else []
    if not -max_cost_s - STEP_START_TOL_S <= start_late <= busy + STEP_START_TOL_S + woke_late_s:
        problems.append(f"start not within -{ms(max_cost_s + STEP_START_TOL_S)} .. "
                        f"+{ms(busy + STEP_START_TOL_S + woke_late_s)}")
    # The stepper reads its clock just outside the timed call: a thread
    # preempted in between reports later, by up to how long threads waited.
    if not -0.002 <= claimed_error_s - completed <= 0.002 + woke_late_s:
        problems.append("the stepper's error report is not the change call's completion")
    slack = probe_gap_s + 0.005 + rtt_late_s
    if seen_s is None or not start - 0.005 <= seen_s <= end + slack:
        problems.append(f"packets did not see the step between the call's start - 5 ms and its end + {ms(slack)}")
    return Verdict(not problems, said + ("" if not problems else " -- " + "; ".join(problems)), nums)
