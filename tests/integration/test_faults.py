"""Faults mid-run on real nodes: the sweep records what happened, recovers and goes on.

Each test runs the real CLI (`testbed run`) on a small experiment, does something a
long unattended run meets — an agent SIGKILLed, a node OOM-killed, the data link
going down for 2 s, a node that stops answering — and checks what the run folder
says about it, that the rest of the run was measured, that `--resume` measures what
failed, and that nothing is left on the host afterwards.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.test_sweep import SMOKE, _assert_nothing_left, _need_root

pytestmark = pytest.mark.integration

BACKENDS = ["netns", "docker"]
TESTBED = str(Path(sys.executable).with_name("testbed"))


def _experiment(tmp_path: Path, name: str, **changes) -> Path:
    exp = yaml.safe_load(SMOKE.read_text())
    exp.update(name=name, output=str(tmp_path / "out"))
    runs = changes.pop("runs", {})
    nodes = changes.pop("local", {})
    exp.update(changes)
    exp["runs"].update({"kpi_runs": 2, "layer_runs": 2, **runs})
    exp["nodes"]["local"].update(nodes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


class _Run:
    """`testbed run` in the background; its stderr read line by line."""

    def __init__(self, path: Path, backend: str, *extra: str) -> None:
        self.proc = subprocess.Popen([TESTBED, "run", str(path), "--backend", backend, "--metrics-listen",
                                      "127.0.0.1:0", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[str] = []

    def wait_for(self, pattern: str, timeout_s: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"never saw {pattern!r}:\n{''.join(self.lines)}")

    def finish(self, timeout_s: float = 300) -> str:
        out, err = self.proc.communicate(timeout=timeout_s)
        self.lines.append(err)
        assert self.proc.returncode == 0, "".join(self.lines)
        return out.strip().splitlines()[-1]


def _rows(folder: Path, name: str) -> list[dict[str, str]]:
    path = folder / name
    return list(csv.DictReader(path.open())) if path.exists() else []


def _wait_rows(folder_glob: Path, name: str, count: int, timeout_s: float = 240) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for folder in folder_glob.parent.glob(folder_glob.name):
            if len(_rows(folder, name)) >= count:
                return folder
        time.sleep(0.2)
    raise AssertionError(f"no {name} with {count} rows under {folder_glob}")


def _agent_pid(backend: str, run_id: str, role: str) -> int:
    if backend == "netns":
        out = subprocess.run(["ip", "netns", "pids", f"testbed-{run_id}-{role}"], capture_output=True, text=True)
        return int(out.stdout.split()[0])
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", f"testbed-{run_id}-{role}"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_killed_agent_fails_its_configuration_and_the_run_goes_on(backend, tmp_path):
    """SIGKILL of the local agent while k = 12 samples: that configuration is recorded
    failed (phase, node, cause), the nodes are redeployed, k = 31 is measured; then
    --resume measures k = 12, and nothing of either deployment is left."""
    _need_root()
    path = _experiment(tmp_path, "killed", runs={"samples": 40, "max_seconds": 6})
    run = _Run(path, backend)
    run_id = run.wait_for(r"run id: (\S+)").group(1)
    folder = _wait_rows(tmp_path / "out" / "killed-*", "summary.csv", 1)
    time.sleep(2.0)  # into k = 12's samples (each ~0.15 s for about 6 s)
    pid = _agent_pid(backend, run_id, "local")
    if backend == "docker":
        subprocess.run(["docker", "kill", "--signal", "KILL", f"testbed-{run_id}-local"], check=True,
                       capture_output=True)
    else:
        import os
        os.kill(pid, signal.SIGKILL)
    assert Path(run.finish()) == folder
    (failure,) = _rows(folder, "failures.csv")
    assert (failure["split"], failure["node"]) == ("12", "local"), failure
    assert "signal 9" in failure["cause"] and failure["phase"] in ("sampling", "warmup", "kpi"), failure
    assert [r["split"] for r in _rows(folder, "summary.csv")] == ["0", "31"]
    env = json.loads((folder / "environment.json").read_text())
    (redeploy,) = env["redeployed"]
    assert redeploy["after_run_id"] == run_id and "signal 9" in redeploy["cause"]
    _assert_nothing_left(run_id)
    _assert_nothing_left(redeploy["run_id"])
    again = _Run(path, backend, "--resume", str(folder))
    again.finish()
    assert sorted(r["split"] for r in _rows(folder, "summary.csv")) == ["0", "12", "31"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_oom_killed_node_is_recorded_as_such(backend, tmp_path):
    """A UE with 120 MiB: the small head of k = 1 fits, the whole model (k = 31)
    does not; its configuration fails with the cause read from the node's cgroup
    or container state — OOM — not "connection closed", and the run finishes."""
    _need_root()
    path = _experiment(tmp_path, "oom", splits=[1, 31], local={"memory": "120MiB"}, runs={"samples": 2})
    run = _Run(path, backend)
    run_id = run.wait_for(r"run id: (\S+)").group(1)
    folder = Path(run.finish())
    (failure,) = _rows(folder, "failures.csv")
    assert failure["split"] == "31" and failure["node"] == "local", failure
    assert failure["cause"] == "OOM-killed (memory limit 120 MiB)", failure
    assert [r["split"] for r in _rows(folder, "summary.csv")] == ["1"]
    _assert_nothing_left(run_id)


def _data_link(backend: str, folder: Path, run_id: str) -> list[str]:
    """The `ip` command prefix that reaches the local node's data interface, and its name."""
    env = json.loads((folder / "environment.json").read_text())
    shaping = env["nodes"]["local"]["shaping"]
    if backend == "netns":
        return ["ip", "-n", shaping["netns"], "link", "set", shaping["dev"]]
    return ["nsenter", "-t", str(shaping["pid"]), "-n", "ip", "link", "set", shaping["dev"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_link_flap_is_marked_in_its_samples(backend, tmp_path):
    """The local node's data interface down for 2 s while k = 0 samples: the run
    goes on, the samples that crossed the outage carry their TCP retransmissions
    and the time they lost, the others carry none."""
    _need_root()
    path = _experiment(tmp_path, "flap", splits=[0], runs={"samples": 25, "max_seconds": 60})
    run = _Run(path, backend)
    run_id = run.wait_for(r"run id: (\S+)").group(1)
    folder = _wait_rows(tmp_path / "out" / "flap-*", "layers.csv", 2)
    time.sleep(3.0)  # a few samples first (each ~0.35 s at 20 Mbit/s)
    link = _data_link(backend, folder, run_id)
    subprocess.run([*link, "down"], check=True)
    time.sleep(2.0)
    subprocess.run([*link, "up"], check=True)
    run.finish()
    samples = _rows(folder, "samples.csv")
    hit = [s for s in samples if int(s["uplink_retrans"] or 0) + int(s["downlink_retrans"] or 0) > 0]
    clean = [s for s in samples if s not in hit]
    assert hit and clean, samples
    slowest_clean = max(float(s["uplink_s"]) + float(s["downlink_s"]) for s in clean)
    assert max(float(s["uplink_s"]) + float(s["downlink_s"]) for s in hit) > slowest_clean + 1.0, hit
    (summary,) = _rows(folder, "summary.csv")
    assert int(summary["retrans_samples"]) == len(hit)
    _assert_nothing_left(run_id)


def test_a_hung_node_is_bounded_by_a_deadline_from_its_configuration(tmp_path):
    """The remote agent stopped (SIGSTOP) mid-run: the local node waits for a result
    that never comes; the orchestrator gives up after the configuration's deadline
    (three times its estimate plus a margin, well under the old fixed 3600 s),
    records "nodes still running", redeploys and finishes the run."""
    _need_root()
    path = _experiment(tmp_path, "hung", splits=[12, 31], runs={"samples": 40, "max_seconds": 4})
    run = _Run(path, "netns")
    run_id = run.wait_for(r"run id: (\S+)").group(1)
    folder = _wait_rows(tmp_path / "out" / "hung-*", "layers.csv", 2)
    time.sleep(2.0)
    import os
    os.kill(_agent_pid("netns", run_id, "remote"), signal.SIGSTOP)
    t0 = time.monotonic()
    run.finish(timeout_s=400)
    waited = time.monotonic() - t0
    (failure,) = _rows(folder, "failures.csv")
    assert failure["split"] == "12" and failure["cause"] == "nodes still running" and not failure["node"], failure
    assert "no reply within" in failure["error"], failure
    assert waited < 300, waited
    assert [r["split"] for r in _rows(folder, "summary.csv")] == ["31"]
    _assert_nothing_left(run_id)
