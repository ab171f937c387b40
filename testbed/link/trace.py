"""Mahimahi traces as rate steps.

Owns: reading a Mahimahi link trace (one integer millisecond timestamp per
line; each line is one opportunity to deliver a 1500-byte packet; the trace
repeats after its last timestamp) and averaging it over fixed windows into
``(at_s, rate_bps)`` steps a qdisc can follow. A window without any
opportunity becomes ``floor_bps``: a qdisc rate cannot be zero, and an outage
needs netem's loss, which a rate-only trace must not require.

Bounds (a trace is user input): the file must be a regular file of at most
``MAX_TRACE_BYTES`` (a FIFO or ``/dev/zero`` hung the loader), timestamps at
most ``MAX_TRACE_MS`` (a huge one asked for ~10^15 windows), and the trace at
most ``MAX_WINDOWS`` windows long. Rates a window may reach are the link
layer's business (``testbed.link.params``), checked where the profile loads.

Leaves to others: the profile schema (``testbed.link.profile``) and applying
the steps on time (``testbed.link.stepper``).
"""

from __future__ import annotations

import io
import math
import re
from array import array
from pathlib import Path

from testbed.config import read_regular_file
from testbed.errors import ConfigError

PACKET_BITS = 1500 * 8
MAX_TRACE_BYTES = 16 << 20      # ~2.5 M opportunities: 10 min at 50 Mbit/s; Mahimahi's cellular traces are < 5 MB
MAX_TRACE_MS = 7 * 24 * 3600 * 1000
MAX_WINDOWS = 100_000           # one merged Direction per step in memory; 14 h at 0.5 s windows

_STAMP = re.compile(rb"[0-9]{1,12}")


def read_mahimahi(path: str | Path) -> array:
    """Millisecond timestamps, in order (an ``array('q')``: millions of them stay small).

    Raises:
        ValueError: not a regular file or too large, a line is not a
            non-negative integer, a timestamp beyond ``MAX_TRACE_MS``,
            timestamps go backwards, or the file is empty (message names the line).
    """
    try:
        data = read_regular_file(path, MAX_TRACE_BYTES, "a Mahimahi trace")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    out = array("q")
    for number, line in enumerate(io.BytesIO(data), start=1):
        text = line.strip()
        if not text:
            continue
        if not _STAMP.fullmatch(text):
            shown = text[:40].decode("ascii", "replace")
            raise ValueError(f"{path}:{number}: expected a millisecond timestamp, got {shown!r}")
        value = int(text)
        if value > MAX_TRACE_MS:
            raise ValueError(f"{path}:{number}: timestamp {value} ms is beyond {MAX_TRACE_MS} ms (7 days)")
        if out and value < out[-1]:
            raise ValueError(f"{path}:{number}: timestamps must not go backwards ({value} after {out[-1]})")
        out.append(value)
    if not out:
        raise ValueError(f"{path}: no timestamps")
    return out


def _windows(last_ms: int, window_s: float, path: str | Path) -> int:
    count = max(1, math.ceil(max(last_ms, 1) / (window_s * 1000)))
    if count > MAX_WINDOWS:
        raise ValueError(f"{path}: the trace spans {count} windows of {window_s:g} s; at most {MAX_WINDOWS} "
                         "(use a longer window)")
    return count


def mahimahi_period(path: str | Path, window_s: float) -> float:
    """Length of one cycle of the trace, rounded up to whole windows."""
    return _windows(read_mahimahi(path)[-1], window_s, path) * window_s


def mahimahi_steps(path: str | Path, window_s: float, floor_bps: int) -> list[tuple[float, int]]:
    """Average delivery opportunities per window into rate steps.

    A window of ``w`` seconds holding ``n`` opportunities is ``n·1500·8 / w``
    bit/s. Consecutive windows with the same rate merge into one step.
    """
    stamps = read_mahimahi(path)
    windows = _windows(stamps[-1], window_s, path)
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
