"""Deploying the two nodes of a run, and removing them again whatever happens.

``deploy(run_id, local, remote, backend=...)`` is a context manager yielding a
``Deployment`` (two ``Node`` handles and the backend used). On leaving it — normal
exit, exception, KeyboardInterrupt, SIGTERM — everything labelled or named with
the run id is removed. Teardown works from labels and names, not from what this
process remembers, so it also finishes half-created state; it is idempotent, and
Ctrl-C / SIGTERM arriving during it are held back until it is done.

Signals: the sweep installs its own SIGINT/SIGTERM handlers. If nobody has
(SIGTERM still at its default, which would kill the process without teardown),
``deploy`` makes SIGTERM raise KeyboardInterrupt for its duration and restores the
previous handler afterwards — unless someone replaced it meanwhile.

Agents outlive nothing: with the real agent, ``deploy`` takes each node's lease
(``agent_client.Lease``) as soon as it answers ``health`` and holds it until
teardown; an agent whose lease holder is gone for ``lease_s`` seconds exits
(``nodes.lease``), so after a SIGKILLed orchestrator the agents stop by themselves
and only inert state (namespaces, veths, cgroups; stopped containers, networks) waits
for ``cleanup``.

``cleanup(run_id=None)`` removes what a killed run left (all runs when None).
Backends: ``testbed.deploy.docker`` and ``testbed.deploy.netns``; with ``ssh=``
(an ``ssh.SshSpec``) the remote node runs on another machine (``testbed.deploy.ssh``)
and only the local node here, routed out of this host (``netns.start_local``,
``docker.start_local``); the remote's downlink is then shaped on the local node's
ingress (an IFB device).
Teardown and ``cleanup`` remove the remote side from the run's ssh state record. The link
shaper's qdiscs live on the nodes' interfaces and go with them; teardown drops
the link layer's records of them (``testbed.link.state``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import secrets
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from testbed.deploy.node import ROLES, Node, NodeSpec, check_run_id
from testbed.errors import ConfigError, NodeError
from testbed.forksafe import owner_only

__all__ = ["BACKENDS", "Deployment", "Node", "NodeSpec", "choose_backend", "cleanup", "deploy"]

log = logging.getLogger("testbed.deploy")

BACKENDS = ("auto", "docker", "netns")
#: Seconds an agent keeps running once nobody holds its lease (also the time from its
#: start to the first lease). Long enough for a slow start of the other node, short
#: enough that agents of a killed orchestrator are gone before anyone looks.
LEASE_S = 15.0


@dataclass
class Deployment:
    """The running nodes of one run."""

    run_id: str
    backend: str
    reason: str
    token: str
    local: Node
    remote: Node
    health: dict[str, Any] = field(default_factory=dict)
    leases: list[Any] = field(default_factory=list, repr=False)
    remote_conn: Any = field(default=None, repr=False)  # sshconn.Connection of an ssh remote

    def lost(self) -> str | None:
        """Why the remote became unreachable (its ssh connection dropped), or None."""
        conn = self.remote_conn
        if conn is not None and not conn.alive():
            return f"ssh connection to {conn.spec.name} dropped"
        return None

    @property
    def nodes(self) -> list[Node]:
        return [self.local, self.remote]

    def death(self, role: str) -> str | None:
        """Why the ``role`` node is no longer running, in a few words (None: it runs).

        Read from the backend (docker: the container's state, OOMKilled and exit
        code; netns: the agent process and its memory cgroup's OOM counter; an ssh
        remote: its connection), so a failed configuration can say "OOM-killed"
        rather than "connection reset"."""
        node = self.local if role == "local" else self.remote
        if role == "remote" and self.remote_conn is not None:
            return self.lost()  # an ssh remote: what this host can see is its connection
        if node.backend == "docker":
            from testbed.deploy import docker as dk
            return dk.death_cause(node)
        from testbed.deploy import netns as ns
        return ns.death_cause(node)

    def environment(self) -> dict[str, Any]:
        """JSON-ready facts for environment.json (no token)."""
        return {"backend": self.backend, "backend_reason": self.reason,
                "nodes": {n.name: n.environment() for n in self.nodes}}


def choose_backend(backend: str = "auto") -> tuple[str, str]:
    """Resolve ``auto``: docker when a daemon answers, else netns. Returns
    (backend, reason)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}",
                          field="backend")
    if backend == "netns":
        return "netns", "asked for netns"
    from testbed.deploy import docker as dk

    ok, why = dk.daemon_available()
    if backend == "docker":
        if not ok:
            raise NodeError(f"backend docker asked for, but {why}")
        return "docker", "asked for docker"
    return ("docker", f"auto: {why}") if ok else ("netns", f"auto: {why}; using network namespaces")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    mine = None
    if previous in (signal.SIG_DFL, None):
        def interrupt(signum, frame):  # noqa: ANN001 - signal API
            raise KeyboardInterrupt(f"signal {signum}")
        mine = owner_only(interrupt)
        signal.signal(signal.SIGTERM, mine)
    try:
        yield
    finally:
        if mine is not None and signal.getsignal(signal.SIGTERM) is mine:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the body runs; deliver them afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in sigs}

    def hold(signum, frame):  # noqa: ANN001 - signal API
        pending.append(signum)

    guarded = owner_only(hold)
    for s in sigs:
        signal.signal(s, guarded)
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, previous[s])
    # Reached only when the body succeeded: now deliver what was held back.
    if pending:
        signum = pending[0]
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt(f"signal {signum}")


def _forget_shaping(run_id: str | None, pids: set[int]) -> list[str]:
    """Drop the link layer's records of the run's shaped interfaces.

    The qdiscs themselves lived on the run's interfaces (inside its namespaces
    or containers) and went with them; only records remain. A record is dropped
    when its namespace is gone and it was this run's (a ``testbed-<run>-*``
    namespace or one of the run's container pids); live interfaces and other
    runs' records are left alone.
    """
    try:
        from testbed.link import state as link_state
    except ImportError:
        return []
    folder = link_state.state_dir()
    prefix = f"testbed-{run_id}-" if run_id else "testbed-"
    dropped = []
    for target, record in link_state.records(folder):
        ours = (target.netns or "").startswith(prefix) or (target.pid is not None and target.pid in pids)
        inode = target.namespace_inode()
        gone = inode is None or (record.get("netns_inode") not in (None, inode))
        if ours and gone:
            link_state.remove(target, folder)
            dropped.append(f"shaping record {target}")
    return dropped


def _teardown(run_id: str, backend: str) -> list[str]:
    if backend == "docker":
        from testbed.deploy import docker as dk

        pids = dk.container_pids(run_id)
        return dk.remove_run(run_id) + _forget_shaping(run_id, pids)
    from testbed.deploy import netns as ns

    return ns.remove_run(run_id) + _forget_shaping(run_id, set())


def _agent_client_available() -> bool:
    try:
        return importlib.util.find_spec("testbed.deploy.agent_client") is not None
    except ImportError:
        return False


@contextlib.contextmanager
def deploy(run_id: str, local: NodeSpec, remote: NodeSpec, backend: str = "auto",
           token: str | None = None, *, image: str | None = None,
           agent_argv: Sequence[str] | None = None, ready_timeout_s: float = 90.0,
           health: bool | None = None, lease_s: float | None = LEASE_S,
           ssh: Any | None = None) -> Iterator[Deployment]:
    """Start the local and remote nodes; tear them down on exit, whatever happens.

    Args:
        run_id: names and labels everything created (see ``check_run_id``).
        local, remote: limits per node.
        backend: ``auto`` | ``docker`` | ``netns``. The choice and why is logged
            and kept in ``Deployment.backend`` / ``.reason``.
        token: the run's agent token (a random one when None); ``Deployment.token``.
        image: docker node image; default: ``image.ensure_node_image()`` (builds
            it when nodes/ or the Dockerfile changed).
        agent_argv: program replacing ``python -m nodes.agent`` (same arguments
            appended) — for backend tests; with it, readiness is the control port
            accepting connections, without it a ``health`` request.
        ready_timeout_s: per node, until its agent answers.
        health: force / skip the health probe (default: when the real agent is used).
        lease_s: agents exit when no lease has been held for this long (see the module
            docstring); only with the health probe (a stand-in program holds no lease).
            None: agents run until teardown removes them.
        ssh: a ``testbed.deploy.ssh.SshSpec``: the remote node runs on that host
            (``backend`` then names the local node's).

    Raises:
        NodeError: a node could not be started (after tearing down what exists).
        ConfigError: bad run id or backend name.
    """
    check_run_id(run_id)
    if ssh is not None:
        yield from _deploy_ssh(run_id, local, remote, backend, token, ssh, agent_argv=agent_argv,
                               ready_timeout_s=ready_timeout_s, health=health, lease_s=lease_s, image=image)
        return
    chosen, reason = choose_backend(backend)
    log.info("deploy %s: backend %s (%s)", run_id, chosen, reason)
    token = token or secrets.token_hex(16)
    specs = {"local": local, "remote": remote}
    if health is None:
        health = agent_argv is None and _agent_client_available()
    lease_s = lease_s if health else None
    leases: list[Any] = []
    with _sigterm_as_interrupt():
        try:
            if chosen == "docker":
                from testbed.deploy import docker as dk
                from testbed.deploy.image import ensure_node_image

                image = image or ensure_node_image()
                # Use the program as entrypoint, keeping the agent's arguments.
                nodes, checks = dk.start(run_id, specs, token, image=image, entrypoint=agent_argv,
                                         lease_s=lease_s)
            else:
                from testbed.deploy import netns as ns

                nodes, checks = ns.start(run_id, specs, token, agent_argv=agent_argv,
                                         lease_s=lease_s)
            answers = {r: _ready_and_leased(nodes[r], token, checks[r], ready_timeout_s,
                                            health, lease_s, leases) for r in ROLES}
            yield Deployment(run_id=run_id, backend=chosen, reason=reason, token=token,
                             local=nodes["local"], remote=nodes["remote"],
                             health={r: a for r, a in answers.items() if a is not None},
                             leases=leases)
        finally:
            for lease in leases:
                lease.close()
            with _signals_deferred():
                removed = _teardown(run_id, chosen)
            log.info("teardown %s: removed %d objects", run_id, len(removed))


def _deploy_ssh(run_id: str, local: NodeSpec, remote: NodeSpec, backend: str, token: str | None, ssh: Any, *,
                agent_argv: Sequence[str] | None, ready_timeout_s: float, health: bool | None,
                lease_s: float | None, image: str | None) -> Iterator[Deployment]:
    """``deploy`` with the remote node on another host (see the module docstring)."""
    from testbed.deploy import ssh as remote_ssh
    from testbed.link.target import Target

    chosen, why = choose_backend(backend)
    reason = f"local node: {chosen} ({why}); remote on {ssh.host.name} over ssh ({ssh.runtime})"
    log.info("deploy %s: %s", run_id, reason)
    token = token or secrets.token_hex(16)
    if health is None:
        health = agent_argv is None and _agent_client_available()
    lease_s = lease_s if health else None
    leases: list[Any] = []
    conn = None
    with _sigterm_as_interrupt():
        try:
            if chosen == "docker":
                from testbed.deploy import docker as dk
                from testbed.deploy.image import ensure_node_image

                image = image or ensure_node_image()
                local_node, local_check = dk.start_local(run_id, local, token, image=image, entrypoint=agent_argv,
                                                         lease_s=lease_s)
            else:
                from testbed.deploy import netns as ns

                local_node, local_check = ns.start_local(run_id, local, token, agent_argv=agent_argv,
                                                         lease_s=lease_s)
            answers = {"local": _ready_and_leased(local_node, token, local_check, ready_timeout_s, health,
                                                  lease_s, leases)}
            # The downlink arrives at the local node: shaped on its data interface's ingress.
            up = local_node.shaping
            downlink = Target(up.dev, netns=up.netns, pid=up.pid, ingress=True)
            started = remote_ssh.start(run_id, remote, token, ssh, lease_s=lease_s, shaping=downlink,
                                       image=image)
            conn = started.conn
            answers["remote"] = _ready_and_leased(started.node, token, started.check, ready_timeout_s, health,
                                                  lease_s, leases)
            yield Deployment(run_id=run_id, backend="ssh", reason=reason, token=token, local=local_node,
                             remote=started.node, health={r: a for r, a in answers.items() if a is not None},
                             leases=leases, remote_conn=conn)
        finally:
            for lease in leases:
                lease.close()
            with _signals_deferred():
                removed = _teardown_ssh(run_id, chosen, conn)
            log.info("teardown %s: removed %d objects", run_id, len(removed))


def _teardown_ssh(run_id: str, local_backend: str, conn: Any) -> list[str]:
    """Remote side first (while the connection may still be up), then this host's."""
    from testbed.deploy import ssh as remote_ssh

    removed: list[str] = []
    try:
        removed += remote_ssh.remove_run(run_id, conn)
    finally:
        if conn is not None:
            conn.close()
        removed += _teardown(run_id, local_backend)
    return removed


def _ready_and_leased(node: Node, token: str, check: Any, timeout_s: float, health: bool,
                      lease_s: float | None, leases: list[Any]) -> dict | None:
    """Wait for one node, then take its lease at once: its grace runs from its start,
    so it must not wait for the other node to come up too."""
    from testbed.deploy.ready import wait_ready

    answer = wait_ready(node, token, check, timeout_s=timeout_s, health=health)
    if lease_s is not None:
        from testbed.deploy.agent_client import Lease

        leases.append(Lease(node.control_host, node.control_port, token, node.name))
    return answer


def cleanup(run_id: str | None = None) -> list[str]:
    """Remove what a killed run left: containers and networks labelled
    ``testbed.run=<run_id>``, its namespaces, veths, cgroups and agent processes,
    the link layer's records of its shaped interfaces, and on an ssh run's remote
    host its agent process or container and workdir (from the run's state record).

    ``run_id=None``: every run whose orchestrator process is gone (a live run of
    another process is left alone; name it to remove it anyway). Returns what
    was removed, one line each."""
    if run_id is not None:
        check_run_id(run_id)
    removed: list[str] = []
    from testbed.deploy import docker as dk
    from testbed.deploy import netns as ns
    from testbed.deploy import owner

    ok, why = dk.daemon_available()
    if ok:
        runs = [run_id] if run_id else sorted(
            r for r, owners in dk.run_owners().items() if not any(owner.alive(o) for o in owners))
        for rid in runs:
            pids = dk.container_pids(rid)
            removed += dk.remove_run(rid) + _forget_shaping(rid, pids)
    else:
        log.info("cleanup: skipping Docker (%s)", why)
    from testbed.deploy import ssh as remote_ssh

    runs = [run_id] if run_id else sorted(
        r for r, o in remote_ssh.run_owners().items() if not owner.alive(o))
    for rid in runs:  # the remote side of ssh runs, reconnecting from their state records
        removed += remote_ssh.remove_run(rid)
    runs = [run_id] if run_id else sorted(
        r for r, o in ns.run_owners().items() if not owner.alive(o))
    for rid in runs:
        removed += ns.remove_run(rid) + _forget_shaping(rid, set())
    from testbed.metrics.monitor import remove_dead_targets
    return removed + remove_dead_targets()
