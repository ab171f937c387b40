"""Time-varying links: change the qdisc at each step of a trace, on time.

Owns: a background thread that, for a schedule ``[(at_s, Direction), ...]``
(from ``LinkProfile.schedule``), calls ``Shaper.change`` at ``start + at``
(repeating every ``period_s`` when the trace loops), measures how late each
change *completed* (the step timing error; the target is ≤ 10 ms) and stops
cleanly on ``stop()`` or when the ``with`` block exits. The first step is
applied synchronously by ``start()`` so shaping is in place when it returns.

Leaves to others: what a step installs (``testbed.link.shaper``) and where
the schedule comes from (``testbed.link.profile``).

Example::

    with Stepper(shaper, profile.schedule("uplink"), profile.period_s()) as st:
        run_traffic()
    print(st.report())   # {'steps': 12, 'max_error_s': 0.0011, ...}
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable

from testbed.link.profile import Direction, LinkProfile
from testbed.link.shaper import Shaper

SPIN_S = 0.002  # sleep until this close to a step, then spin: Event.wait alone overshoots by ~1 ms


class Stepper:
    """Drive ``shaper`` through ``schedule``.

    Args:
        shaper: an open Shaper on the target interface.
        schedule: ``[(at_s, Direction), ...]`` with strictly increasing ``at_s``.
        period_s: repeat the schedule every ``period_s`` (None: run once, then
            hold the last step until ``stop``).
        profile: name recorded with each change.
        clock: monotonic clock (seconds).
    """

    def __init__(self, shaper: Shaper, schedule: list[tuple[float, Direction]], period_s: float | None = None,
                 profile: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if not schedule:
            raise ValueError("empty schedule")
        if period_s is not None and period_s <= schedule[-1][0]:
            raise ValueError("period_s must exceed the last step's time")
        self.shaper, self.schedule, self.period_s, self.profile = shaper, schedule, period_s, profile
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors_s: list[float] = []     # completion time - scheduled time, per step (signed)
        self.failure: BaseException | None = None
        self.started_at: float | None = None

    @classmethod
    def for_profile(cls, shaper: Shaper, profile: LinkProfile, direction: str) -> "Stepper":
        return cls(shaper, profile.schedule(direction), profile.period_s(), profile.name)

    def start(self) -> "Stepper":
        """Apply the first step now, then follow the schedule in a thread."""
        self.started_at = self._clock() - self.schedule[0][0]
        self.shaper.apply(self.schedule[0][1], self.profile)
        self._thread = threading.Thread(target=self._run, name="link-stepper", daemon=True)
        self._thread.start()
        return self

    def stop(self, clear: bool = False) -> None:
        """Stop stepping (waits for the thread); optionally clear the shaping."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if clear:
            self.shaper.clear()

    def __enter__(self) -> "Stepper":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _due(self) -> Any:
        """Yield (scheduled monotonic time, direction) forever or once."""
        cycle = 0
        first = True
        while True:
            base = self.started_at + cycle * (self.period_s or 0.0)
            for i, (at, d) in enumerate(self.schedule):
                if first and i == 0:
                    continue  # applied by start()
                yield base + at, d
            first = False
            if self.period_s is None:
                return
            cycle += 1

    def _run(self) -> None:
        try:
            # The first change from a new thread costs 20-25 ms (pyroute2 sets up
            # its event loop, first-use imports); pay it now, not at the first
            # step, by re-applying the step that is already in place.
            current = self.schedule[0][1]
            nxt = self.schedule[1][1] if len(self.schedule) > 1 else current
            # A change re-sends only what differs, so rehearse the first step's
            # requests (same parts, current values: the link does not move).
            parts = self.shaper.parts_differing(current, nxt)
            self.shaper.change(current, self.profile, resend=parts)
            # A second rehearsal measures what such a change costs on this
            # machine (~1-2 ms here, tens of ms under QEMU TCG): start each step
            # that early so it *completes* on time. A fixed 3 ms guess made the
            # first step in the VM 139 ms late while the lead caught up.
            began = self._clock()
            self.shaper.change(current, self.profile, resend=parts)
            costs = [self._clock() - began]
            lead = costs[0]
            for when, direction in self._due():
                when -= lead
                while True:
                    left = when - self._clock()
                    if left <= SPIN_S:
                        break
                    if self._stop.wait(left - SPIN_S):
                        return
                while self._clock() < when:
                    if self._stop.is_set():
                        return
                began = self._clock()
                self.shaper.change(direction, self.profile)
                done = self._clock()
                self.errors_s.append(done - (when + lead))
                # The median of the last few costs: robust to one slow change.
                costs = (costs + [done - began])[-5:]
                lead = statistics.median(costs)
        except BaseException as e:  # reported through .failure / report(); the run decides
            self.failure = e

    def report(self) -> dict[str, Any]:
        """Step timing: count, mean / max absolute error (s), and a failure if any."""
        errs = [abs(e) for e in self.errors_s]
        return {"steps": len(errs), "mean_error_s": statistics.fmean(errs) if errs else None,
                "max_error_s": max(errs) if errs else None,
                "failure": None if self.failure is None else str(self.failure)}
