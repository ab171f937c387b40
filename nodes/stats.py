"""The statistics every table of the testbed reports, computed one way.

mean; standard deviation with ddof = 1 (the sample standard deviation: an
estimate of the population's, and 0 for a single value); percentiles by linear
interpolation between the sorted values (numpy's default, "type 7"). The
result files, the benchmark KPIs, per-layer latencies and the live metrics all
use these, and docs/results.md ("Statistics") says so. numpy only: the agent uses it.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

PERCENTILES = (10, 50, 90, 99)


def describe(values: Iterable[float | None], percentiles: Iterable[int] = PERCENTILES) -> dict[str, float | None]:
    """``{"mean", "std", "p10", "p50", ...}`` of the values (None and NaN ignored;
    every entry None when nothing is left)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    keys = ["mean", "std", *(f"p{q}" for q in percentiles)]
    if arr.size == 0:
        return dict.fromkeys(keys)
    qs = list(percentiles)
    out: dict[str, float | None] = {"mean": float(arr.mean()),
                                    "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}
    out.update({f"p{q}": float(v) for q, v in zip(qs, np.percentile(arr, qs))})
    return out


def quantile(values: Iterable[float], q: float) -> float:
    """One quantile (0..1) of non-empty values, interpolated as ``describe``'s percentiles."""
    return float(np.percentile(np.asarray(list(values), dtype=float), q * 100))
