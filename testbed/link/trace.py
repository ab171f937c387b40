"""Mahimahi traces as rate steps.

Owns: reading a Mahimahi link trace (one integer millisecond timestamp per
line; each line is one opportunity to deliver a 1500-byte packet; the trace
repeats after its last timestamp) and averaging it over fixed windows into
``(at_s, rate_bps)`` steps a qdisc can follow. A window without any
opportunity becomes ``floor_bps``: a qdisc rate cannot be zero, and an outage
needs netem's loss, which a rate-only trace must not require.

Leaves to others: the profile schema (``testbed.link.profile``) and applying
the steps on time (``testbed.link.stepper``).
"""

from __future__ import annotations

import math
from pathlib import Path

PACKET_BITS = 1500 * 8


def read_mahimahi(path: str | Path) -> list[int]:
    """Millisecond timestamps, in order.

    Raises:
        ValueError: a line is not a non-negative integer, timestamps go
            backwards, or the file is empty (message names the line).
    """
    out: list[int] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if not text.isdigit():
            raise ValueError(f"{path}:{number}: expected a millisecond timestamp, got {text!r}")
        value = int(text)
        if out and value < out[-1]:
            raise ValueError(f"{path}:{number}: timestamps must not go backwards ({value} after {out[-1]})")
        out.append(value)
    if not out:
        raise ValueError(f"{path}: no timestamps")
    return out


def mahimahi_period(path: str | Path, window_s: float) -> float:
    """Length of one cycle of the trace, rounded up to whole windows."""
    last_ms = max(read_mahimahi(path)[-1], 1)
    window_ms = window_s * 1000
    return math.ceil(last_ms / window_ms) * window_s


def mahimahi_steps(path: str | Path, window_s: float, floor_bps: int) -> list[tuple[float, int]]:
    """Average delivery opportunities per window into rate steps.

    A window of ``w`` seconds holding ``n`` opportunities is ``n·1500·8 / w``
    bit/s. Consecutive windows with the same rate merge into one step.
    """
    stamps = read_mahimahi(path)
    period = mahimahi_period(path, window_s)
    windows = max(1, round(period / window_s))
    counts = [0] * windows
    for ms in stamps:
        # Mahimahi's first opportunity is at the timestamp; a stamp equal to the
        # period belongs to the last window (the trace then wraps around).
        counts[min(int(ms / 1000 / window_s), windows - 1)] += 1
    steps: list[tuple[float, int]] = []
    for i, n in enumerate(counts):
        rate = max(floor_bps, int(round(n * PACKET_BITS / window_s)))
        if not steps or steps[-1][1] != rate:
            steps.append((round(i * window_s, 9), rate))
    return steps
