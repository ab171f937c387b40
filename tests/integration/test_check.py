"""``testbed check`` on this machine: what a run would do, or every reason it cannot start.

Real probes: the Docker daemon (when one answers), root for netns, the kernel's
qdiscs (a private throw-away namespace, as every run makes), a real socket
bound to the metrics address, a real small tmpfs for "disk full". Each test
asserts that nothing of a run was created: no run folder, and no namespace,
container or qdisc record owned by this process (tests/unit/test_malformed_inputs.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app
from tests.unit.test_malformed_inputs import _system

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="the netns backend and the kernel probe need root")]

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"


def _invoke(*argv: str):
    return CliRunner().invoke(app, list(argv))


def test_a_runnable_experiment_prints_what_the_run_would_do(tmp_path):
    before = _system({os.getpid()})
    r = _invoke("check", str(SMOKE), "--backend", "netns", "--metrics-listen", "127.0.0.1:0",
                "--output", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    labels = [line.split()[0] for line in r.stdout.splitlines()]
    assert labels == ["experiment", "model", "splits", "inputs", "backend", "kernel", "ports", "disk", "profiles",
                      "configurations", "estimate", "ok:"]
    assert "3 = 1 profile(s) x 3 split point(s)" in r.stdout and "31 layers" in r.stdout
    assert "netns" in r.stdout and r.stdout.rstrip().endswith("ok: the run can start (nothing was created)")
    assert not (tmp_path / "out").exists() and _system({os.getpid()}) == before


def test_every_machine_problem_is_one_line_and_run_refuses_before_creating_anything(tmp_path):
    from testbed.link.shaper import detect_capabilities

    netem = detect_capabilities().netem
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: e\nmodel: {builtin: posenet}\nsplits: [0, 31]\nnetwork: [ladder-10mbit, lte]\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command in ("check", "run"):
            before = _system({os.getpid()})
            r = _invoke(command, str(exp), "--backend", "netns", "--metrics-listen", f"127.0.0.1:{port}",
                        "--output", "/etc/hostname/sub")
            lines = r.stderr.splitlines()
            assert r.exit_code == 1 and all(line.startswith("error: ") for line in lines), r.output
            assert any(f"--metrics-listen: cannot listen on 127.0.0.1:{port}: Address already in use" in line
                       for line in lines)
            assert any("--output: /etc/hostname is not a folder" in line for line in lines)
            needs_netem = [line for line in lines if "exp.yaml:4: network.1: profile 'lte' needs sch_netem (for its "
                                                     "uplink and downlink: delay, jitter, loss)" in line]
            assert len(needs_netem) == (0 if netem else 1), lines
            assert len(lines) == (2 if netem else 4)   # + the remedy, once
            assert _system({os.getpid()}) == before and sorted(tmp_path.iterdir()) == [exp]


def test_not_enough_disk_for_the_split_parts(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        r = _invoke("check", str(SMOKE), "--backend", "netns", "--metrics-listen", "127.0.0.1:0",
                    "--output", str(small))
        assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.output
        assert f"--output: not enough space under {small}: the run needs about" in r.stderr
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_refuses_more_cpus_than_the_host_has(tmp_path):
    from testbed.deploy.docker import daemon_available

    if not daemon_available()[0]:
        pytest.skip("no Docker daemon answers")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"name: e\nmodel: {{builtin: posenet}}\nsplits: [0]\nnetwork: [ladder-10mbit]\n"
                   f"nodes:\n  local: {{cpus: {os.cpu_count() + 1}}}\n")
    r = _invoke("check", str(exp), "--backend", "docker", "--metrics-listen", "127.0.0.1:0",
                "--output", str(tmp_path / "out"))
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.output
    assert f"exp.yaml:6: nodes.local.cpus: docker allows at most {os.cpu_count()} CPUs" in r.stderr
