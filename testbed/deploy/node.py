"""What a deployed node is, seen from the orchestrator: the ``Node`` handle.

A backend (docker, netns; later ssh, adb) starts a node and hands back a ``Node``:
where its agent's control, metrics and data endpoints are, which interface the
link shaper must act on (a ``testbed.link.target.Target``), and what limits were
really applied. The sweep only ever sees this handle; how the node runs is the
backend's business. Talking to the agent is ``testbed.deploy.agent_client``'s
(the nodes helper's) business: ``Node.client(token)`` just builds one.

Also here: ``NodeSpec`` (what the experiment asks of a node), the agent's port
numbers inside a node, and the rules for run ids, because every backend derives
object names from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from testbed.errors import ConfigError

if TYPE_CHECKING:  # imported lazily: the client pulls in nodes.protocol
    from testbed.deploy.agent_client import AgentClient

# Ports the agent listens on inside its node. Every node has its own network
# namespace, so the same numbers never collide between nodes or runs.
CONTROL_PORT = 7700
DATA_PORT = 7701
METRICS_PORT = 7702

ROLES = ("local", "remote")

# Run ids end up in container, network, namespace and cgroup names and in Docker
# labels; keep them to characters all of those accept and short enough for
# Docker's 63-character DNS-style names.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` when usable in object names, else raise ConfigError."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ConfigError(f"{run_id!r} is not a usable run id (1-40 of A-Z a-z 0-9 _ . -, "
                          "starting with a letter or digit)", field="run_id")
    return run_id


@dataclass(frozen=True)
class NodeSpec:
    """What an experiment asks of one node. ``None`` means "no limit / default".

    ``threads`` is passed through to the agent's LiteRT interpreter by the sweep;
    backends apply ``cpus`` (CPU bandwidth, may be fractional), ``memory_bytes``
    (hard memory limit) and ``cpuset`` (the host CPUs the node may run on,
    decided by ``testbed.deploy.cpus``).
    """

    cpus: float | None = None
    memory_bytes: int | None = None
    threads: int | None = None
    cpuset: tuple[int, ...] | None = None
    cpu_period_us: int = 100_000  # the CFS period the cpus quota is granted in

    def __post_init__(self) -> None:
        if self.cpus is not None and not self.cpus > 0:
            raise ConfigError(f"must be > 0, got {self.cpus}", field="cpus")
        # Below ~6 MiB Docker refuses to start a container; a Python agent with
        # numpy and LiteRT needs far more anyway.
        if self.memory_bytes is not None and self.memory_bytes < 64 * 1024 * 1024:
            raise ConfigError(f"must be at least 64 MiB, got {self.memory_bytes} bytes",
                              field="memory")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"must be >= 1, got {self.threads}", field="threads")


def make_target(dev: str, *, netns: str | None = None, pid: int | None = None) -> Any:
    """The link layer's ``Target`` for a node's data interface."""
    from testbed.link.target import Target

    return Target(dev=dev, netns=netns, pid=pid)


@dataclass
class Node:
    """Handle on one running node.

    Attributes:
        name: ``"local"`` (the UE side, runs the head) or ``"remote"``.
        backend: ``"docker"`` or ``"netns"``.
        control_host, control_port: the agent's control endpoint, reachable from
            the orchestrator over an unshaped path.
        metrics_host, metrics_port: the agent's /metrics (HTTP), control side.
        data_host, data_port: the agent's data-plane endpoint as the PEER node
            sees it (only reachable from the other node, through the shaped link).
        shaping: ``Target`` of this node's data interface; the shaper applies this
            node's egress direction there (uplink on local, downlink on remote).
        cpus, memory_bytes: limits really applied (``None``: not limited).
        clock_shared: both nodes read the same CLOCK_MONOTONIC (same kernel), so
            one-way times are exact.
        details: backend facts for environment.json (image id, container id,
            namespace, cgroup paths, how limits were applied).
    """

    name: str
    backend: str
    control_host: str
    control_port: int
    metrics_host: str
    metrics_port: int
    data_host: str
    data_port: int
    shaping: Any
    cpus: float | None = None
    memory_bytes: int | None = None
    clock_shared: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def client(self, token: str) -> "AgentClient":
        """An ``AgentClient`` on this node's control endpoint."""
        from testbed.deploy.agent_client import AgentClient

        return AgentClient(self.control_host, self.control_port, token, self.name)

    def environment(self) -> dict[str, Any]:
        """JSON-ready description of the node for ``environment.json``."""
        shaping = {k: getattr(self.shaping, k, None) for k in ("dev", "netns", "pid", "ingress")}
        return {
            "name": self.name, "backend": self.backend,
            "control": f"{self.control_host}:{self.control_port}",
            "metrics": f"{self.metrics_host}:{self.metrics_port}",
            "data": f"{self.data_host}:{self.data_port}",
            "shaping": shaping, "cpus": self.cpus, "memory_bytes": self.memory_bytes,
            "clock_shared": self.clock_shared, **self.details,
        }
