"""Where the run's work happens: which CPUs each node and the orchestrator use,
and which node jobs may run at the same time.

Owns applying ``testbed.deploy.cpus``'s decision: the node specs carry each
node's CPU set, the orchestrator pins itself (and the threads it starts) to its
own set for the run, and ``NodePair.both`` runs a job on each node at once only
when their CPU sets are disjoint, since otherwise one node's KPIs or warm-up
would slow the other's.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from testbed.deploy.cpus import CpuPlan, plan_cpus
from testbed.experiment import Experiment, NodeConfig

if TYPE_CHECKING:
    from testbed.deploy import Deployment, NodeSpec
    from testbed.deploy.agent_client import AgentClient


@dataclass
class NodePair:
    """The two agents of a run, and whether they may work at once."""

    dep: Deployment
    local: AgentClient
    remote: AgentClient
    parallel: bool = False

    def both(self, on_local: Callable[[], Any] | None, on_remote: Callable[[], Any] | None) -> tuple[Any, Any]:
        """Run the two nodes' jobs, at once when ``parallel``; None for no job."""
        if not self.parallel or on_local is None or on_remote is None:
            return (on_local() if on_local else None), (on_remote() if on_remote else None)
        with ThreadPoolExecutor(2, thread_name_prefix="node") as pool:
            a, b = pool.submit(on_local), pool.submit(on_remote)
            return a.result(), b.result()


def cpu_plan(exp: Experiment) -> CpuPlan:
    n = exp.nodes
    return plan_cpus(n.local.cpus, n.remote.cpus, mode=n.pinning, local_set=n.local.cpu_list,
                     remote_set=n.remote.cpu_list)


def parallel(exp: Experiment, plan: CpuPlan) -> bool:
    """The two nodes can work at the same time without slowing each other: disjoint
    CPU sets here, or a remote on another machine (ssh)."""
    return disjoint(plan) or exp.nodes.remote_ssh


def without_remote(plan: CpuPlan) -> CpuPlan:
    """The plan when the remote node runs on another machine (an ssh remote): no CPU
    of this host is its, the orchestrator gets every one the local node leaves."""
    import dataclasses

    notes = tuple(n for n in plan.notes if "remote" not in n)
    if plan.local is None:
        return dataclasses.replace(plan, remote=None, notes=notes)
    rest = tuple(c for c in plan.host if c not in plan.local) or plan.local
    return dataclasses.replace(plan, remote=None, orchestrator=rest, notes=notes)


def disjoint(plan: CpuPlan) -> bool:
    """The two nodes run on CPUs of their own (so they may work at once)."""
    return bool(plan.local and plan.remote and not set(plan.local) & set(plan.remote))


def node_spec(cfg: NodeConfig, cpuset: tuple[int, ...] | None) -> NodeSpec:
    from testbed.deploy import NodeSpec

    return NodeSpec(cpus=cfg.cpus, memory_bytes=cfg.memory, threads=cfg.threads, cpuset=cpuset,
                    cpu_period_us=int(round(cfg.cpu_period * 1e6)))


@contextlib.contextmanager
def pinned(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """Run this thread (and the threads it starts: metrics server, progress,
    steppers) on ``cpus``, off the local node's cores; restore afterwards."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
