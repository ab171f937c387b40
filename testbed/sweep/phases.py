"""Where a configuration's wall time goes: the phase clock.

Every second of a configuration belongs to one phase (``results.PHASES``):
what a block claims with ``with clock("delivery"):``, what the agent reports
of its own time (``add``, e.g. warm-up inside a run call), and ``other`` for
whatever no phase claimed, so the phases add up to ``wall_s`` exactly and a
slow sweep says which step made it slow.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from testbed.analysis.results import PHASES


class PhaseClock:
    """Wall time of one configuration, by phase, from ``start`` (default: now)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.current: str | None = None    # the phase being timed now
        self.failed_in: str | None = None  # the innermost phase an exception left

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.monotonic()
        outer, self.current = self.current, phase
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or phase
            raise
        finally:
            self.current = outer
            self.seconds[phase] += time.monotonic() - t

    def add(self, phase: str, seconds: float, taken_from: str | None = None) -> None:
        """Count ``seconds`` in ``phase``, moved out of ``taken_from`` when given
        (time a block measured as a whole but the node says was something else)."""
        seconds = max(0.0, seconds)
        if taken_from is not None:
            seconds = min(seconds, self.seconds[taken_from])
            self.seconds[taken_from] -= seconds
        self.seconds[phase] += seconds

    def close(self) -> dict[str, float]:
        """``wall_s`` and one ``phase_<name>_s`` column per phase."""
        wall = time.monotonic() - self.start
        self.seconds["other"] = max(0.0, wall - sum(v for k, v in self.seconds.items() if k != "other"))
        return {"wall_s": wall, **{f"phase_{k}_s": v for k, v in self.seconds.items()}}
