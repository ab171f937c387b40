"""The ssh backend end to end, on one machine: a real sshd in a namespace as the edge host.

The edge (``sshhost.edge_host``: Debian's openssh-server, per-test host and client
keys, a private known_hosts) runs the remote node; the local node is a routed
namespace or a container here. The smoke experiment runs with ``runtime: process``
and with ``runtime: docker`` (the edge's docker CLI reaches this host's dockerd, so the
``ssh://`` path drives a real engine). Checked: the result files (derived clock,
offset ~ 0 within its uncertainty on one host, where each direction was shaped),
that control traffic went through the tunnel (nothing listens on the edge's
address but sshd and the data port, and every control connection the agent
accepted came from the tunnel's end), that nothing is left on either side — after
a normal run, after SIGINT mid-run, after the ssh connection dropped mid-run (the
configuration recorded in failures.csv, the pair redeployed, ``--resume`` finishing) — and that bad input is one
line, exit 1, with nothing created.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.sshhost import Edge, edge_host

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"
TESTBED = [str(Path(sys.executable).parent / "testbed")]


@pytest.fixture(scope="module")
def edge() -> Edge:
    if os.geteuid() != 0:
        pytest.fail("the ssh integration tests need root (namespaces, sshd)")
    with edge_host() as e:
        yield e


def _experiment(tmp: Path, edge: Edge, runtime: str, local: str = "netns", **remote_extra: object) -> Path:
    exp = yaml.safe_load(SMOKE.read_text())
    remote = {"backend": "ssh", "host": edge.addr, "user": "root", "port": edge.port, "key": str(edge.key),
              "known_hosts": str(edge.known_hosts), "runtime": runtime, "wheels": "push", "cpus": 1,
              "threads": 1}
    if runtime == "docker":
        # The engine is this host's: its host-network containers listen in this
        # namespace, where the edge reaches them at host_addr (docs/ssh.md).
        remote.update(engine_address=edge.host_addr, data_address=edge.host_addr)
    remote.update(remote_extra)
    exp["nodes"] = {"local": {**exp["nodes"]["local"], "backend": local}, "remote": remote}
    exp["output"] = str(tmp / "results")
    exp["metrics"] = {"listen": "127.0.0.1:0"}  # never collide with another run's 9400
    path = tmp / "ssh.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def _run(path: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*TESTBED, "run", str(path), *extra], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _rows(folder: Path, name: str) -> list[dict]:
    with open(folder / name, newline="") as f:
        return list(csv.DictReader(f))


def _run_folder(out: str) -> Path:
    return Path(out.strip().splitlines()[-1])  # `testbed run` prints the run folder last


def _run_id(folder: Path) -> str:
    return json.loads((folder / "environment.json").read_text())["run_id"]


class Watch:
    """Polls the edge's listeners and established control connections during a run."""

    def __init__(self, edge: Edge) -> None:
        self.edge, self.listeners, self.control_peers = edge, set(), set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.listeners |= set(self.edge.listeners())
            out = subprocess.run(["ip", "netns", "exec", self.edge.ns, "ss", "-Htn", "state", "established",
                                  "( sport = :7700 )"], capture_output=True, text=True).stdout
            self.control_peers |= {line.split()[-1].rpartition(":")[0] for line in out.splitlines() if line}
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def _nothing_left(edge: Edge, run_id: str) -> None:
    """Neither side keeps anything of the run (found with system tools)."""
    from tests.integration.test_sweep import _leftovers

    assert _leftovers(run_id) == []
    sshd = {edge.proc.pid}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and edge.pids() - sshd:
        time.sleep(0.2)  # sshd's per-connection children exit just after the client left
    assert edge.pids() - sshd == set(), "processes left in the edge namespace"
    assert not Path(f"/root/.cache/testbed/runs/{run_id}").exists(), "the run's remote workdir is left"
    assert not Path(f"/run/testbed/ssh/{run_id}.json").exists()
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout + \
        subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    assert f"testbed-{run_id}" not in rules
    containers = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=testbed.run={run_id}"],
                                capture_output=True, text=True).stdout.split()
    assert containers == []


def _check_results(folder: Path, n_splits: int = 3) -> None:
    summary = _rows(folder, "summary.csv")
    assert len(summary) == n_splits
    for r in summary:
        assert r["uplink_shaped_at"] == "local-egress" and r["downlink_shaped_at"] == "local-ingress"
        offset, bound = float(r["clock_offset_s"]), float(r["clock_uncertainty_s"])
        # one host, one clock: the estimate is ~0 within its own bound (a bound from the round trip)
        assert abs(offset) <= bound, (offset, bound)
        assert abs(float(r["clock_offset_after_s"])) <= float(r["clock_uncertainty_after_s"])
        assert r["clock_drift_s"] != ""
        if int(r["split"]) < 31:
            assert r["clock"] == "derived"
            # a rate-only link: the measured uplink is its framing-aware ideal (20 % margin)
            assert 0.8 < float(r["uplink_over_ideal_p50"]) < 1.25, r["uplink_over_ideal_p50"]
    samples = _rows(folder, "samples.csv")
    assert all(s["clock_uncertainty_s"] for s in samples)
    env = json.loads((folder / "environment.json").read_text())
    assert env["backend"] == "ssh"
    assert env["nodes"]["remote"]["control"].startswith("127.0.0.1:")


@pytest.mark.parametrize("local,runtime", [("netns", "process"), ("netns", "docker"), ("docker", "process")])
def test_smoke_over_ssh(edge: Edge, tmp_path: Path, local: str, runtime: str) -> None:
    path = _experiment(tmp_path, edge, runtime, local)
    watch = Watch(edge)
    try:
        r = _run(path)
    finally:
        watch.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    folder = _run_folder(r.stdout)
    _check_results(folder)
    # control through the tunnel: on the edge's own address only sshd and the data port listen
    on_edge = {port for host, port in watch.listeners if host == edge.addr}
    assert on_edge <= {edge.port, 7701}, watch.listeners
    if runtime == "process":
        assert 7701 in on_edge
        assert (("127.0.0.1", 7700) in watch.listeners), watch.listeners
        assert watch.control_peers and watch.control_peers <= {"127.0.0.1"}, watch.control_peers
    _nothing_left(edge, _run_id(folder))


def _edge_tc(edge: Edge, what: str) -> dict[str, dict]:
    """``what`` (qdisc or class) on the edge's interface by handle: kind, parent, rate as
    tc prints it, bytes sent (``tc -s``; iproute2 6.1 has no JSON for classes)."""
    out = subprocess.run(["ip", "netns", "exec", edge.ns, "tc", "-s", what, "show", "dev", edge.dev],
                         capture_output=True, text=True).stdout
    found: dict[str, dict] = {}
    current = None
    for line in out.splitlines():
        words = line.split()
        if words[:1] == [what]:
            current = found[words[2]] = {
                "kind": words[1], "parent": words[words.index("parent") + 1] if "parent" in words else "root",
                "rate": words[words.index("rate") + 1] if "rate" in words else None, "bytes": 0}
        elif words[:1] == ["Sent"] and current is not None:
            current["bytes"] = int(words[1])
    return found


def _slow_downlink(tmp: Path) -> str:
    """A rate-only profile whose downlink (4 Mbit/s) is slower than its uplink."""
    path = tmp / "slow-down.yaml"
    path.write_text(yaml.safe_dump({"name": "slow-down", "source": "test: a downlink slower than the uplink",
                                    "uplink": {"rate": "20mbit"},
                                    "downlink": {"rate": "4mbit"}}))
    return str(path)


def test_downlink_shaped_on_the_remote(edge: Edge, tmp_path: Path) -> None:
    """shape_at: remote: the edge's own interface carries an htb whose shaped class takes
    the agent's data flow only (the ssh connection on the same interface goes through
    the pass-through class), the results say so, the downlink takes its shaped time,
    and nothing is left on the edge's interface afterwards."""
    path = _experiment(tmp_path, edge, "process", shape_at="remote")
    exp = yaml.safe_load(path.read_text())
    exp["network"] = [_slow_downlink(tmp_path)]
    path.write_text(yaml.safe_dump(exp))
    seen: dict[str, dict] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.update({f"class {h}": c for h, c in _edge_tc(edge, "class").items()})
            seen.update({f"qdisc {h}": q for h, q in _edge_tc(edge, "qdisc").items()})
            time.sleep(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        r = _run(path)
    finally:
        stop.set()
        t.join()
    assert r.returncode == 0, r.stderr[-3000:]
    folder = _run_folder(r.stdout)
    flow, others, tbf = seen.get("class 7462:1"), seen.get("class 7462:2"), seen.get("qdisc 7465:")
    assert flow and others and tbf, seen
    assert tbf["kind"] == "tbf" and tbf["parent"] == "7462:1" and tbf["rate"] == "4Mbit", tbf
    assert flow["bytes"] > 10_000, flow      # the data flow: the tail's results
    assert others["bytes"] > 0, others       # the ssh connection: unshaped, but on this interface
    summary = _rows(folder, "summary.csv")
    assert len(summary) == 3
    for row in summary:
        assert row["uplink_shaped_at"] == "local-egress" and row["downlink_shaped_at"] == "remote-egress"
        if int(row["split"]) < 31:
            assert 0.8 < float(row["downlink_over_ideal_p50"]) < 1.25, row["downlink_over_ideal_p50"]
    env = json.loads((folder / "environment.json").read_text())
    remote = env["nodes"]["remote"]
    assert remote["shape_at"] == "remote" and remote["shaping"]["dev"] == edge.dev, remote
    assert env["remote_link_capabilities"]["htb"] is True and env["remote_link_capabilities"]["tbf"] is True
    assert not any(h.startswith("746") for h in _edge_tc(edge, "qdisc")), _edge_tc(edge, "qdisc")
    _nothing_left(edge, _run_id(folder))


def _run_until_samples(tmp_path: Path, edge: Edge, **remote_extra: object) -> tuple[subprocess.Popen, Path]:
    """``testbed run`` of the smoke experiment with a process remote, returned once its
    first samples are on disk (the run is then mid-sweep)."""
    path = _experiment(tmp_path, edge, "process", **remote_extra)
    proc = subprocess.Popen([*TESTBED, "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    results = tmp_path / "results"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(results.glob("*/samples.csv")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    return proc, next(results.glob("*"))


def test_sigint_mid_run_leaves_nothing(edge: Edge, tmp_path: Path) -> None:
    proc, folder = _run_until_samples(tmp_path, edge)
    run_id = _run_id(folder)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    _nothing_left(edge, run_id)


def _kill_ssh_sessions(edge: Edge) -> None:
    """Drop every ssh connection: kill sshd's per-connection processes on the edge."""
    for pid in edge.pids():
        if pid == edge.proc.pid:
            continue
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("sshd"):
            os.kill(pid, signal.SIGKILL)


def test_dropped_connection_is_recorded_redeployed_and_resume_finishes(edge: Edge, tmp_path: Path) -> None:
    """Every ssh connection dropped mid-configuration: that configuration goes to
    failures.csv (node remote, cause: the connection), the pair is redeployed over a
    new connection and the sweep goes on; --resume measures the one that failed."""
    path = _experiment(tmp_path, edge, "process")
    exp = yaml.safe_load(path.read_text())
    exp["runs"]["samples"] = 40  # long enough configurations to drop the link inside one
    exp["runs"]["min_seconds"] = 3
    exp["runs"]["max_seconds"] = 5
    path.write_text(yaml.safe_dump(exp))
    proc = subprocess.Popen([*TESTBED, "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    results = tmp_path / "results"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        summaries = list(results.glob("*/summary.csv"))
        if summaries and len(_rows(summaries[0].parent, "summary.csv")) >= 1:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    time.sleep(1.0)  # inside the second configuration's sampling
    _kill_ssh_sessions(edge)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "redeploying" in err, err[-2000:]
    folder = next(results.glob("*"))
    failures = _rows(folder, "failures.csv")
    assert len(failures) == 1, failures
    assert failures[0]["node"] == "remote" and "ssh connection" in failures[0]["cause"], failures
    assert len(_rows(folder, "summary.csv")) == 2
    env = json.loads((folder / "environment.json").read_text())
    run_ids = [env["run_id"], *(r["run_id"] for r in env.get("redeployed", []))]
    assert len(run_ids) == 2, env.get("redeployed")
    for run_id in run_ids:
        _nothing_left(edge, run_id)
    r = _run(path, "--resume", str(folder))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_rows(folder, "summary.csv")) == 3


@pytest.mark.parametrize("case,expect", [
    ("unknown_key", "is not in"),
    ("changed_key", "CHANGED"),
    ("wrong_key", "authentication failed"),
    ("refused", "Connection refused"),
    ("unknown_host", "unknown host"),
    ("port_in_use", "already in use"),
])
def test_bad_input_is_one_line(edge: Edge, tmp_path: Path, case: str, expect: str) -> None:
    extra: dict = {}
    blocker = None
    if case == "unknown_key":
        (tmp_path / "kh").write_text("")
        extra["known_hosts"] = str(tmp_path / "kh")
    elif case == "changed_key":
        other = (edge.folder / "client_key.pub").read_text().split()
        (tmp_path / "kh").write_text(f"[{edge.addr}]:{edge.port} {other[0]} {other[1]}\n")
        extra["known_hosts"] = str(tmp_path / "kh")
    elif case == "wrong_key":
        extra["key"] = str(edge.folder / "host_key")
    elif case == "refused":
        extra["port"] = edge.port + 1
    elif case == "unknown_host":
        extra["host"] = "no-such-host.invalid"
    elif case == "port_in_use":
        blocker = subprocess.Popen(["ip", "netns", "exec", edge.ns, sys.executable, "-c",
                                    "import socket,time;s=socket.socket();s.bind(('127.0.0.1',7700));"
                                    "s.listen();time.sleep(60)"])
        time.sleep(0.5)
    records = set(Path("/run/testbed/ssh").glob("*.json"))
    try:
        path = _experiment(tmp_path, edge, "process", **extra)
        r = _run(path, timeout=120)
    finally:
        if blocker is not None:
            blocker.kill()
            blocker.wait()
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists(), "a run folder was made for a run that could not start"
    assert set(Path("/run/testbed/ssh").glob("*.json")) <= records


@pytest.mark.parametrize("shape_at", ["local", "remote"])
def test_sigkill_then_cleanup_from_the_state_record(edge: Edge, tmp_path: Path, shape_at: str) -> None:
    """A SIGKILLed orchestrator tears nothing down; `testbed cleanup --run ID` reconnects
    to the host named in the run's state record and removes both sides — with
    shape_at: remote, the qdiscs on the edge's interface too."""
    proc, folder = _run_until_samples(tmp_path, edge, shape_at=shape_at)
    run_id = _run_id(folder)
    proc.kill()
    proc.communicate(timeout=30)
    record = Path(f"/run/testbed/ssh/{run_id}.json")
    assert record.exists() and json.loads(record.read_text())["host"]["host"] == edge.addr
    assert Path(f"/root/.cache/testbed/runs/{run_id}").exists()
    shaped_there = "7462:" in _edge_tc(edge, "qdisc")
    assert shaped_there == (shape_at == "remote"), _edge_tc(edge, "qdisc")
    r = subprocess.run([*TESTBED, "cleanup", "--run", run_id], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    if shape_at == "remote":
        assert f"qdiscs on {edge.dev}" in r.stdout + r.stderr, r.stdout + r.stderr
    assert not any(h.startswith("746") for h in _edge_tc(edge, "qdisc")), _edge_tc(edge, "qdisc")
    _nothing_left(edge, run_id)


def test_hosts_check(edge: Edge, tmp_path: Path) -> None:
    r = subprocess.run([*TESTBED, "hosts", "check", f"root@{edge.addr}:{edge.port}", "--key", str(edge.key),
                        "--known-hosts", str(edge.known_hosts)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split()[1]: line for line in r.stdout.splitlines() if line.strip()}
    for name in ("reachable", "host", "auth", "python3", "disk", "docker", "ports", "clock", "remote"):
        assert name in lines and lines[name].startswith("ok"), r.stdout
    assert "shape_at: remote possible (root)" in lines["remote"], lines["remote"]
    (tmp_path / "kh").write_text("")
    r = subprocess.run([*TESTBED, "hosts", "check", f"root@{edge.addr}:{edge.port}", "--key", str(edge.key),
                        "--known-hosts", str(tmp_path / "kh")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "SHA256:" in r.stderr
