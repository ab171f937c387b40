"""netem delay-distribution tables, computed the way iproute2 builds them.

Owns: the ``normal``, ``pareto`` and ``paretonormal`` tables that ``tc`` reads
from ``/usr/lib/tc/*.dist`` and sends as ``TCA_NETEM_DELAY_DIST``. Computing
them here (same formulas as iproute2's ``netem/normal.c``, ``pareto.c``,
``paretonormal.c``: 4096 signed 16-bit values scaled by NETEM_DIST_SCALE) means
the shaper does not depend on iproute2's data files being installed, e.g. in a
minimal VM root file system. ``uniform`` needs no table: it is netem's default.

Leaves to others: encoding the table into netlink (``testbed.link.netlink``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist

TABLE_SIZE = 16384   # iproute2's TABLESIZE; every 4th entry is emitted
DIST_SCALE = 8192    # NETEM_DIST_SCALE
_SHORT_MIN, _SHORT_MAX = -32768, 32767
_PARETO_A = 3.0


def _clip(value: float) -> int:
    return max(_SHORT_MIN, min(_SHORT_MAX, int(round(value))))


def _normal_quantile(i: int) -> float:
    # normal.c fills table[rint(TABLESIZE * Phi(x))] = x over a fine x grid, so
    # entry i holds the largest x rounding to i: Phi^-1((i + 0.5) / TABLESIZE).
    return NormalDist().inv_cdf(min((i + 0.5) / TABLE_SIZE, 1 - 1e-12))


def _pareto_value(i: int) -> int:
    # paretonormal.c's paretovalue(i)
    x = (65536 - 4 * i) / 65536
    value = (1.0 / math.pow(x, 1.0 / _PARETO_A) - 1.5) * (4.0 / 3.0) * DIST_SCALE
    return _clip(min(value, _SHORT_MAX))


@lru_cache(maxsize=None)
def table(name: str) -> tuple[int, ...]:
    """The 4096-entry table for ``normal``, ``pareto`` or ``paretonormal``."""
    if name == "normal":
        return tuple(_clip(_normal_quantile(i) * DIST_SCALE) for i in range(0, TABLE_SIZE, 4))
    if name == "pareto":
        return tuple(_clip(min((math.pow(i / 65536, -1 / _PARETO_A) - 1) * DIST_SCALE, _SHORT_MAX))
                     for i in range(65536, 0, -16))
    if name == "paretonormal":
        return tuple(_clip((_normal_quantile(i) * DIST_SCALE + 3 * _pareto_value(i)) / 4)
                     for i in range(0, TABLE_SIZE, 4))
    raise ValueError(f"no table for distribution {name!r} (normal, pareto, paretonormal; uniform needs none)")
