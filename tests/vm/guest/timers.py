"""How late the guest kernel let its timers take effect, read from its own trace.

Owns: switching kernel trace events on around a measurement (hrtimer start
and expiry, and transmits on the shaped device) and turning them into
per-fire lateness, grouped by the timer's function. Leaves what a lateness
means for a check to the judge (``tests/vm/judge.py``).

Why the kernel's view and not only a sleeping process's: under TCG a
Python process that sleeps 5-40 ms wakes ~0.25 ms late on a quiet host just
for being Python under emulation, and its tail is several times the
kernel's, so user-space lateness badly overstates how late the shaper's own
timers are (measured: median 0.30 ms user vs 0.07 ms kernel, p90 3.1 vs
1.4 ms).

What "late" means for the shaper: netem, tbf and htb all wait on a
``qdisc_watchdog`` hrtimer; its callback (hard irq) only schedules the
NET_TX softirq, which under load is deferred to ksoftirqd and waits for a
CPU. So a watchdog's *effective* lateness is from its programmed expiry to
the first transmit on the shaped device at or after it: on a loaded host
the hrtimer alone fired 0.08 ms late (median) while packets left 0.22 ms
late, and only the latter predicted tbf's delivered rate (1.000 x vs 0.989 x).
Expiry and transmit times are both CLOCK_MONOTONIC (the hrtimer base, and
``trace_clock`` set to ``mono``), the clock ``time.monotonic()`` reads. It
is the time the host took from the shaper whatever expiry the shaper asked
for, so a shaper that asks for the wrong time is still caught.

Per fire is not per packet: one deferral of the softirq holds back every
packet that falls due during it, so on a loaded host packets are later than
fires (a size-biased sample). For each packet the qdisc held, the time from
the latest watchdog expiry at or before its transmit to that transmit is an
upper bound on its lateness (the watchdog is always armed for the earliest
due packet, so every packet a run releases fell due at or after that
expiry), exact for the packet the timer was armed for; the judge uses it
for the upper end of the delay and jitter it accepts.
"""

from __future__ import annotations

import bisect
import re
import subprocess
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
TIMER_EVENTS = ("timer/hrtimer_start", "timer/hrtimer_expire_entry")
NET_EVENTS = ("net/net_dev_queue", "net/net_dev_start_xmit")
HELD_S = 0.001   # a packet the qdisc kept this long waited on a timer
# The timers the checks care about: the qdiscs' watchdog (netem delay, tbf /
# htb token refill) and a sleeping task's wake-up (the lateness probe).
KEPT = ("qdisc_watchdog", "hrtimer_wakeup")
_TIMER = re.compile(
    r"^\s*.*?-(?P<pid>\d+)\s+\[\d+\].*?(?P<event>hrtimer_start|hrtimer_expire_entry): "
    r"hrtimer=(?P<ptr>\S+) function=(?P<fn>\S+) (?:expires=(?P<expires>\d+)|now=(?P<now>\d+))")
_NET = re.compile(r"\s(?P<ts>\d+\.\d+): (?P<event>net_dev_queue|net_dev_start_xmit): dev=(?P<dev>\S+) "
                  r".*?skbaddr=(?P<skb>\S+)")


def _write(name: str, value: str) -> None:
    (TRACEFS / name).write_text(value)


class TimerTrace:
    """Lateness of the hrtimers that fire while the block runs.

    ``device``: the shaped interface (in any namespace; names are unique
    here) whose transmits give the watchdog's effective lateness; None keeps
    the hrtimer's own lateness. After the block, ``fires[function]`` holds
    ``[fired_at_s, late_s, hrtimer_late_s, starter_pid]`` per fire,
    ``packets`` ``[sent_at_s, late_bound_s, held_s]`` per packet the qdisc on
    ``device`` held, and ``lost_events`` the ring buffer's overruns (should be 0).
    """

    def __init__(self, device: str | None = None, buffer_kb: int = 16384) -> None:
        self.device = device
        self.buffer_kb = buffer_kb
        self.fires: dict[str, list[list]] = {}
        self.packets: list[list[float]] = []
        self.lost_events = 0

    def _events(self) -> tuple[str, ...]:
        return TIMER_EVENTS + (NET_EVENTS if self.device else ())

    def __enter__(self) -> "TimerTrace":
        if not (TRACEFS / "trace").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
        _write("tracing_on", "0")
        _write("trace_clock", "mono")
        _write("buffer_size_kb", str(self.buffer_kb))
        _write("trace", "")
        for event in NET_EVENTS if self.device else ():
            _write(f"events/{event}/filter", f'name == "{self.device}"')
        for event in self._events():
            _write(f"events/{event}/enable", "1")
        _write("tracing_on", "1")
        return self

    def __exit__(self, *exc: object) -> None:
        _write("tracing_on", "0")
        for event in self._events():
            _write(f"events/{event}/enable", "0")
        self.lost_events = sum(
            int(m.group(1)) for cpu in (TRACEFS / "per_cpu").glob("cpu*")
            for m in [re.search(r"^overrun: (\d+)", (cpu / "stats").read_text(), re.M)] if m)
        with open(TRACEFS / "trace") as fh:
            self.fires, self.packets = parse(fh, self.device)
        _write("trace", "")

    def of(self, function: str) -> list[list]:
        return self.fires.get(function, [])


def parse(lines, device: str | None = None) -> tuple[dict[str, list[list]], list[list[float]]]:
    """Trace text -> (fires, packets) as ``TimerTrace`` holds them.

    A start is matched to the next expiry of the same hrtimer; a timer that
    is restarted before it fires (tbf does that on every enqueue) keeps only
    its last expiry, which is the one that fired. ``late_s`` of a
    ``qdisc_watchdog`` is its effective lateness when ``device`` is given
    (first transmit on it at or after the expiry; a fire with no later
    transmit is left out), else the hrtimer's.
    """
    pending: dict[str, tuple[int, int]] = {}
    fired: list[tuple[str, int, int, int]] = []      # (function, expires_ns, now_ns, pid)
    queued: dict[str, float] = {}
    held: list[tuple[float, float]] = []             # (queued_at_s, sent_at_s)
    xmits: list[float] = []
    for line in lines:
        if device and "net_dev_" in line:
            m = _NET.search(line)
            if m and m.group("dev") == device:
                at = float(m.group("ts"))
                if m.group("event") == "net_dev_queue":
                    queued[m.group("skb")] = at
                else:
                    xmits.append(at)
                    if m.group("skb") in queued:
                        held.append((queued.pop(m.group("skb")), at))
            continue
        m = _TIMER.match(line)
        if not m or m.group("fn") not in KEPT:
            continue
        if m.group("event") == "hrtimer_start":
            pending[m.group("ptr")] = (int(m.group("expires")), int(m.group("pid")))
            continue
        started = pending.pop(m.group("ptr"), None)
        if started is not None:
            fired.append((m.group("fn"), started[0], int(m.group("now")), started[1]))
    xmits.sort()
    fires: dict[str, list[list]] = {fn: [] for fn in KEPT}
    for fn, expires, now, pid in fired:
        late = hr_late = (now - expires) / 1e9
        if device and fn == "qdisc_watchdog":
            i = bisect.bisect_left(xmits, expires / 1e9)
            if i == len(xmits):
                continue
            late = xmits[i] - expires / 1e9
        fires[fn].append([now / 1e9, late, hr_late, pid])
    return fires, _held_lateness(held, sorted(e / 1e9 for fn, e, _, _ in fired if fn == "qdisc_watchdog"))


def _held_lateness(held: list[tuple[float, float]], expiries: list[float]) -> list[list[float]]:
    """``[sent_at_s, late_bound_s, held_s]`` for each packet held ``HELD_S`` or more
    and released after a watchdog expiry that came after it was queued."""
    out = []
    for queued, sent in held:
        i = bisect.bisect_right(expiries, sent) - 1
        if sent - queued >= HELD_S and i >= 0 and expiries[i] >= queued:
            out.append([sent, sent - expiries[i], sent - queued])
    return out
