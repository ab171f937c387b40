"""Both deploy backends against the real thing: Docker daemon, netns, cgroups.

Each test deploys two nodes running the real agent (or, where a test needs an
agent that fails, a one-line stand-in program), checks what the kernel and the
daemon report, and checks that nothing named or labelled with the run id is
left afterwards — after a normal exit, an exception mid-deploy, SIGTERM, and a
SIGKILLed orchestrator followed by ``cleanup(run_id)``. What is left is read
with the system tools (docker CLI, ip, /proc, /sys/fs/cgroup), not with the code
under test. Run ids are unique per test, so parallel work never collides.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from testbed.deploy import NodeSpec, cleanup, deploy
from testbed.deploy import netns as netns_backend
from testbed.errors import NodeError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def _docker_ok() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (netns, cgroups, Docker)")


BACKENDS = ["netns", "docker"]


@pytest.fixture(scope="module")
def node_image() -> str:
    """The node image (built here when setup.sh did not already)."""
    from testbed.deploy.image import ensure_node_image

    return ensure_node_image()


@pytest.fixture
def run_id(request):
    rid = "tbt" + secrets.token_hex(4)
    yield rid
    cleanup(rid)  # whatever a failing test left


def _prepare(backend: str, request) -> None:
    _need_root()
    if backend == "docker":
        assert _docker_ok(), "no Docker daemon (setup.sh starts one)"
        request.getfixturevalue("node_image")


# --- reading state with system tools -------------------------------------------

def _docker_objects(run_id: str) -> list[str]:
    out = []
    for kind in (["ps", "-a"], ["network", "ls"]):
        r = subprocess.run(["docker", *kind, "-q", "--filter", f"label=testbed.run={run_id}"],
                           capture_output=True, text=True)
        out += r.stdout.split()
    return out


def _leftovers(run_id: str) -> list[str]:
    left = []
    if _docker_ok():
        left += [f"docker {o}" for o in _docker_objects(run_id)]
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += [f"netns {line.split()[0]}" for line in ns.splitlines() if f"testbed-{run_id}-" in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names = netns_backend.host_links(run_id)
    left += [f"link {n}" for n in names if f" {n}:" in links or f" {n}@" in links]
    for ctrl in ("cpu", "memory"):
        base = Path("/sys/fs/cgroup", ctrl)
        if base.is_dir():
            left += [f"cgroup {p}" for p in base.rglob(f"testbed-{run_id}-*") if p.is_dir()]
    left += [f"workdir {p}" for p in Path("/tmp").glob(f"testbed-{run_id}-*")]
    if (netns_backend.STATE_DIR / f"{run_id}.json").exists():
        left.append("state file")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"testbed-{run_id}-".encode() in (proc / "cmdline").read_bytes():
                left.append(f"process {proc.name}")
        except OSError:
            pass
    return left


def _assert_nothing_left(run_id: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := _leftovers(run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


def _cgroup_file(pid: int, controller: str, name: str) -> str:
    """A cgroup v1 file of the group ``pid`` is in (the hierarchy this host has)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return Path("/sys/fs/cgroup", controller, path.lstrip("/"), name).read_text().strip()
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def _agent_pid(node) -> int:
    return node.details["pid"]


def _in_netns(node, code: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` inside ``node``'s network namespace (host interpreter)."""
    ns_path = node.shaping.netns_path
    return subprocess.run(["nsenter", f"--net={ns_path}", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30)


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _assert_locked_down(dep, backend: str, tmp_path: Path) -> None:
    """The agents hold no capability (so none can reshape its own link), containers
    run unprivileged with a pids limit, and the shaper still shapes from the host."""
    from testbed.deploy import docker as dk
    from testbed.link.profile import Direction
    from testbed.link.shaper import Shaper

    for n in dep.nodes:
        status = _proc_status(_agent_pid(n))
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"] == "1", status
        if backend == "docker":
            assert status["Uid"].split()[0] == dk.AGENT_USER.split(":")[0], status
            info = json.loads(subprocess.run(["docker", "inspect", n.details["container"]],
                                             capture_output=True, text=True, check=True).stdout)[0]
            host = info["HostConfig"]
            assert not host.get("CapAdd") and host["CapDrop"] == ["ALL"]
            assert host["PidsLimit"] == dk.PIDS_LIMIT and host["Privileged"] is False
            assert any("no-new-privileges" in o for o in host["SecurityOpt"])
            assert info["Config"]["User"] == dk.AGENT_USER
            assert int(_cgroup_file(_agent_pid(n), "pids", "pids.max")) == dk.PIDS_LIMIT
    # The shaper acts from the host through the node's namespace: no capability needed
    # inside. A rate on local's data interface reaches the kernel.
    shaper = Shaper(dep.local.shaping, state_dir=tmp_path / "shaping")
    try:
        assert shaper.apply(Direction(rate_bps=5_000_000)) in ("tbf", "htb")
        assert shaper.show()["qdiscs"]
    finally:
        shaper.clear()
        shaper.close()


# --- tests ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_nodes_limits_paths_and_teardown(backend, run_id, request, tmp_path):
    _prepare(backend, request)
    from pyroute2 import IPRoute

    local, remote = NodeSpec(cpus=0.5, memory_bytes=GiB // 2), NodeSpec(cpus=1.5)
    with deploy(run_id, local, remote, backend=backend) as dep:
        assert dep.backend == backend
        assert dep.local.name == "local" and dep.remote.name == "remote"
        assert set(dep.health) == {"local", "remote"}  # the real agent answered health

        # Limits, read back from the kernel's cgroup files of the agent's process.
        lpid, rpid = _agent_pid(dep.local), _agent_pid(dep.remote)
        assert int(_cgroup_file(lpid, "cpu", "cpu.cfs_quota_us")) == 50_000
        assert int(_cgroup_file(lpid, "cpu", "cpu.cfs_period_us")) == 100_000
        assert int(_cgroup_file(rpid, "cpu", "cpu.cfs_quota_us")) == 150_000
        assert int(_cgroup_file(lpid, "memory", "memory.limit_in_bytes")) == GiB // 2
        assert dep.local.cpus == 0.5 and dep.local.memory_bytes == GiB // 2
        assert dep.remote.cpus == 1.5 and dep.remote.memory_bytes is None
        if backend == "docker":
            info = json.loads(subprocess.run(["docker", "inspect", dep.local.details["container"]],
                                             capture_output=True, text=True, check=True).stdout)[0]
            # a CFS quota over the node's period (docker.py no longer uses NanoCpus)
            host = info["HostConfig"]
            assert host["CpuQuota"] / host["CpuPeriod"] == 0.5 and not host["NanoCpus"]
            assert info["HostConfig"]["Memory"] == GiB // 2
            assert info["Config"]["Labels"]["testbed.run"] == run_id
        _assert_locked_down(dep, backend, tmp_path)

        # Control (and metrics) from the host, over the unshaped path.
        for n in dep.nodes:
            socket.create_connection((n.control_host, n.control_port), timeout=5).close()
            with urllib.request.urlopen(f"http://{n.metrics_host}:{n.metrics_port}/metrics",
                                        timeout=5) as r:
                assert r.status == 200
            assert n.control_host != n.data_host

        # The shaping target names the interface that carries the DATA address.
        for n in dep.nodes:
            with IPRoute(netns=n.shaping.netns_path) as ip:
                idx = ip.link_lookup(ifname=n.shaping.dev)
                assert idx, (n.name, n.shaping)
                addrs = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx[0], family=2)]
            assert n.data_host in addrs, (n.shaping, addrs)

        # Data path: from inside local's namespace to remote's data port.
        r = _in_netns(dep.local, "import socket; socket.create_connection("
                      f"({dep.remote.data_host!r}, {dep.remote.data_port}), timeout=5).close()")
        assert r.returncode == 0, r.stderr
        # ...and through the agents themselves.
        client = dep.local.client(dep.token)
        try:
            client.connect_peer(dep.remote.data_host, dep.remote.data_port)
        finally:
            client.close()
        assert _leftovers(run_id)  # the checker does see a live run
    _assert_nothing_left(run_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_agent_failing_mid_deploy_leaves_nothing(backend, run_id, request):
    """An agent that dies at start: NodeError with its exit status and output,
    after the networks/namespaces and the other node were already created."""
    _prepare(backend, request)
    program = ["python3" if backend == "docker" else sys.executable, "-c",
               "import sys; print('agent boom', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(NodeError) as e:
        with deploy(run_id, NodeSpec(cpus=1), NodeSpec(cpus=1), backend=backend,
                    agent_argv=program, ready_timeout_s=30):
            pytest.fail("deploy must not yield")
    assert e.value.exit_status == 3 and "agent boom" in (e.value.stderr or "")
    _assert_nothing_left(run_id)


def test_netns_half_built_state_is_torn_down(run_id, monkeypatch):
    """Failure between creating the data veth and moving it: the temporary
    root-namespace veth, namespaces and state file are all removed."""
    _need_root()
    from testbed.deploy import kernel

    def boom(ifname, to_ns):
        raise NodeError("simulated failure while moving " + ifname)

    monkeypatch.setattr(kernel, "link_move", boom)
    with pytest.raises(NodeError, match="simulated"):
        with deploy(run_id, NodeSpec(), NodeSpec(), backend="netns"):
            pass
    _assert_nothing_left(run_id)


def test_docker_half_built_state_is_torn_down(run_id, monkeypatch, request):
    """Failure after the local container exists, before the remote one does."""
    _prepare("docker", request)
    from testbed.deploy import docker as dk

    real = dk._create_container

    def second_fails(client, rid, role, *a, **kw):
        if role == "remote":
            assert _docker_objects(rid)  # networks + local container exist now
            raise NodeError("simulated failure", node=role)
        return real(client, rid, role, *a, **kw)

    monkeypatch.setattr(dk, "_create_container", second_fails)
    with pytest.raises(NodeError, match="simulated"):
        with deploy(run_id, NodeSpec(), NodeSpec(), backend="docker"):
            pass
    _assert_nothing_left(run_id)


def test_keyboard_interrupt_in_body_tears_down(run_id):
    _need_root()
    with pytest.raises(KeyboardInterrupt):
        with deploy(run_id, NodeSpec(cpus=1), NodeSpec(), backend="netns"):
            raise KeyboardInterrupt
    _assert_nothing_left(run_id)


_ORCHESTRATOR = """
import sys, time
from testbed.deploy import NodeSpec, deploy
lease_s = float(sys.argv[3]) if len(sys.argv) > 3 else 15.0
with deploy(sys.argv[1], NodeSpec(cpus=1), NodeSpec(cpus=1), backend=sys.argv[2],
            lease_s=lease_s):
    print("UP", flush=True)
    time.sleep(120)
"""


def _start_orchestrator(run_id: str, backend: str, lease_s: float = 15.0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _ORCHESTRATOR, run_id, backend, str(lease_s)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "UP":
        p.kill()
        pytest.fail(f"orchestrator did not come up: {line!r} {p.stderr.read()[-2000:]}")
    return p


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_tears_down(backend, run_id, request):
    """SIGTERM with no handler of the caller's: deploy turns it into
    KeyboardInterrupt, so teardown runs before the process exits."""
    _prepare(backend, request)
    p = _start_orchestrator(run_id, backend)
    assert _leftovers(run_id)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    _assert_nothing_left(run_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_after_killed_run(backend, run_id, request):
    """SIGKILL leaves containers/networks or namespaces, veths, cgroups and the
    agent processes; cleanup(run_id) removes them and says what it removed."""
    _prepare(backend, request)
    p = _start_orchestrator(run_id, backend)
    p.kill()
    p.communicate(timeout=30)
    time.sleep(0.5)
    left = _leftovers(run_id)
    assert left, "a killed run should leave something behind"
    removed = cleanup(run_id)
    if backend == "docker":
        assert sum(r.startswith("container ") for r in removed) == 2, removed
        assert sum(r.startswith("network ") for r in removed) == 2, removed
    else:
        assert sum(r.startswith("netns ") for r in removed) == 2, removed
        assert any(r.startswith("process ") for r in removed), removed
    _assert_nothing_left(run_id)
    assert cleanup(run_id) == []  # idempotent


def _agents_running(run_id: str, backend: str) -> list[str]:
    """Agents of the run still running, read with the system tools."""
    if backend == "docker":
        r = subprocess.run(["docker", "ps", "-q", "--filter", f"label=testbed.run={run_id}"],
                           capture_output=True, text=True)
        return r.stdout.split()
    return [x for x in _leftovers(run_id) if x.startswith("process ")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_agents_do_not_outlive_a_sigkilled_orchestrator(backend, run_id, request):
    """SIGKILL of the orchestrator: no teardown runs, yet the agents exit by themselves
    once their lease has been gone for lease_s (the kernel closed the lease
    connections); containers stop and wait, removable, for cleanup, which still
    removes them and the networks (namespaces, veths, cgroups)."""
    _prepare(backend, request)
    lease_s = 2.0
    p = _start_orchestrator(run_id, backend, lease_s)
    assert len(_agents_running(run_id, backend)) == 2
    time.sleep(lease_s + 1)
    assert len(_agents_running(run_id, backend)) == 2  # held: the leases keep them alive
    p.kill()
    p.communicate(timeout=30)
    t0 = time.monotonic()
    while _agents_running(run_id, backend) and time.monotonic() - t0 < lease_s + 20:
        time.sleep(0.2)
    assert not _agents_running(run_id, backend), "agents outlived their orchestrator"
    assert time.monotonic() - t0 >= lease_s * 0.5  # the grace, not a crash
    if backend == "docker":
        from nodes.lease import EXIT_LEASE_EXPIRED
        for role in ("local", "remote"):
            code = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}",
                                   f"testbed-{run_id}-{role}"], capture_output=True, text=True)
            assert code.stdout.strip() == str(EXIT_LEASE_EXPIRED)
    assert _leftovers(run_id), "inert state is left for cleanup"
    removed = cleanup(run_id)
    if backend == "docker":
        assert sum(r.startswith("container ") for r in removed) == 2, removed
        assert sum(r.startswith("network ") for r in removed) == 2, removed
    else:
        assert sum(r.startswith("netns ") for r in removed) == 2, removed
    _assert_nothing_left(run_id)


def test_cleanup_without_run_id_spares_live_runs(run_id, monkeypatch):
    """cleanup(None) removes a run whose orchestrator died and leaves a live one.
    (Restricted to this test's two runs, so other work on the machine is safe.)"""
    _need_root()
    from testbed.deploy import docker as dk

    dead = run_id + "d"
    p = _start_orchestrator(dead, "netns")
    p.kill()
    p.communicate(timeout=30)
    real = netns_backend.run_owners
    monkeypatch.setattr(netns_backend, "run_owners",
                        lambda: {k: v for k, v in real().items() if k in (run_id, dead)})
    monkeypatch.setattr(dk, "daemon_available", lambda timeout=3.0: (False, "not in this test"))
    try:
        with deploy(run_id, NodeSpec(), NodeSpec(), backend="netns") as dep:
            removed = cleanup()
            assert any(f"testbed-{dead}-local" in r for r in removed), removed
            assert not any(run_id + "-" in r for r in removed), removed
            socket.create_connection((dep.local.control_host, dep.local.control_port), timeout=5).close()
        _assert_nothing_left(dead)
        _assert_nothing_left(run_id)
    finally:
        cleanup(dead)
