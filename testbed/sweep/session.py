"""The deployed part of a run: two nodes, the shaped link between them, their clients.

Owns bringing a run's nodes up ready to measure (deploy with CPU sets, link
shaped and checked, agents healthy, inputs set, the local connected to the
remote's data port), tearing them down, and doing it again when a node dies
mid-run (killed, OOM-killed, crashed, hung): the sweep records the failed
configuration and continues on a fresh pair. Every deployment is recorded in
``environment.json`` (the first as the run's environment, later ones under
``redeployed`` with the cause). What to measure is the sweep's.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from typing import TYPE_CHECKING, Callable

from rich.console import Console

from testbed.analysis.results import RunFolder
from testbed.deploy.cpus import CpuPlan
from testbed.errors import NodeError, ProtocolError, TestbedError
from testbed.sweep import environment, placement
from testbed.sweep.plan import Plan, SweepOptions

if TYPE_CHECKING:
    import numpy as np

    from testbed.deploy import Deployment
    from testbed.deploy.ssh import SshSpec
    from testbed.link.link import Link
    from testbed.link.profile import LinkProfile
    from testbed.metrics import SweepMetrics
    from testbed.metrics.exposition import MetricsServer

# A run gives up after this many configurations in a row fail: something is
# wrong with every configuration (a model no node can load), not with one.
MAX_FAILURES_IN_A_ROW = 5
# How long a failure waits for the backend to report a node's death before
# concluding the nodes still run (a hung or refused step).
DEATH_GRACE_S = 3.0


class Session:
    """Deploy, shape and connect the nodes of a run; ``reopen`` after a node died."""

    def __init__(self, p: Plan, run: RunFolder, options: SweepOptions, cpus: CpuPlan, token: str,
                 metrics: SweepMetrics, server: MetricsServer, console: Console,
                 images: list[np.ndarray], publish: Callable[..., Callable[[], None]]) -> None:
        self.p, self.run, self.options, self.cpus, self.token = p, run, options, cpus, token
        self.metrics, self.server, self.console, self.images, self.publish = \
            metrics, server, console, images, publish
        self.stack = contextlib.ExitStack()
        self.dep: Deployment | None = None
        self.link: Link | None = None
        self.nodes: placement.NodePair | None = None
        self.profile: LinkProfile | None = None  # what the link is shaped as now
        self.run_ids: list[str] = []

    # ----------------------------------------------------------------- up and down
    def open(self) -> None:
        from testbed.deploy import deploy
        from testbed.link.link import Link

        exp, stack = self.p.experiment, self.stack
        run_id = secrets.token_hex(3)
        self.run_ids.append(run_id)
        dep = stack.enter_context(deploy(run_id, placement.node_spec(exp.nodes.local, self.cpus.local),
                                         placement.node_spec(exp.nodes.remote, self.cpus.remote),
                                         backend=self.options.backend or exp.nodes.backend, token=self.token,
                                         ssh=self._ssh_spec()))
        self.dep = dep
        self.console.print(f"backend: {dep.backend}  run id: {run_id}")
        stack.callback(self.publish(exp, self.run.path.name, self.metrics, self.server, dep))
        link = Link(dep.local.shaping, dep.remote.shaping)
        stack.callback(link.teardown)
        link.check(self.p.profiles)
        self.link, self.profile = link, None
        env = environment.environment(self.p, run_id, dep, link.capabilities(), self.options, self.cpus,
                                      remote_caps=link.remote_capabilities())
        if len(self.run_ids) == 1:
            for note in self.cpus.notes:
                self.console.print(f"cpus: {note}")
            environment.record(self.run, env, self.run.environment())
        nodes = placement.NodePair(dep, dep.local.client(self.token), dep.remote.client(self.token),
                                   parallel=placement.parallel(exp, self.cpus))
        for client in (nodes.local, nodes.remote):
            stack.callback(client.close)
            client.health()
        feeds = [{self.p.graph.inputs[0].name: a} for a in self.images]
        nodes.local.set_inputs(feeds)
        if exp.topology == 3:  # the source is the remote node
            nodes.remote.set_inputs(feeds)
        nodes.local.connect_peer(dep.remote.data_host, dep.remote.data_port)
        self._nft_loss(dep, run_id)
        self.nodes = nodes

    def _nft_loss(self, dep: Deployment, run_id: str) -> None:
        """``transport.nft_loss``: an nftables drop rule on the data interface of the node
        that sends the cut, removed with the deployment (Ctrl-C included)."""
        exp = self.p.experiment
        if not exp.transport.nft_loss:
            return
        from testbed.link.nft_loss import NftLoss

        node = dep.local if exp.topology == 1 else dep.remote
        loss = NftLoss(node.shaping, exp.transport.nft_loss, f"{run_id}_{node.name}".replace("-", "_"))
        self.stack.callback(loss.remove)
        loss.install()
        if len(self.run_ids) == 1:
            self.console.print(f"loss: nftables drops {loss.percent}% of packets leaving {node.name}'s {loss.dev}")

    def _ssh_spec(self) -> SshSpec | None:
        """The remote's host when it runs on another machine (``backend: ssh``)."""
        if not self.p.experiment.nodes.remote_ssh:
            return None
        from testbed.deploy.ssh import SshSpec

        return SshSpec.from_config(self.p.experiment.nodes.remote)

    def close(self) -> None:
        self.stack.close()
        self.stack = contextlib.ExitStack()
        self.dep = self.link = self.nodes = None

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- faults
    def diagnose(self) -> tuple[str | None, str]:
        """(node, cause) of a failure: the first node that is no longer running and
        why (OOM, signal, exit), or (None, "nodes still running") for a hung or
        refused step."""
        if self.dep is None:
            return None, "not deployed"
        # A closed connection can reach us before the backend has noticed the death
        # (docker updates a container's state asynchronously): look for a moment.
        deadline = time.monotonic() + DEATH_GRACE_S
        while True:
            for role in ("local", "remote"):
                cause = self.dep.death(role)
                if cause is not None:
                    return role, cause
            if time.monotonic() > deadline:
                return None, "nodes still running"
            time.sleep(0.2)

    def recover(self, node_died: bool, cause: str) -> None:
        """Bring the pair back: a fresh deployment when a node died or the pair no
        longer answers; else just a new data connection (a step failed, the nodes live)."""
        if not node_died:
            try:
                assert self.nodes is not None and self.dep is not None
                for client in (self.nodes.local, self.nodes.remote):
                    client.health()
                self.nodes.local.connect_peer(self.dep.remote.data_host, self.dep.remote.data_port)
                return
            except (NodeError, ProtocolError):
                pass  # the pair does not answer: redeploy
        old = self.run_ids[-1]
        self.close()
        self.open()
        env = self.run.environment()
        env.setdefault("redeployed", []).append({"after_run_id": old, "run_id": self.run_ids[-1],
                                                 "cause": cause, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.run.write_environment(env)


class FailureBudget:
    """Counts configurations failed in a row; too many ends the run with the reason."""

    def __init__(self, limit: int = MAX_FAILURES_IN_A_ROW) -> None:
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def ok(self) -> None:
        self.in_a_row = 0

    def failed(self, what: str) -> None:
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise TestbedError(f"{self.in_a_row} configurations in a row failed, the last: {what}; "
                               "stopping (the results so far are kept; see failures.csv)")
