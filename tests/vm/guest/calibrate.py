"""What this boot of the guest can carry and how late its timers fire.

Owns: choosing the rates the rate checks set from the calibration that
``checks.check_calibration`` measures before the checks (unshaped TCP
capacity in each direction with the checks' own source/sink probes, the
unshaped RTT spread, timer lateness, and what late timers cost a reference
token bucket), and the ``Timers`` record taken
*beside* each timing check (the kernel's trace of its hrtimers plus a
sleeping probe), so a check is judged against the lateness of its own
moment, not of a quieter one. Leaves the namespaces and the checks to
``tests/vm/guest/checks.py``, reading the trace to ``guest/timers.py`` and
every judgement to ``tests/vm/judge.py``.

Why: under ``-accel tcg`` the guest's CPU is the host's, shared with whatever
else runs there. A busy host makes every guest timer fire late, and a token
bucket whose watchdog fires late loses the tokens that overflow it: with
one busy-loop on the host, 5 Mbit/s of tbf delivered 0.92 of its ideal
although the unshaped path carried 200+ Mbit/s. The old tests blamed the
shaper for that.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from tests.vm import judge
from tests.vm.guest.probe import SINK_BUCKET_S
from tests.vm.guest.timers import TimerTrace

# Rates are at most this share of the weaker direction's unshaped capacity:
# the sender then mostly waits on the shaper, so a host that halves the
# guest's speed still leaves it able to fill the shaped link.
CAPACITY_FRACTION = 0.35
# ... and at most the rate at which late timers would cost a token bucket
# this share of its sending time, scaled from what they cost a reference
# tbf at 2 Mbit/s with traffic flowing (the cost per packet is the time a
# fire is late beyond the bucket's slack, so the share grows with the packet
# rate: measured 1.2-6 % at 2 Mbit/s against 2.4-17.5 % at 5 Mbit/s in the
# same boots). The judge accounts for what the timers actually cost, up to
# half the time; this keeps well inside that. An idle guest's sleeps were no
# guide: their lateness predicted 0.3-58 % at 5 Mbit/s where 0.7-17.5 % was
# measured.
MAX_PREDICTED_TIMER_LOSS = 0.20
# Today's rates are the ceiling (the asymmetry test needs downlink > 2 x
# uplink measured; 5/2 = 2.5 leaves room for measurement error).
HIGH_BPS_CAP = 5_000_000
LOW_BPS_CAP = 2_000_000
ASYMMETRY = HIGH_BPS_CAP / LOW_BPS_CAP
ARRANGEMENT_SHARE = 0.8      # rate + delay check: 4 of 5 Mbit/s, as before
# The floor for the lower rate. Under it the check is not worth running:
# one segment is 24 ms on the wire at 0.5 Mbit/s, so an interval of 40
# segments is a second and a transfer needs 6+ s for a median of 5 intervals,
# and UE uplinks the testbed studies start well above it.
LOW_BPS_FLOOR = 500_000
RATE_STEP_BPS = 50_000       # rates are round numbers of kbit/s, as people write them

SLOW_START_S = 0.3          # the judged window starts this long after the first byte
TRANSFER_INTERVALS = 10

LATENESS_PROBE = [sys.executable, "-m", "tests.vm.guest.probe", "lateness"]


def choose_rates(capacity_bps: float, reference_loss: float, reference_bps: float = LOW_BPS_CAP) -> dict:
    """Rates for the rate checks from the calibration.

    ``high`` (downlink; the uplink after an in-place change) is the largest
    multiple of 50 kbit/s that is at most 5 Mbit/s, at most 35 % of the
    weaker direction's unshaped ``capacity_bps``, and at which late timers
    would cost a token bucket at most 20 % of its sending time, scaling
    ``reference_loss`` (the share they cost a tbf at ``reference_bps``) with
    the rate. ``low`` (uplink) = high / 2.5, today's asymmetry;
    ``arrangement`` (rate + delay) = 0.8 x high.

    ``too_low`` says why no meaningful rate check is possible (``low`` under
    the 0.5 Mbit/s floor); the checks then run at the floor anyway (their
    other properties hold at any rate) and the host-side rate assertions
    fail with that reason.
    """
    def step(bps: float) -> int:
        return int(bps // RATE_STEP_BPS) * RATE_STEP_BPS

    def timer_loss(bps: float) -> float:
        return reference_loss * bps / reference_bps

    by_capacity = step(min(HIGH_BPS_CAP, CAPACITY_FRACTION * capacity_bps))
    by_timers = step(MAX_PREDICTED_TIMER_LOSS / reference_loss * reference_bps) if reference_loss > 0 else by_capacity
    high = min(by_capacity, by_timers)
    low = step(min(LOW_BPS_CAP, high / ASYMMETRY))
    too_low = None
    if low < LOW_BPS_FLOOR:
        why = (f"{CAPACITY_FRACTION:.0%} of the guest's unshaped capacity {capacity_bps / 1e6:.2f} Mbit/s"
               if high == by_capacity else
               f"timers late enough to cost a {reference_bps / 1e6:g} Mbit/s token bucket "
               f"{reference_loss:.0%} of its sending time (over {MAX_PREDICTED_TIMER_LOSS:.0%} at any "
               f"higher rate)")
        too_low = (f"{why}; that leaves {low / 1e6:.2f} Mbit/s for the lower rate, under the "
                   f"{LOW_BPS_FLOOR / 1e6:.2f} Mbit/s floor worth testing")
        low, high = LOW_BPS_FLOOR, step(LOW_BPS_FLOOR * ASYMMETRY)
    return {"capacity_bps": capacity_bps, "capacity_fraction": CAPACITY_FRACTION, "by_capacity_bps": by_capacity,
            "reference_timer_loss": reference_loss, "reference_bps": reference_bps, "by_timers_bps": by_timers,
            "high_bps": high, "low_bps": low, "arrangement_bps": step(ARRANGEMENT_SHARE * high),
            "predicted_timer_loss": {"high": timer_loss(high), "low": timer_loss(low)}, "too_low": too_low}


def kbit(bps: int) -> str:
    """A rate as a profile writes it (``'1750kbit'``)."""
    return f"{bps // 1000}kbit"


def transfer_s(rate_bps: float, mtu: int) -> float:
    """How long to send at ``rate_bps``: 10 of the judge's intervals after slow
    start (twice the judge's minimum), and never less than the 3 s of old."""
    return max(3.0, SLOW_START_S + TRANSFER_INTERVALS * judge.interval_s(rate_bps, mtu, SINK_BUCKET_S))


def goodput_summary(sink: dict, skip_s: float = SLOW_START_S, interval_s: float = 0.1) -> dict:
    """Unshaped goodput: total over the transfer and the median of ``interval_s`` slices."""
    w = sink["bucket_s"]
    per = round(interval_s / w)
    body = sink["buckets"][round(skip_s / w):-1]
    slices = [8 * sum(body[i:i + per]) / interval_s for i in range(0, len(body) - per + 1, per)]
    total = 8 * sum(body) / (len(body) * w) if body else 0.0
    return {"total_bps": total, "median_bps": judge.median(slices) if slices else 0.0,
            "p10_bps": judge.quantile(slices, 0.1) if slices else 0.0, "slices": len(slices)}


class LatenessProbe:
    """A process sleeping 5-40 ms over and over (``probe lateness``) beside a check."""

    def __init__(self, max_seconds: float = 300.0) -> None:
        self.max_seconds = max_seconds
        self.result: dict | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> "LatenessProbe":
        self._proc = subprocess.Popen([*LATENESS_PROBE, str(self.max_seconds)],
                                      stdout=subprocess.PIPE, text=True)
        self.pid = self._proc.pid
        self._proc.stdout.readline()  # "ready": Python start-up takes ~1 s under TCG
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.send_signal(signal.SIGUSR1)
        out, _ = self._proc.communicate(timeout=30)
        self.result = json.loads(out)


class Timers:
    """Timer lateness beside one measurement: the kernel's trace of the
    shaper's watchdog fires on ``device`` (the shaped interface), and
    (``probe=True``) a process sleeping the checks' durations, seen from the
    kernel and from user space.

    Use as a context manager around the measurement, then ``record()``.
    """

    def __init__(self, device: str | None = None, probe: bool = True) -> None:
        self.trace = TimerTrace(device)
        self.probe = LatenessProbe() if probe else None

    def __enter__(self) -> "Timers":
        self.trace.__enter__()
        if self.probe:
            self.probe.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.probe:
            self.probe.__exit__(*exc)
        self.trace.__exit__(*exc)

    def record(self) -> dict:
        """``watchdog``: [[fired_at_s, late_s, hrtimer_late_s], ...] of the qdiscs'
        timers (``late_s`` effective, see ``guest/timers.py``); ``packets``:
        [[sent_at_s, late_bound_s, held_s], ...] per packet held; ``sleep_kernel`` /
        ``sleep_user``: lateness of the probe's sleeps in the kernel / as the process saw it."""
        out = {"watchdog": [[round(t, 6), round(late, 7), round(hr, 7)]
                            for t, late, hr, _ in self.trace.of("qdisc_watchdog")],
               "packets": [[round(x, 7) for x in p] for p in self.trace.packets],
               "lost_trace_events": self.trace.lost_events}
        if self.probe:
            mine = [late for _, late, _, pid in self.trace.of("hrtimer_wakeup") if pid == self.probe.pid]
            out["sleep_kernel"] = [round(x, 7) for x in mine]
            out["sleep_user"] = [round(x, 7) for x in self.probe.result["late_s"]]
        return out


def lateness_alone(seconds: float) -> dict:
    """Timer lateness with nothing else running: the calibration's own sample."""
    with Timers() as timers:
        time.sleep(seconds)
    return timers.record()
