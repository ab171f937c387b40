"""One pure function from a profile direction to kernel parameters.

Owns: the rules between fields ("loss correlation needs loss", "jitter needs
delay", ...), the choice of qdisc arrangement (which root qdisc limits the
rate, whether a netem child is needed), unit conversion to what the kernel
takes (bytes/s, nanoseconds, probabilities scaled to 2^32-1) and queue sizing
(netem's ``limit`` from the bandwidth-delay product). No I/O, no root: this is
what unit tests pin down. Talking to the kernel is ``testbed.link.netlink``'s
job; deciding when is ``testbed.link.shaper``'s.

Arrangements (``arrangement=``):

* ``auto`` (default) = ``tbf``, or ``htb`` when the direction sets a rate
  ``overhead`` (pyroute2's tbf cannot carry one).
* ``tbf``: root tbf holds the rate; its one child is a pfifo (rate only) or a
  netem (anything else: delay, loss, ...). Measured here (bench/link_bench.py):
  TCP transfer time ÷ ideal stays within 0.999-1.047 from 100 kB to 4 MB at 1-100
  Mbit/s. tbf splits a GSO super-packet (up to 64 kB, what TCP hands the
  qdisc on a warm connection) into MTU frames before charging its bucket;
  htb and netem's rate charge it whole, so with htb a part under ~57 kB sent
  on the agents' long-lived connection after an idle moment arrived in
  0.15-0.2 ms at any rate (5 Mbit/s: ideal 91 ms; tbf 93 ms).
* ``htb``: root htb with one class (rate = ceil), same leaves.
* ``netem``: one root netem doing delay, loss *and* rate (netem's own ``rate``).

tbf/htb + netem child is the default for rate + delay because (1) one root for
every profile makes every change between configurations in place (a rate
change and at most a leaf graft, never a new root), (2) the rate limiter
splits GSO super-packets (tbf) or counts their bytes (htb) while netem's rate
times whole skbs, and (3) the delayed packets wait in netem *after* the
bottleneck queue, as on a radio link. Which of tbf+netem and netem-alone
measures better on a netem kernel is checked by the VM tier; override with
``arrangement="netem"`` (``--arrangement netem``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from testbed.link.profile import MTU_BYTES, U32_MAX, Direction, check, needs_netem

NETEM_DEFAULT_LIMIT = 1000     # netem's own default (packets)
RATE_QUEUE_PACKETS = 1000      # the leaf queue behind a rate limiter (= veth/ethernet txqueuelen)
ASSUMED_LINE_RATE_BPS = 10**9  # sizes netem's queue when a direction sets no rate
PASS_THROUGH_BPS = 32 * 10**9  # limiter rate when a direction sets no rate (netem does the rest); fits 32-bit bytes/s
ARRANGEMENTS = ("auto", "htb", "tbf", "netem")

def u32(pct: float) -> int:
    """A percentage as netem's probability: 0 % → 0, 100 % → 2^32-1."""
    return min(U32_MAX, int(round(pct / 100.0 * U32_MAX)))



@dataclass(frozen=True)
class NetemOptions:
    """netem's options as the kernel takes them (``struct tc_netem_qopt`` and its attributes)."""

    latency_ns: int = 0
    jitter_ns: int = 0
    limit: int = NETEM_DEFAULT_LIMIT
    loss: int = 0                 # random loss, u32 probability
    gap: int = 0
    duplicate: int = 0
    delay_corr: int = 0
    loss_corr: int = 0
    dup_corr: int = 0
    reorder_prob: int = 0
    reorder_corr: int = 0
    corrupt_prob: int = 0
    corrupt_corr: int = 0
    rate_Bps: int | None = None   # only when netem itself limits the rate
    packet_overhead: int = 0
    gemodel: tuple[int, int, int, int] | None = None            # p, r, h, k1 (kernel fields)
    gimodel: tuple[int, int, int, int, int] | None = None       # p13, p31, p32, p14, p23
    slot: tuple[int, int, int, int] | None = None               # min_ns, max_ns, packets, bytes
    distribution: str | None = None                              # None/uniform: no table


@dataclass(frozen=True)
class KernelParams:
    """What the shaper puts on the interface for one direction."""

    root: str                      # "htb" | "tbf" | "netem"
    emulation: str                 # what results report: "htb", "tbf", "netem", "htb+netem", "tbf+netem"
    rate_Bps: int | None           # the rate limiter's rate in bytes/s (None: no limiter)
    overhead_bytes: int
    burst_bytes: int
    queue_packets: int             # leaf pfifo / tbf queue behind the rate limiter
    netem: NetemOptions | None

    @property
    def needs_netem(self) -> bool:
        return self.netem is not None


def bdp_packets(rate_bps: float, seconds: float) -> int:
    """Full-size packets in flight at ``rate_bps`` over ``seconds``."""
    return math.ceil(rate_bps * seconds / 8 / MTU_BYTES)


def netem_limit(d: Direction) -> int:
    """netem's queue (packets). netem holds every delayed packet in its queue,
    so the default 1000 tail-drops at high rate × delay (1 Gbit/s × 20 ms is
    1667 packets); size it to twice the bandwidth-delay product, never below
    netem's default. An explicit ``limit`` wins."""
    if d.limit_packets is not None:
        return d.limit_packets
    hold = d.delay_s + d.jitter_s + (d.slot.max_delay_s or d.slot.min_delay_s if d.slot else 0.0)
    # netem's limit is u32: 34 Gbit/s x 1 h of delay would not fit (and nothing queues that much anyway)
    return min(U32_MAX, max(NETEM_DEFAULT_LIMIT, 2 * bdp_packets(d.rate_bps or ASSUMED_LINE_RATE_BPS, hold)))


TIMER_SLACK_S = 0.00025   # default token-bucket slack: what tbf's hrtimer needs on a bare-metal-like kernel
MAX_TIMER_SLACK_S = 0.004  # 1/HZ at HZ=250: tc-tbf(8)'s "burst >= rate/HZ" on the coarsest common kernel


def burst_bytes(rate_Bps: int, timer_slack_s: float = TIMER_SLACK_S) -> int:
    """Token bucket depth: one MTU plus ``timer_slack_s`` worth of the rate.

    The bucket must hold a full packet *plus* the tokens that accrue while the
    qdisc's watchdog timer fires late: tokens beyond the bucket are lost, so a
    bucket of one MTU under-delivers whenever the timer is late by more than
    (burst - MTU) / rate. Measured: with one MTU at 5 Mbit/s a TCG VM (HZ=250)
    delivered 0.78-0.90 of the rate with zero drops. A deeper bucket lets the
    start of every transfer through above the rate (with tc's usual 1 ms, a
    100 kB transfer at 100 Mbit/s took 0.89 x its ideal time here; with 0.25
    ms 0.985 x), so the slack is the smallest the kernel's timers need:
    ``testbed.link.shaper.timer_slack()`` measures it (0.25 ms floor, 4 ms cap).
    """
    slack = min(max(timer_slack_s, 0.0), MAX_TIMER_SLACK_S)
    return int(rate_Bps * slack) + MTU_BYTES


def _netem_options(d: Direction, with_rate: bool) -> NetemOptions:
    loss = d.loss
    gemodel = gimodel = None
    if loss is not None and loss.gemodel is not None:
        g = loss.gemodel
        # kernel (sch_netem.c loss_gilb_ell): good→bad if rnd < p; bad→good if rnd < r;
        # lost in bad if rnd > h; lost in good if rnd < k1. So h = 1 - (1-h), k1 = 1-k,
        # which is exactly what iproute2 6.1 sends for `loss gemodel p r 1-h 1-k`
        # (captured: 5% 30% 100% 0% -> h = 0, k1 = 0; unit-tested byte for byte).
        gemodel = (u32(g.p_pct), u32(g.r_pct), u32(100.0 - g.one_minus_h_pct), u32(g.one_minus_k_pct))
    if loss is not None and loss.state is not None:
        s = loss.state
        p31 = 100.0 - s.p13_pct if s.p31_pct is None else s.p31_pct
        gimodel = (u32(s.p13_pct), u32(p31), u32(s.p32_pct), u32(s.p14_pct), u32(s.p23_pct))
    slot = None
    if d.slot is not None:
        lo = int(round(d.slot.min_delay_s * 1e9))
        hi = int(round((d.slot.max_delay_s if d.slot.max_delay_s is not None else d.slot.min_delay_s) * 1e9))
        slot = (lo, hi, d.slot.packets, d.slot.bytes_)
    reorder = d.reorder
    return NetemOptions(
        latency_ns=int(round(d.delay_s * 1e9)),
        jitter_ns=int(round(d.jitter_s * 1e9)),
        limit=netem_limit(d),
        loss=u32(loss.random_pct) if loss is not None and loss.random_pct is not None else 0,
        loss_corr=u32(loss.correlation_pct) if loss is not None else 0,
        gap=(reorder.gap or 1) if reorder is not None and reorder.percent_pct else 0,  # tc: gap defaults to 1
        duplicate=u32(d.duplicate.percent_pct) if d.duplicate else 0,
        dup_corr=u32(d.duplicate.correlation_pct) if d.duplicate else 0,
        delay_corr=u32(d.delay_correlation_pct),
        reorder_prob=u32(reorder.percent_pct) if reorder else 0,
        reorder_corr=u32(reorder.correlation_pct) if reorder else 0,
        corrupt_prob=u32(d.corrupt.percent_pct) if d.corrupt else 0,
        corrupt_corr=u32(d.corrupt.correlation_pct) if d.corrupt else 0,
        rate_Bps=(d.rate_bps // 8) if with_rate and d.rate_bps else None,
        packet_overhead=d.overhead_bytes if with_rate else 0,
        gemodel=gemodel,
        gimodel=gimodel,
        slot=slot,
        distribution=None if d.distribution in (None, "uniform") else d.distribution,
    )


def kernel_params(d: Direction, arrangement: str = "auto", timer_slack_s: float = TIMER_SLACK_S) -> KernelParams:
    """Turn one direction into what the shaper installs.

    ``timer_slack_s`` sizes the rate limiter's bucket (``burst_bytes``).

    Raises:
        ValueError: a rule between fields is broken (message names the field),
            or ``arrangement`` is unknown / cannot express ``d``.
    """
    problems = check(d)
    if problems:
        loc, message = problems[0]
        raise ValueError(f"{'.'.join(loc)}: {message}")
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement must be one of {', '.join(ARRANGEMENTS)}, not {arrangement!r}")
    root = arrangement
    if arrangement == "auto":
        root = "htb" if d.overhead_bytes else "tbf"
    if root == "tbf" and d.overhead_bytes:
        raise ValueError("overhead: the tbf arrangement cannot count a per-packet overhead; use htb (or auto)")
    netem_needed = needs_netem(d)
    queue = d.limit_packets or RATE_QUEUE_PACKETS
    if root == "netem":
        return KernelParams(root="netem", emulation="netem", rate_Bps=None, overhead_bytes=0, burst_bytes=0,
                            queue_packets=queue, netem=_netem_options(d, with_rate=True))
    rate_Bps = d.rate_bps // 8 if d.rate_bps else None
    if rate_Bps is None and not netem_needed:
        raise ValueError("this direction sets nothing to shape (no rate, no delay, no loss)")
    if rate_Bps is None:
        # The root stays (so later changes are in place) but does not limit:
        # netem alone shapes this direction, and results say so.
        limiter_Bps, emulation = PASS_THROUGH_BPS // 8, "netem"
    else:
        limiter_Bps, emulation = rate_Bps, root + ("+netem" if netem_needed else "")
    return KernelParams(
        root=root, emulation=emulation, rate_Bps=limiter_Bps, overhead_bytes=d.overhead_bytes,
        burst_bytes=burst_bytes(limiter_Bps, timer_slack_s), queue_packets=queue,
        netem=_netem_options(d, with_rate=False) if netem_needed else None)
