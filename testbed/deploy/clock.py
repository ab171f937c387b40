"""How far apart the two nodes' clocks are, and how sure we are of it.

Owns the NTP-style estimate of one agent's CLOCK_MONOTONIC against the
orchestrator's, over the control plane (never the shaped link): ``n`` exchanges of
the agent's ``clock`` operation, each bracketed by two local stamps ``t0``, ``t1``;
the agent's stamp ``t`` was taken somewhere between them, so its offset lies in
``[t - t1, t - t0]`` whatever the path's asymmetry. The exchange with the smallest
round trip (minimum-RTT filter) gives the estimate ``t - (t0 + t1) / 2`` and the
half-width ``(t1 - t0) / 2`` as a hard bound on its error. ``between`` combines the
two nodes' estimates into remote - local, errors added.

``ClockCheck`` runs the estimate before and after each configuration and turns the
pair into result columns: the offset the samples were corrected with, its
uncertainty (which bounds the error of every ``derived`` one-way time: uplink,
downlink and the head's delivery), and the drift between the two estimates.

Leaves to others: stamping and correcting the samples (``nodes.pipeline``), the
control connection (``testbed.deploy.agent_client``), where the columns go
(``testbed.analysis.results``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.deploy.agent_client import AgentClient

#: Exchanges per estimate. The control plane is idle between configurations, so a few
#: dozen round trips (~ms each through an SSH tunnel) cost little and the fastest of
#: them is close to the path's floor.
EXCHANGES = 16


@dataclass(frozen=True)
class Offset:
    """Agent clock minus reference clock, in ns, with a hard error bound."""

    offset_ns: int
    uncertainty_ns: int
    rtt_ns: int
    at_ns: int  # reference clock when it was measured

    @property
    def offset_s(self) -> float:
        return self.offset_ns / 1e9

    @property
    def uncertainty_s(self) -> float:
        return self.uncertainty_ns / 1e9


def estimate(client: AgentClient, exchanges: int = EXCHANGES) -> Offset:
    """The agent's clock against this process's CLOCK_MONOTONIC (minimum-RTT filter)."""
    best: tuple[int, int, int] | None = None  # (rtt, t_agent, midpoint)
    for _ in range(max(1, exchanges)):
        t0 = time.monotonic_ns()
        t = client.clock()
        t1 = time.monotonic_ns()
        if best is None or t1 - t0 < best[0]:
            best = (t1 - t0, t, (t0 + t1) // 2)
    assert best is not None
    rtt, t, mid = best
    return Offset(offset_ns=t - mid, uncertainty_ns=(rtt + 1) // 2, rtt_ns=rtt, at_ns=mid)


def between(local: Offset, remote: Offset) -> Offset:
    """Remote clock minus local clock from both against the orchestrator's."""
    return Offset(offset_ns=remote.offset_ns - local.offset_ns,
                  uncertainty_ns=remote.uncertainty_ns + local.uncertainty_ns,
                  rtt_ns=max(remote.rtt_ns, local.rtt_ns), at_ns=max(remote.at_ns, local.at_ns))


@dataclass
class ClockCheck:
    """Before/after estimates of remote - local around one configuration."""

    local: AgentClient
    remote: AgentClient
    before: Offset | None = None
    after: Offset | None = None

    def measure(self) -> Offset:
        return between(estimate(self.local), estimate(self.remote))

    def start(self) -> Offset:
        self.before = self.measure()
        return self.before

    def finish(self) -> Offset:
        self.after = self.measure()
        return self.after

    def sample_columns(self) -> dict[str, Any]:
        """Per sample: the offset it was corrected with and the bound on its one-way times."""
        b = self.before
        return {"clock_offset_s": b.offset_s if b else None,
                "clock_uncertainty_s": b.uncertainty_s if b else None}

    def summary_columns(self) -> dict[str, Any]:
        """Per configuration: both estimates, their bounds and the drift between them."""
        b, a = self.before, self.after
        drift = (a.offset_ns - b.offset_ns) / 1e9 if a and b else None
        span = (a.at_ns - b.at_ns) / 1e9 if a and b else None
        return {"clock_offset_s": b.offset_s if b else None,
                "clock_uncertainty_s": b.uncertainty_s if b else None,
                "clock_offset_after_s": a.offset_s if a else None,
                "clock_uncertainty_after_s": a.uncertainty_s if a else None,
                "clock_drift_s": drift,
                "clock_drift_ppm": drift / span * 1e6 if drift is not None and span else None}
