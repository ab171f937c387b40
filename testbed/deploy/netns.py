"""The netns backend: nodes as processes in network namespaces, no Docker.

Per run, per role (``local``, ``remote``):

- a named network namespace ``testbed-<run>-<role>``;
- a CONTROL veth pair: ``tbc<tag><l|r>`` in the root namespace <-> ``ctl0`` inside,
  a /30 of its own, never shaped — the orchestrator reaches the agent there;
- one DATA veth pair joining the two namespaces (``data0`` in each), which is the
  link the shaper acts on: ``Node.shaping = Target(dev="data0", netns=<name>)``;
- the agent, ``python -m nodes.agent``, started in the namespace with the host's
  interpreter and the ``nodes`` package the orchestrator imports (site-packages
  when installed, the checkout otherwise), inside a cgroup carrying the node's CPU / memory limits where the
  host allows (see ``testbed.deploy.cgroups``), without any capability (util-linux
  ``setpriv`` empties its bounding set and sets no-new-privileges, so the agent
  cannot reshape its own link; it stays uid 0 because the host interpreter may live
  where no other user can read it), and, with ``lease_s``, leased: it exits once the
  orchestrator's lease connection has been gone that long (``nodes.lease``), so a
  SIGKILLed orchestrator does not leave agents running until ``cleanup``.

With an SSH remote only the local node lives here (``start_local``): its data veth
``tbd<tag>l`` then ends in the root namespace, which routes and masquerades its
traffic toward the remote machine (``testbed.deploy.forwarding``); the link is
shaped on the node's ``data0``, egress for the uplink and ingress (through an IFB
device in the namespace) for the downlink.

``<tag>`` is 6 hex digits of sha1(run id): interface names are limited to 15
characters, and the names must be derivable from the run id alone so that
``cleanup(run_id)`` finds what a killed run left. Before creating anything a
state file (``/run/testbed/netns/<run>.json``) records what is about to exist, so
``cleanup()`` without a run id finds runs too. Netlink calls live in
``testbed.deploy.kernel``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from testbed.deploy import cgroups, kernel, owner
from testbed.deploy.cpus import format_cpuset
from testbed.deploy.node import CONTROL_PORT, DATA_PORT, METRICS_PORT, ROLES, Node, NodeSpec, make_target
from testbed.errors import NodeError

log = logging.getLogger("testbed.deploy")

STATE_DIR = Path("/run/testbed/netns")
DATA_DEV = "data0"
CONTROL_DEV = "ctl0"
# Control /30s and the data /30 of a run come out of one 10.213.X.0/24; X is
# picked so that no root-namespace address already lies in it.
SUBNET_PREFIX = "10.213"


def netns_name(run_id: str, role: str) -> str:
    return f"testbed-{run_id}-{role}"


def tag(run_id: str) -> str:
    return hashlib.sha1(run_id.encode()).hexdigest()[:6]


def host_links(run_id: str) -> list[str]:
    """Root-namespace interface names a run may own (control ends; the data veth's
    temporary name while it is still being moved)."""
    t = tag(run_id)
    return [f"tbc{t}l", f"tbc{t}r", f"tbd{t}l"]


def _addresses(x: int) -> dict[str, dict[str, str]]:
    p = f"{SUBNET_PREFIX}.{x}"
    return {"local": {"host": f"{p}.1", "ctl": f"{p}.2", "data": f"{p}.9"},
            "remote": {"host": f"{p}.5", "ctl": f"{p}.6", "data": f"{p}.10"}}


def _pick_subnet() -> int:
    used = {a for a in kernel.root_addresses() if a.startswith(SUBNET_PREFIX + ".")}
    used_x = {int(a.split(".")[2]) for a in used}
    free = [x for x in range(256) if x not in used_x]
    if not free:
        raise NodeError(f"no free {SUBNET_PREFIX}.X.0/24 for a control network")
    return random.choice(free)


# --- state file ------------------------------------------------------------------

def _state_path(run_id: str) -> Path:
    return STATE_DIR / f"{run_id}.json"


def _save_state(run_id: str, state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = _state_path(run_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, _state_path(run_id))


def _load_state(run_id: str) -> dict:
    try:
        return json.loads(_state_path(run_id).read_text())
    except (OSError, ValueError):
        return {}


# --- start -------------------------------------------------------------------------

def _plumb(run_id: str, addrs: dict) -> None:
    t = tag(run_id)
    for role in ROLES:
        kernel.netns_create(netns_name(run_id, role))
    for role, suffix in (("local", "l"), ("remote", "r")):
        ns, host_if = netns_name(run_id, role), f"tbc{t}{suffix}"
        kernel.veth_create(host_if, CONTROL_DEV, ns)
        kernel.link_configure(host_if, None, address=addrs[role]["host"], prefixlen=30)
        kernel.link_configure(CONTROL_DEV, ns, address=addrs[role]["ctl"], prefixlen=30)
    # Data pair: one end is born in the local namespace as data0; the other
    # starts in the root namespace under a unique name (data0 would clash with
    # other runs there), then moves into the remote namespace and is renamed.
    tmp = f"tbd{t}l"
    local_ns, remote_ns = netns_name(run_id, "local"), netns_name(run_id, "remote")
    kernel.veth_create(tmp, DATA_DEV, local_ns)
    kernel.link_move(tmp, remote_ns)
    kernel.link_configure(tmp, remote_ns, new_name=DATA_DEV, address=addrs["remote"]["data"],
                          prefixlen=30)
    kernel.link_configure(DATA_DEV, local_ns, address=addrs["local"]["data"], prefixlen=30)


# Joins the cgroups given before "--" (writing its own pid), then execs the rest.
_JOIN_CGROUPS = 'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 97; shift; done; shift; exec "$@"'


def _drop_privileges() -> list[str]:
    """The command prefix that starts the agent with no capabilities at all (run after
    ``nsenter``, which needs them). Empty when setpriv is missing: the agent
    then runs as root, which the log says."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        log.warning("setpriv (util-linux) not found: netns agents keep root's capabilities")
        return []
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]


def _nodes_pythonpath() -> dict[str, str]:
    """``PYTHONPATH`` for the agent so it runs the ``nodes`` package this process imports.

    Installed (site-packages): none, the same interpreter finds it. From a checkout
    (an editable install, or the tests' working directory): the folder holding it.
    The agent starts in its own working directory, so nothing else would point there.
    """
    from testbed.resources import package_path

    root = package_path("nodes").parent
    site_dirs = {Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages())}
    return {} if root in site_dirs else {"PYTHONPATH": str(root)}


def _spawn(run_id: str, role: str, addrs: dict, group: cgroups.Group, spec: NodeSpec,
           token: str, workdir: str, agent_argv: Sequence[str] | None,
           lease_s: float | None = None) -> subprocess.Popen:
    ns = netns_name(run_id, role)
    a = addrs[role]
    args = ["--name", role,
            "--control-listen", f"{a['ctl']}:{CONTROL_PORT}",
            "--data-listen", f"{a['data']}:{DATA_PORT}",
            "--metrics-listen", f"{a['ctl']}:{METRICS_PORT}",
            "--workdir", workdir]
    if lease_s is not None:
        args += ["--lease-s", f"{lease_s:g}"]
    if spec.threads:
        args += ["--threads", str(spec.threads)]
    program = list(agent_argv) if agent_argv else [sys.executable, "-m", "nodes.agent"]
    # nsenter enters the network namespace only; `ip netns exec` would also
    # remount /sys in a new mount namespace, hiding /sys/fs/cgroup, where the
    # agent reads its own CPU counters.
    argv = ["sh", "-c", _JOIN_CGROUPS, "sh", *group.procs_files, "--",
            "nsenter", f"--net={kernel.NETNS_DIR}/{ns}", "--", *_drop_privileges(),
            *program, *args]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "LANG": "C.UTF-8",
           **_nodes_pythonpath(), "PYTHONUNBUFFERED": "1", "TESTBED_TOKEN": token}
    logf = open(os.path.join(workdir, "agent.log"), "ab")
    cpuset = spec.cpuset

    def pin() -> None:
        # Runs in the child before exec: the affinity is inherited through
        # sh, ip netns exec and the agent's threads.
        if cpuset:
            os.sched_setaffinity(0, cpuset)

    try:
        # A session of its own: a Ctrl-C in the terminal reaches the
        # orchestrator only, which then tears the nodes down in order. The flip
        # side, that nothing kills the agent when the orchestrator dies, is the
        # lease's job. Not PR_SET_PDEATHSIG: it fires when the *thread* that
        # forked exits (deploy() may run in a worker thread that ends early), and
        # the docker backend has no such parent at all.
        return subprocess.Popen(argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=pin if cpuset else None)
    finally:
        logf.close()


def _log_tail(workdir: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(workdir, "agent.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _alive_check(proc: subprocess.Popen, workdir: str) -> Callable[[], tuple[bool, int | None, str]]:
    def check() -> tuple[bool, int | None, str]:
        code = proc.poll()
        if code is None:
            return True, None, ""
        return False, (97 if code == 97 else code), (
            "cannot join the node's cgroup" if code == 97 else _log_tail(workdir))
    return check


def death_cause(node: Node) -> str | None:
    """Why a netns node's agent no longer runs (None while it runs)."""
    from testbed.deploy.docker import describe_exit

    pid = int(node.details["pid"])
    code: int | None = None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        elif _running(pid):
            return None
    except ChildProcessError:  # not our child (cleanup from another process) or reaped already
        if _running(pid):
            return None
    return describe_exit(code, oom=cgroups.oom_kills(node.details.get("cgroups") or []) > 0,
                         memory=node.memory_bytes)


def start(run_id: str, specs: dict[str, NodeSpec], token: str, *,
          agent_argv: Sequence[str] | None = None, lease_s: float | None = None,
          ) -> tuple[dict[str, Node], dict[str, Callable]]:
    """Create namespaces, veths, cgroups and agents; return Nodes and liveness checks.

    ``lease_s``: the agents exit when nobody has held their lease that long.

    Does not clean up on failure: the caller calls ``remove_run``, which works
    from names and the state file whatever stage was reached.
    """
    x = _pick_subnet()
    addrs = _addresses(x)
    state = {"run_id": run_id, "owner": owner.tag(), "netns": [netns_name(run_id, r) for r in ROLES],
             "links": host_links(run_id), "cgroups": [], "pids": [], "workdirs": []}
    _save_state(run_id, state)
    _plumb(run_id, addrs)
    nodes, checks = {}, {}
    for role in ROLES:
        spec = specs[role]
        group = cgroups.create(f"testbed-{run_id}-{role}", spec.cpus, spec.memory_bytes, spec.cpu_period_us)
        state["cgroups"] += group.dirs
        workdir = tempfile.mkdtemp(prefix=f"testbed-{run_id}-{role}-")
        state["workdirs"].append(workdir)
        _save_state(run_id, state)
        proc = _spawn(run_id, role, addrs, group, spec, token, workdir, agent_argv, lease_s)
        state["pids"].append(proc.pid)
        _save_state(run_id, state)
        ns = netns_name(run_id, role)
        nodes[role] = Node(
            name=role, backend="netns",
            control_host=addrs[role]["ctl"], control_port=CONTROL_PORT,
            metrics_host=addrs[role]["ctl"], metrics_port=METRICS_PORT,
            data_host=addrs[role]["data"], data_port=DATA_PORT,
            shaping=make_target(DATA_DEV, netns=ns),
            cpus=group.cpus, memory_bytes=group.memory_bytes, clock_shared=True,
            details={"netns": ns, "pid": proc.pid, "cgroups": group.dirs, "limits": group.how,
                     "workdir": workdir, "python": sys.executable,
                     "cpuset": format_cpuset(spec.cpuset) if spec.cpuset else None,
                     "cpu_period_us": spec.cpu_period_us if group.cpus is not None else None},
        )
        checks[role] = _alive_check(proc, workdir)
    return nodes, checks


def start_local(run_id: str, spec: NodeSpec, token: str, *, agent_argv: Sequence[str] | None = None,
                lease_s: float | None = None) -> tuple[Node, Callable]:
    """The local node alone, routed out through this host (for a remote on another
    machine): namespace, control veth, a data veth to the root namespace with the
    default route over it, forwarding + masquerade, cgroup, agent. Returns the Node
    and its liveness check; like ``start``, leaves cleaning up to ``remove_run``."""
    from testbed.deploy import forwarding

    x = _pick_subnet()
    a = _addresses(x)
    t = tag(run_id)
    ns, host_ctl, host_data = netns_name(run_id, "local"), f"tbc{t}l", f"tbd{t}l"
    state = {"run_id": run_id, "owner": owner.tag(), "netns": [ns], "links": host_links(run_id),
             "cgroups": [], "pids": [], "workdirs": [], "routed": True}
    _save_state(run_id, state)
    kernel.netns_create(ns)
    kernel.veth_create(host_ctl, CONTROL_DEV, ns)
    kernel.link_configure(host_ctl, None, address=a["local"]["host"], prefixlen=30)
    kernel.link_configure(CONTROL_DEV, ns, address=a["local"]["ctl"], prefixlen=30)
    gateway = a["remote"]["data"]  # the remote's slot of the data /30 is this host's end now
    kernel.veth_create(host_data, DATA_DEV, ns)
    kernel.link_configure(host_data, None, address=gateway, prefixlen=30)
    kernel.link_configure(DATA_DEV, ns, address=a["local"]["data"], prefixlen=30)
    kernel.default_route(ns, gateway)
    state.update(forwarding.allow(run_id, host_data, f"{a['local']['data']}/30"))
    _save_state(run_id, state)
    group = cgroups.create(f"testbed-{run_id}-local", spec.cpus, spec.memory_bytes, spec.cpu_period_us)
    state["cgroups"] += group.dirs
    workdir = tempfile.mkdtemp(prefix=f"testbed-{run_id}-local-")
    state["workdirs"].append(workdir)
    _save_state(run_id, state)
    proc = _spawn(run_id, "local", a, group, spec, token, workdir, agent_argv, lease_s)
    state["pids"].append(proc.pid)
    _save_state(run_id, state)
    node = Node(
        name="local", backend="netns",
        control_host=a["local"]["ctl"], control_port=CONTROL_PORT,
        metrics_host=a["local"]["ctl"], metrics_port=METRICS_PORT,
        data_host=a["local"]["data"], data_port=DATA_PORT,
        shaping=make_target(DATA_DEV, netns=ns),
        cpus=group.cpus, memory_bytes=group.memory_bytes, clock_shared=True,
        details={"netns": ns, "pid": proc.pid, "cgroups": group.dirs, "limits": group.how,
                 "workdir": workdir, "python": sys.executable, "routed_via": host_data,
                 "cpuset": format_cpuset(spec.cpuset) if spec.cpuset else None,
                 "cpu_period_us": spec.cpu_period_us if group.cpus is not None else None},
    )
    return node, _alive_check(proc, workdir)


# --- removal ---------------------------------------------------------------------

def _pids_in_netns(names: list[str]) -> set[int]:
    inodes = {i for i in (kernel.netns_inode(n) for n in names) if i is not None}
    found: set[int] = set()
    if not inodes:
        return found
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _is_ours(pid: int, run_id: str) -> bool:
    """Guard against pid reuse: a recorded pid is killed only if it still runs
    something of this run (its command line names the run's namespace)."""
    try:
        return f"testbed-{run_id}-".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pids: set[int], timeout_s: float = 3.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = {p for p in pids if _running(p)}
            if not pids:
                return
            time.sleep(0.05)


def _running(pid: int) -> bool:
    # Reap our own children so they do not linger as zombies.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def remove_run(run_id: str) -> list[str]:
    """Remove everything the run created (from its state file and its names),
    tolerating any of it being gone already."""
    state = _load_state(run_id)
    names = state.get("netns") or [netns_name(run_id, r) for r in ROLES]
    removed: list[str] = []
    victims = _pids_in_netns(names)
    victims |= {p for p in state.get("pids", []) if _is_ours(p, run_id)}
    group_dirs = state.get("cgroups", []) or cgroups.find(f"testbed-{run_id}-")
    victims |= cgroups.pids(group_dirs)
    victims.discard(os.getpid())
    if victims:
        _kill(victims)
        removed += [f"process {p}" for p in sorted(victims)]
    links = host_links(run_id)
    for link in links:
        if kernel.link_delete(link):
            removed.append(f"veth {link}")
    for ns in names:
        if kernel.netns_remove(ns):
            removed.append(f"netns {ns}")
    left = kernel.wait_links_gone(links)
    if state.get("routed") or not state:  # a routed local node's rules (or unknown: look)
        from testbed.deploy import forwarding

        removed += forwarding.remove_tagged(run_id) + forwarding.restore(state)
    for d in cgroups.remove(group_dirs):
        removed.append(f"cgroup {d}")
    for w in state.get("workdirs", []):
        if os.path.isdir(w):
            shutil.rmtree(w, ignore_errors=True)
            removed.append(f"workdir {w}")
    if left:
        raise NodeError(f"interfaces still present after teardown: {', '.join(left)}")
    try:
        _state_path(run_id).unlink()
    except FileNotFoundError:
        pass
    return removed


def run_owners() -> dict[str, str]:
    """{run id: owner tag ("" when unknown)} of runs with a state file or a
    namespace named like ours."""
    ids = {p.stem for p in STATE_DIR.glob("*.json")} if STATE_DIR.is_dir() else set()
    for ns in kernel.netns_list():
        for role in ROLES:
            if ns.startswith("testbed-") and ns.endswith(f"-{role}"):
                ids.add(ns[len("testbed-"):-len(role) - 1])
    return {i: _load_state(i).get("owner", "") for i in ids}
