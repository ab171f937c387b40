"""The ssh backend's pure parts: the experiment keys, the clock-offset arithmetic, the
ingress target's naming, the hosts-check target parser, the agent's clock op."""

from __future__ import annotations

import pytest

from testbed.commands.hosts import parse_target
from testbed.deploy import clock
from testbed.errors import ConfigError
from testbed.experiment import NodeConfig, Nodes
from testbed.link.target import Target


def _ssh(**kw):
    return {"backend": "ssh", "host": "edge.lab.example", "key": "~/.ssh/id_ed25519", **kw}


def test_ssh_node_keys() -> None:
    n = Nodes(local={"cpus": 1}, remote=_ssh(runtime="docker", cpus=4))
    assert n.remote_ssh and n.backend == "auto"  # the local node's backend
    assert n.remote.runtime == "docker" and n.remote.port == 22 and n.remote.known_hosts == "~/.ssh/known_hosts"


@pytest.mark.parametrize("remote,needle", [
    ({"backend": "ssh", "key": "k"}, "needs host"),
    ({"backend": "ssh", "host": "h"}, "needs key"),
    ({"host": "h"}, "belongs to backend: ssh"),
    (_ssh(runtime="vm"), "runtime"),
    (_ssh(port=0), "port"),
    (_ssh(control_port=7701), "must differ"),
    (_ssh(cpuset="0"), "cpuset"),
    (_ssh(host="a b"), "host"),
])
def test_ssh_node_refusals(remote: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Nodes(remote=remote)


def test_ssh_only_for_the_remote() -> None:
    with pytest.raises(ValueError, match="local node runs on this host"):
        Nodes(local=_ssh())
    assert Nodes(local={"backend": "docker"}, remote=_ssh()).backend == "docker"
    assert Nodes(remote=_ssh(shape_at="remote")).remote.shape_at == "remote"
    assert NodeConfig(**_ssh()).ssh_user  # defaults to whoever runs the testbed


class _SkewedAgent:
    """Test double of an agent's ``clock``: a clock ``skew_ns`` ahead, reached over a
    path whose two halves take different times (the real agent is in the integration
    tests; here the true offset must be known exactly)."""

    def __init__(self, skew_ns: int, out_ns: list[int], back_ns: list[int]) -> None:
        self.skew, self.out, self.back, self.now = skew_ns, list(out_ns), list(back_ns), 0
        self.calls = 0

    def clock(self) -> int:
        i = self.calls
        self.calls += 1
        return self.now_ns() + self.out[i] + self.skew

    def now_ns(self) -> int:
        return 0


def test_estimate_bounds_the_true_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the asymmetry, the true offset is within the estimate's bound, and the
    fastest exchange is the one used."""
    outs, backs = [400_000, 30_000, 900_000], [100_000, 70_000, 50_000]
    agent = _SkewedAgent(5_000_000, outs, backs)
    stamps: list[int] = []
    t = [1_000_000_000]

    def mono() -> int:
        # t0 before the call, t1 after: out + back later
        if len(stamps) % 2 == 0:
            stamps.append(t[0])
            return t[0]
        i = len(stamps) // 2
        t[0] += outs[i] + backs[i]
        stamps.append(t[0])
        value = t[0]
        t[0] += 1_000_000
        return value

    agent.now_ns = lambda: stamps[-1]  # the agent stamps relative to the last t0
    monkeypatch.setattr(clock.time, "monotonic_ns", mono)
    est = clock.estimate(agent, exchanges=3)
    assert est.rtt_ns == 100_000  # exchange 1: 30 us out + 70 us back
    assert abs(est.offset_ns - 5_000_000) <= est.uncertainty_ns
    assert est.uncertainty_ns == 50_000


def test_between_adds_the_bounds() -> None:
    local = clock.Offset(offset_ns=100, uncertainty_ns=10, rtt_ns=20, at_ns=5)
    remote = clock.Offset(offset_ns=1_100, uncertainty_ns=300, rtt_ns=600, at_ns=9)
    got = clock.between(local, remote)
    assert (got.offset_ns, got.uncertainty_ns, got.at_ns) == (1_000, 310, 9)


def test_clock_check_columns() -> None:
    c = clock.ClockCheck(local=None, remote=None)  # type: ignore[arg-type]
    c.before = clock.Offset(1_000, 200, 400, 0)
    c.after = clock.Offset(1_500, 250, 500, 2_000_000_000)
    cols = c.summary_columns()
    assert cols["clock_offset_s"] == 1e-6 and cols["clock_drift_s"] == 5e-7
    assert cols["clock_drift_ppm"] == pytest.approx(0.25)
    assert c.sample_columns() == {"clock_offset_s": 1e-6, "clock_uncertainty_s": 2e-7}


def test_ingress_target_names() -> None:
    t = Target("data0", netns="testbed-abc-local", ingress=True)
    assert t.key.endswith("-ingress") and t.key != Target("data0", netns="testbed-abc-local").key
    assert t.ifb.startswith("tbi") and len(t.ifb) <= 15
    assert t.egress_of_ifb() == Target(t.ifb, netns="testbed-abc-local")
    assert "ingress" in str(t)


@pytest.mark.parametrize("text,user,port,want", [
    ("edge", None, None, ("me", "edge", 22)),
    ("bench@edge.lab:2222", None, None, ("bench", "edge.lab", 2222)),
    ("bench@10.0.0.2", "other", 23, ("other", "10.0.0.2", 23)),
])
def test_hosts_target(text: str, user, port, want, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "me")
    assert parse_target(text, user, port) == want


@pytest.mark.parametrize("text", ["a b", "@edge", "edge:99999", "edge:x"])
def test_hosts_target_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_target(text, None, None)


def test_agent_clock_op_and_offset_argument(tmp_path) -> None:
    from nodes.agent import Agent

    a = Agent("remote", "tok", tmp_path)
    t = a.dispatch("clock", {}, bytearray())[0]["t_ns"]
    assert isinstance(t, int) and t > 0
    with pytest.raises(Exception, match="clock_offset_ns"):
        a.dispatch("run", {"samples": 1, "clock_offset_ns": "soon"}, bytearray())


def test_a_dropped_connection_is_the_remote_s_death(tmp_path) -> None:
    """What failures.csv says of an ssh remote: its connection, read from the Deployment.
    ``Conn`` stands in for a paramiko connection's liveness only; tests/integration/test_ssh.py
    drops real ones."""
    from testbed.deploy import Deployment
    from testbed.deploy.node import Node

    class Conn:
        spec = type("Spec", (), {"name": "root@edge:22"})()
        up = True

        def alive(self) -> bool:
            return self.up

    def node(name: str, backend: str) -> Node:
        return Node(name=name, backend=backend, control_host="127.0.0.1", control_port=1, metrics_host="127.0.0.1",
                    metrics_port=2, data_host="127.0.0.1", data_port=3, shaping=None)

    conn = Conn()
    dep = Deployment(run_id="r", backend="ssh", reason="", token="t", local=node("local", "netns"),
                     remote=node("remote", "ssh"), remote_conn=conn)
    assert dep.death("remote") is None
    conn.up = False
    assert dep.death("remote") == "ssh connection to root@edge:22 dropped"


def test_cpu_plan_without_remote() -> None:
    from testbed.deploy.cpus import plan_cpus
    from testbed.sweep.placement import without_remote

    plan = without_remote(plan_cpus(1, 1, host=(0, 1)))
    assert plan.remote is None and plan.local == (1,) and plan.orchestrator == (0,)
    assert not any("remote" in n for n in plan.notes)


def test_shape_at_remote_refuses_what_it_cannot_shape_there(tmp_path) -> None:
    """The remote shapes the data connection's source port only: UDP datagrams (from
    another port) are refused at the transport key, one line with file and line."""
    from testbed.experiment import load_experiment

    f = tmp_path / "e.yaml"
    f.write_text("name: t\nmodel: {builtin: posenet}\nnetwork: [ladder-10mbit]\n"
                 "nodes: {remote: {backend: ssh, host: edge, key: k, shape_at: remote}}\ntransport: udp\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(f, check_files=False)
    assert "e.yaml:5: transport" in str(e.value) and "shape_at: local" in str(e.value)
    f.write_text(f.read_text().replace("shape_at: remote", "shape_at: local"))
    assert load_experiment(f, check_files=False).transport.protocol == "udp"


def test_remote_shaper_plans_here_with_the_remote_s_capabilities() -> None:
    """RemoteShaper plans against what the remote's kernel said (no netem there: a delay
    is refused here, before any remote change) and always as a tbf under the classifier."""
    from testbed.errors import ShapingError
    from testbed.link.profile import Direction
    from testbed.link.remote import RemoteShaper, RemoteTarget

    calls: list[list[str]] = []

    def run(args: list[str]) -> str:
        calls.append(args)
        if args[0] == "caps":
            return '{"netem": false, "htb": true, "tbf": true, "kernel": "k", "timer_slack_s": 0.0002}\n'
        return '{"error": "no such interface", "errno": 19}\n'

    shaper = RemoteShaper(RemoteTarget(dev="eth0", sport=7701, host="edge", run=run))
    assert shaper.plan(Direction(rate_bps=10_000_000)).root == "tbf"
    with pytest.raises(ShapingError, match="netem"):
        shaper.plan(Direction(rate_bps=10_000_000, delay_s=0.02))
    assert [c[0] for c in calls] == ["caps"]
    with pytest.raises(ShapingError, match="no such interface"):
        shaper.apply(Direction(rate_bps=10_000_000), "p")
    assert calls[-1][:4] == ["apply", "eth0", "7701", "p"]


def test_preflight_refuses_a_time_varying_downlink_shaped_on_the_remote(tmp_path) -> None:
    """A trace on the downlink cannot be stepped on the remote: preflight names the
    profile at its network line (the host here answers nothing: that is a second line)."""
    from testbed.sweep.preflight import check

    (tmp_path / "k").write_text("")
    (tmp_path / "dip.yaml").write_text(
        "name: dip\nsource: test\nuplink: {rate: 20mbit}\ndownlink: {rate: 40mbit}\n"
        "trace: {loop: true, period: 6s, direction: downlink, steps: [{at: 0s, rate: 40mbit}, "
        "{at: 3s, rate: 4mbit}]}\n")
    exp = tmp_path / "e.yaml"
    problems = {}
    for shape_at in ("remote", "local"):
        exp.write_text("name: t\nmodel: {builtin: posenet}\nsplits: [0]\nnetwork: [dip.yaml]\noutput: out\n"
                       f"nodes: {{remote: {{backend: ssh, host: 127.0.0.1, port: 1, key: k, shape_at: {shape_at}}}}}\n")
        problems[shape_at] = "\n".join(check(exp).problems)
    assert "e.yaml:4: network.0: profile 'dip' varies its downlink over time" in problems["remote"], problems
    assert "varies its downlink" not in problems["local"], problems
