"""Human units in YAML, base units in code.

People write ``25mbit``, ``40ms``, ``0.5%``, ``1GiB``; code holds bits per second,
seconds, percent and bytes (names say which: ``rate_bps``, ``delay_s``,
``loss_pct``, ``memory_bytes``). The parsers raise ``ValueError`` with what was
expected, so pydantic (see ``testbed.config``) reports it with file, line and field.

Every parser refuses non-finite numbers (YAML ``.inf``/``.nan``, or ``1e400``
which Python reads as infinity) with a ValueError, never an OverflowError.
Ranges that depend on what consumes the value (the kernel's for a link, a
node's for memory) are checked there, not here.

``bps`` is refused on purpose: tc reads it as *bytes* per second and most people
as bits; a testbed that guesses measures the wrong link.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"

_RATE_UNITS = {
    "": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6, "ns": 1e-9}
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
    # docker's --memory style (1g, 512m) is binary
    "k": 2**10, "m": 2**20, "g": 2**30,
}


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _finite(number: float, value: object, what: str) -> float:
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {_show(value)}")
    return number


def _number(value: object, what: str, example: str) -> float:
    """A bare YAML number (not a boolean), finite."""
    if isinstance(value, bool):
        raise ValueError(f"expected {what} such as {example!r}, got {value!r}")
    return _finite(float(value), value, what)  # type: ignore[arg-type]


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z%/]*)", text.strip())
    if not m:
        raise ValueError(f"expected {what} such as {example!r}, got {_show(text)}")
    return _finite(float(m.group(1)), text, what), m.group(2)


def parse_rate(value: object) -> int:
    """``'25mbit'`` → 25_000_000 (bits per second). A bare number is bit/s."""
    if isinstance(value, (bool, int, float)):
        number, unit = _number(value, "a rate", "25mbit"), "bit"
    else:
        number, unit = _split(str(value), "a rate", "25mbit")
    unit = unit.lower().removesuffix("/s")
    if unit.endswith("bps"):
        raise ValueError(f"ambiguous rate unit in {_show(value)}: write bits as 'mbit' (tc reads 'bps' as bytes/s)")
    if unit not in _RATE_UNITS:
        raise ValueError(f"unknown rate unit in {_show(value)}; expected one of {', '.join(u for u in _RATE_UNITS if u)}")
    rate = int(round(_finite(number * _RATE_UNITS[unit], value, "a rate")))
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {_show(value)}")
    return rate


def parse_duration(value: object) -> float:
    """``'40ms'`` → 0.04 (seconds). A bare number is seconds."""
    if isinstance(value, (bool, int, float)):
        seconds = _number(value, "a duration", "40ms")
    else:
        number, unit = _split(str(value), "a duration", "40ms")
        if unit.lower() not in _TIME_UNITS:
            raise ValueError(f"unknown time unit in {_show(value)}; expected one of {', '.join(u for u in _TIME_UNITS if u)}")
        seconds = number * _TIME_UNITS[unit.lower()]
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {_show(value)}")
    return seconds


def parse_percent(value: object) -> float:
    """``'0.5%'`` → 0.5 (percent, 0..100). The ``%`` is required for strings
    and a bare number is taken as percent, never as a fraction."""
    if isinstance(value, (bool, int, float)):
        pct = _number(value, "a percentage", "0.5%")
    else:
        number, unit = _split(str(value), "a percentage", "0.5%")
        if unit != "%":
            raise ValueError(f"expected a percentage such as '0.5%', got {_show(value)}")
        pct = number
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"percentage must be within 0% and 100%, got {_show(value)}")
    return pct


def parse_size(value: object) -> int:
    """``'1GiB'`` → 1073741824 (bytes). ``KB`` is 1000, ``KiB`` and docker's ``k`` 1024."""
    if isinstance(value, (bool, int, float)):
        number, unit = _number(value, "a size", "1GiB"), ""
    else:
        number, unit = _split(str(value), "a size", "1GiB")
    if unit.lower() not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit in {_show(value)}; expected B, KB, MB, GB, KiB, MiB or GiB")
    size = int(round(_finite(number * _SIZE_UNITS[unit.lower()], value, "a size")))
    if size < 0:
        raise ValueError(f"size must not be negative, got {_show(value)}")
    return size


def format_rate(rate_bps: float) -> str:
    """Inverse of :func:`parse_rate` for display: 25000000 → '25mbit'."""
    for unit in ("gbit", "mbit", "kbit"):
        factor = _RATE_UNITS[unit]
        if rate_bps >= factor:
            return f"{rate_bps / factor:g}{unit}"
    return f"{rate_bps:g}bit"


def format_duration(seconds: float) -> str:
    """0.04 → '40ms' for display."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"


def format_bytes(size: float) -> str:
    """1536 → '1.5 KiB' for display."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"


# Field types for pydantic schemas: humans write units, the model holds base units.
RateBps = Annotated[int, BeforeValidator(parse_rate)]
Seconds = Annotated[float, BeforeValidator(parse_duration)]
Percent = Annotated[float, BeforeValidator(parse_percent)]
Bytes = Annotated[int, BeforeValidator(parse_size)]
