"""A non-editable install works from another folder: wheel, fresh venv, real commands.

The module fixture copies the source tree to a temporary folder, builds a wheel
there (so no build/ or *.egg-info appears in the checkout), and installs it with
``--no-deps`` into a fresh venv whose dependencies come from the running venv
(a ``.pth`` file naming its site-packages: no download, and the running venv's
editable ``.pth`` is not processed, so the checkout stays out of ``sys.path``).
Every command then runs with its working directory in another temporary folder
and no ``PYTHONPATH``: the shipped profiles, dashboards, Docker build files and
the agent's ``nodes`` package must all come from the install. Model cache,
monitor folder and run folder are temporary too.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NOT_COPIED = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "runs", "results", ".cache",
              ".pytest_cache")
# A run that names a shipped profile; the smallest that still crosses the link.
EXPERIMENT = """\
name: install-check
description: one middle split over a shipped profile, from an installed testbed
model: {builtin: posenet}
splits: [12]
nodes:
  local: {cpus: 1, memory: 1GiB, threads: 1}
  remote: {cpus: 1, threads: 1}
network: [ladder-20mbit]
runs: {warmup: 1, samples: 2, max_seconds: 5, kpi_runs: 1, layer_runs: 1}
"""


class Installed:
    """The fresh venv and a way to run commands in it from a folder outside the checkout."""

    def __init__(self, venv: Path, work: Path, cache: Path) -> None:
        self.venv, self.work = venv, work
        self.site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        self.env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                    "TESTBED_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}

    def run(self, *argv: str, timeout: float = 600) -> str:
        done = subprocess.run(list(argv), cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def python(self, code: str) -> object:
        return json.loads(self.run(str(self.venv / "bin" / "python"), "-c", code).strip().splitlines()[-1])


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    tmp = tmp_path_factory.mktemp("install")
    src, dist, venv = tmp / "src", tmp / "dist", tmp / "venv"
    # symlinks=True: testbed/resources/* stay links, as in the checkout, and the build follows them
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_COPIED))
    _pip("wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(dist), str(src))
    wheel, = dist.glob("splitbed-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    _pip("--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-cache-dir", str(wheel))
    work = tmp / "elsewhere"
    work.mkdir()
    target = Installed(venv, work, tmp / "cache")
    (target.site / "_splitbed_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return target


def test_code_and_data_come_from_the_install(installed):
    where = installed.python(
        "import json, testbed, nodes; from testbed import resources; from testbed.deploy import netns; "
        "print(json.dumps({'testbed': testbed.__file__, 'nodes': nodes.__file__, "
        "'folders': [str(resources.folder(f)) for f in resources.FOLDERS], "
        "'agent_env': netns._nodes_pythonpath()}))")
    site = installed.site.resolve()
    for path in [where["testbed"], where["nodes"], *where["folders"]]:
        assert Path(path).resolve().is_relative_to(site), f"{path} is not from the install"
    # the agent runs the installed nodes package: the interpreter finds it without help
    assert where["agent_env"] == {}
    profiles = installed.site / "testbed" / "resources" / "netem_profiles"
    assert not profiles.is_symlink() and (profiles / "traces" / "synthetic-lte-uplink.up").is_file()
    assert not (installed.site / "testbed" / "resources" / "grafana" / "generate_dashboards.py").exists()


def test_netem_list_shows_the_shipped_profiles(installed):
    out = installed.run("testbed", "netem", "list")
    for name in ("lte", "ladder-20mbit", "trace-lte-uplink", "urllc"):
        assert name in out, out


def test_run_with_a_shipped_profile_on_netns(installed):
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (netns)")
    (installed.work / "install-check.yaml").write_text(EXPERIMENT)
    out_dir = installed.work / "runs"
    stdout = installed.run("testbed", "run", "install-check.yaml", "--backend", "netns",
                           "--output", str(out_dir), "--metrics-listen", "127.0.0.1:0")
    run_dir = Path(stdout.strip().splitlines()[-1])
    assert run_dir.parent == out_dir
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [p["name"] for p in config["resolved_profiles"]] == ["ladder-20mbit"]
    with open(run_dir / "samples.csv", newline="") as f:
        samples = list(csv.DictReader(f))
    assert len(samples) >= 2 and {s["profile"] for s in samples} == {"ladder-20mbit"}
    # both agents ran on the venv's interpreter, which finds nodes only in its site-packages
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["backend"] == "netns"
    for role in ("local", "remote"):
        assert env["nodes"][role]["python"] == str(installed.venv / "bin" / "python"), env["nodes"][role]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_monitor_up_finds_the_shipped_dashboards(installed):
    if not shutil.which("prometheus"):
        pytest.fail("prometheus is not installed (setup.sh installs it)")
    monitor = installed.work / "monitor"
    try:
        out = installed.run("testbed", "monitor", "up", "--dir", str(monitor), "--backend", "binary",
                            "--listen", f"127.0.0.1:{_free_port()}")
    finally:
        installed.run("testbed", "monitor", "down", "--dir", str(monitor))
    dashboards = installed.site / "testbed" / "resources" / "grafana" / "dashboards"
    assert f"import {dashboards.resolve()}/*.json" in out, out
    assert len(list(dashboards.glob("*.json"))) == 4
    # the compose backend mounts ../grafana beside the shipped compose file
    mounts = installed.python(
        "import json, yaml; from testbed.metrics.monitor import COMPOSE_FILE as f; "
        "v = yaml.safe_load(f.read_text())['services']['grafana']['volumes']; "
        "print(json.dumps([str((f.parent / m.split(':')[0]).resolve()) for m in v]))")
    assert mounts and all(Path(m).is_dir() and Path(m).is_relative_to(installed.site.resolve()) for m in mounts)


def test_node_image_builds_from_the_installed_package(installed):
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker daemon (setup.sh starts one)")
    sources = installed.python(
        "import json; from testbed.deploy import image; "
        "print(json.dumps([str(image.DOCKER_DIR), str(image.NODES_DIR), image.node_requirements()]))")
    site = installed.site.resolve()
    assert all(Path(p).is_relative_to(site) for p in sources[:2]), sources
    from testbed.deploy.image import node_requirements

    assert sources[2] == node_requirements(), "the installed metadata gives the same constraints"
    tag = installed.run(str(installed.venv / "bin" / "python"), "-m", "testbed.deploy.image",
                        timeout=1800).strip().splitlines()[-1]
    assert tag.startswith("splitbed-node:")
    # the installed files are the checkout's, so the content hash (the tag) is the same
    from testbed.deploy import docker as dk
    from testbed.deploy.image import ensure_node_image

    client = dk.connect()
    try:
        assert dk.image_id(client, tag)
        assert ensure_node_image(client) == tag
    finally:
        client.close()
