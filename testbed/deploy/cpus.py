"""Which host CPUs each node and the orchestrator run on.

A CPU quota (``cpus: 1``) limits how much CPU time a node gets, not where: on a
shared host the UE node's threads land on whichever core is free and compete
with the edge node and the orchestrator, so the same head part measured 22 to
38 ms across configurations. Pinning gives the local (UE) node cores of its own
whenever the host has them, so its compute time depends on its quota only.

Policy (``pinning: auto``), on the CPUs this process may use:

1. the local node gets ``ceil(cpus)`` CPUs of its own (1 when unlimited), taken
   from the top of the list;
2. the remote node gets ``ceil(cpus)`` CPUs of its own from what is left, if at
   least one CPU then remains for the orchestrator; otherwise it shares the
   remaining CPUs with the orchestrator;
3. the orchestrator runs on whatever is left (never nothing).

When even step 1 cannot leave a CPU for the others, everything shares every
CPU and the plan says so. ``pinning: off`` pins nothing. Explicit per-node
``cpuset`` lists win over the policy. The plan, with every compromise spelled
out, goes into ``environment.json`` (``cpu_assignment``).

This module only decides; the backends apply a node's set (docker: cpuset
cgroup; netns: CPU affinity of the agent) and the sweep pins itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from testbed.errors import ConfigError


@dataclass(frozen=True)
class CpuPlan:
    """CPU sets per role (None: not pinned) and what had to be shared."""

    host: tuple[int, ...]
    local: tuple[int, ...] | None
    remote: tuple[int, ...] | None
    orchestrator: tuple[int, ...] | None
    mode: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        """For environment.json."""
        return {"mode": self.mode, "host_cpus": list(self.host),
                "local": None if self.local is None else list(self.local),
                "remote": None if self.remote is None else list(self.remote),
                "orchestrator": None if self.orchestrator is None else list(self.orchestrator),
                "notes": list(self.notes)}


def parse_cpuset(text: str) -> tuple[int, ...]:
    """``"0-2,5"`` → (0, 1, 2, 5). Raises ValueError with what was expected."""
    cpus: set[int] = set()
    for piece in str(text).split(","):
        piece = piece.strip()
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"expected CPU numbers and ranges such as '0-1,3', got {text!r}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a or b > 4095:
            raise ValueError(f"CPU range {piece!r} is empty or beyond CPU 4095")
        cpus.update(range(a, b + 1))
    return tuple(sorted(cpus))


def format_cpuset(cpus: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) → ``"0-2,5"`` (docker's and the kernel's notation)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _need(cpus: float | None) -> int:
    return max(1, math.ceil(cpus)) if cpus is not None else 1


def plan_cpus(local_cpus: float | None, remote_cpus: float | None, *, mode: str = "auto",
              host: tuple[int, ...] | None = None, local_set: tuple[int, ...] | None = None,
              remote_set: tuple[int, ...] | None = None) -> CpuPlan:
    """Decide the CPU sets (see the module docstring).

    Args:
        local_cpus, remote_cpus: the nodes' quotas (None: unlimited).
        mode: ``auto`` or ``off``.
        host: the CPUs available (default: this process's affinity).
        local_set, remote_set: explicit sets from the experiment (win over the policy).

    Raises:
        ConfigError: an explicit set names a CPU this process cannot use.
    """
    host = tuple(sorted(host if host is not None else os.sched_getaffinity(0)))
    for name, given in (("local", local_set), ("remote", remote_set)):
        if given is not None and not set(given) <= set(host):
            raise ConfigError(f"cpuset {format_cpuset(given)} names CPUs outside this host's "
                              f"{format_cpuset(host)}", field=f"nodes.{name}.cpuset")
    if mode == "off":
        return CpuPlan(host, local_set, remote_set, None, "off",
                       ("pinning off: nodes and orchestrator run on any CPU",))
    notes: list[str] = []
    free = list(host)

    def take(n: int) -> tuple[int, ...]:
        got = tuple(sorted(free[-n:]))
        del free[-n:]
        return got

    local = local_set
    if local is None:
        if len(free) - _need(local_cpus) >= 1:
            local = take(_need(local_cpus))
        else:
            notes.append(f"host has {len(host)} CPU(s): the local node cannot have a CPU of its own; "
                         "all share every CPU")
            return CpuPlan(host, None, remote_set, None, mode, tuple(notes))
    else:
        free = [c for c in free if c not in local]
    remote = remote_set
    if remote is None:
        if len(free) - _need(remote_cpus) >= 1:
            remote = take(_need(remote_cpus))
        elif free:
            remote = tuple(free)
            if len(free) < _need(remote_cpus):
                notes.append(f"remote node asked for {remote_cpus:g} CPUs but only CPU(s) "
                             f"{format_cpuset(remote)} remain: its quota is capped by them")
            notes.append(f"remote node and orchestrator share CPU(s) {format_cpuset(remote)}")
        else:
            remote = local
            notes.append("no CPU left after the local node's: the remote node shares them")
    else:
        free = [c for c in free if c not in remote]
    orchestrator = tuple(free) if free else remote
    if not free:
        notes.append(f"orchestrator shares CPU(s) {format_cpuset(orchestrator)} with the remote node")
    if local_cpus is not None and len(local) > math.ceil(local_cpus):
        notes.append(f"local node has {len(local)} CPUs for a quota of {local_cpus:g}")
    return CpuPlan(host, local, remote, orchestrator, mode, tuple(notes))
