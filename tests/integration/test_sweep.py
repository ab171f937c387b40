"""The smoke experiment end to end on real nodes, a real shaped link and real LiteRT.

For each backend (netns: namespaces + veth; docker: containers): run
``experiments/smoke.yaml`` once (module fixture) and check the run folder is
complete and consistent; the uplink time at a rate-only profile matches
bytes·8/rate; control traffic does not cross the shaped link; and nothing the
run created is left — after a normal run and after a SIGINT mid-run (exit 130).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "experiments" / "smoke.yaml"
BACKENDS = ["netns", "docker"]


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests need root (namespaces, qdiscs, docker)")


# ----------------------------------------------------------------- leftovers

def _leftovers(run_id: str) -> list[str]:
    """Everything on this host whose name or label carries ``run_id``, found
    with the system tools (not with the deploy code under test)."""
    found: list[str] = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if run_id in line]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if run_id in line]
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        for kind in ("ps", "network ls", "volume ls"):
            out = subprocess.run(["docker", *kind.split(), *(["-a"] if kind == "ps" else []), "-q",
                                  "--filter", f"label=testbed.run={run_id}"], capture_output=True, text=True).stdout
            found += [f"docker {kind} {x}" for x in out.split()]
    cg = Path("/sys/fs/cgroup")
    if cg.is_dir():
        found += [f"cgroup {p}" for p in cg.glob(f"**/*{run_id}*") if p.is_dir()]
    state = Path(os.environ.get("TESTBED_STATE_DIR", "/run/testbed/link"))
    if state.is_dir():  # the shaper's records of what it installed
        found += [f"shaper record {p}" for p in state.glob("*.json") if run_id in p.read_text(errors="replace")]
    agents = subprocess.run(["pgrep", "-af", "nodes.agent"], capture_output=True, text=True).stdout
    found += [f"process {line}" for line in agents.splitlines() if run_id in line]
    return found


def _assert_nothing_left(run_id: str) -> None:
    deadline = time.monotonic() + 20  # docker removes asynchronously
    left = _leftovers(run_id)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _leftovers(run_id)
    assert not left, f"run {run_id} left: {left}"


# ----------------------------------------------------------------- one smoke run per backend

@pytest.fixture(scope="module", params=BACKENDS)
def smoke(request, tmp_path_factory):
    from rich.console import Console

    from testbed.analysis.results import RunFolder
    from testbed.sweep import SweepOptions, run_experiment

    _need_root()
    backend = request.param
    out = tmp_path_factory.mktemp(f"smoke-{backend}")
    log = io.StringIO()
    t0 = time.monotonic()
    run_dir = run_experiment(SMOKE, SweepOptions(backend=backend, output=out, metrics_listen="127.0.0.1:0",
                                                 progress=False), console=Console(file=log, width=200))
    wall = time.monotonic() - t0
    print(f"smoke run on {backend}: {wall:.1f} s\n{log.getvalue()}")
    return backend, RunFolder(run_dir), wall


def test_run_folder_is_complete(smoke):
    backend, run, _ = smoke
    for name in ("config.yaml", "environment.json", "manifest.json", "samples.csv", "summary.csv",
                 "parts.csv", "layers.csv"):
        assert (run.path / name).is_file() and (run.path / name).stat().st_size > 0, name
    cfg = run.config()
    splits, profiles = cfg["split_points"], [p["name"] for p in cfg["resolved_profiles"]]
    n = run.manifest()["model"]["layers"]
    assert 0 in splits and n in splits, "smoke must cover both anchors"
    summary = run.summary()
    assert {(r["profile"], r["split"]) for r in summary} == {(p, k) for p in profiles for k in splits}
    samples = run.samples()
    assert len(samples) == sum(r["count"] for r in summary) and all(r["count"] >= 1 for r in summary)
    env = run.environment()
    assert env["backend"] == backend and env["host"]["kernel"] and "netem" in env["link_capabilities"]
    assert env["model"]["sha256"] == run.manifest()["model"]["sha256"]
    layers = run.layers()
    assert sorted((r["node"], r["layer"]) for r in layers) == sorted(
        (node, i) for node in ("local", "remote") for i in range(n))
    assert all(r["mean_s"] > 0 and r["op"] for r in layers)
    parts = run.parts()
    for r in summary:
        rows = [p for p in parts if (p["profile"], p["split"]) == (r["profile"], r["split"])]
        want = ({"head"} if r["split"] > 0 else set()) | ({"tail"} if r["split"] < n else set())
        assert {p["part"] for p in rows} == want
        for p in rows:
            assert p["file_bytes"] > 0 and p["steady_mean_s"] > 0 and p["peak_memory_bytes"] > 0
            assert p["node"] == ("local" if p["part"] == "head" else "remote")
            if p["part"] == "head":
                assert p["delivery_s"] > 0
    for s in samples:
        assert s["emulation_uplink"] in ("tbf", "htb", "netem", "htb+netem")
        # every node reports its own cgroup's CPU time; the remote only when it took part
        assert s["local_cpu_s"] is not None and s["local_throttled_periods"] is not None, s
        assert (s["remote_cpu_s"] is not None) == (s["split"] < n), s
    from testbed.analysis.results import PHASES
    for r in summary:  # every second of a configuration is in one phase
        phases = sum(r[f"phase_{ph}_s"] for ph in PHASES)
        assert phases == pytest.approx(r["wall_s"], rel=0.01), r
        assert r["phase_sampling_s"] > 0 and r["phase_other_s"] < 0.25 * r["wall_s"], r
    # parts are written per configuration and removed at the end; the manifest stays complete
    assert not (run.path / "parts").exists()
    assert {e["k"] for e in run.manifest()["splits"]} == set(splits)
    cpus = env["cpu_assignment"]
    if len(cpus["host_cpus"]) >= 2:  # the UE node has a core nobody else is pinned to
        assert cpus["local"] and not set(cpus["local"]) & set(cpus["remote"] + cpus["orchestrator"]), cpus
        details = env["nodes"]["local"].get("details", env["nodes"]["local"])
        assert details["cpuset"] == ",".join(map(str, cpus["local"])), details


def test_e2e_is_at_least_the_sum_of_its_parts(smoke):
    _, run, _ = smoke
    from testbed.analysis.results import E2E_PARTS

    for s in run.samples():
        parts = sum(s[f"{t}_s"] or 0.0 for t in E2E_PARTS)
        assert s["e2e_s"] >= parts - 1e-6, s
        assert all((s[f"{t}_s"] or 0.0) >= 0 for t in E2E_PARTS), s
        if s["clock"] == "shared":
            # everything but the gaps between stages is accounted for
            assert parts >= 0.5 * s["e2e_s"], s


def test_cut_bytes_equal_the_manifest(smoke):
    _, run, _ = smoke
    manifest = run.manifest()
    n = manifest["model"]["layers"]
    cut = {s["k"]: sum(t["bytes"] for t in s["cut"]) for s in manifest["splits"]}
    for s in run.samples():
        assert s["cut_bytes_raw"] == cut[s["split"]], s
        if s["split"] == n:
            assert s["cut_bytes_wire"] == 0 and s["uplink_s"] == 0
        else:
            assert s["cut_bytes_wire"] == s["cut_bytes_raw"]  # raw codec, raw input encoding


def test_uplink_time_matches_the_configured_rate(smoke):
    """At a rate-only profile the uplink of a big cut takes its framing-aware
    ideal time: every segment's TCP/IP/Ethernet headers at the configured rate.

    The bounds come from the emulation itself, not from this machine: a token
    bucket that starts full lets at most its depth through early (the lower
    bound), and anything above 5 % would be time the results cannot explain.
    The receive lag, CPU throttling and CPU time of both nodes are printed on
    failure: they are what a slow sample would be explained by.
    """
    from testbed.link.params import MAX_TIMER_SLACK_S
    from testbed.link.profile import MTU_BYTES

    _, run, _ = smoke
    rate = {r["profile"]: r["uplink_rate_bps"] for r in run.summary()}
    big = [s for s in run.samples() if s["cut_bytes_wire"] >= 200_000]
    assert big, "smoke needs a split with a large cut"
    for split in sorted({s["split"] for s in big}):
        rows = [s for s in big if s["split"] == split]
        assert all(s["uplink_ideal_s"] for s in rows), "every shaped sample carries its ideal time"
        ideal = rows[0]["uplink_ideal_s"]
        assert ideal > rows[0]["cut_bytes_wire"] * 8 / rate[rows[0]["profile"]], "ideal counts the headers"
        burst_s = (MTU_BYTES + MAX_TIMER_SLACK_S * rate[rows[0]["profile"]] / 8) * 8 / rate[rows[0]["profile"]]
        ratio = float(np.median([s["uplink_over_ideal"] for s in rows]))
        diagnostics = [{k: s[k] for k in ("uplink_s", "uplink_over_ideal", "remote_rx_lag_s", "local_throttled_s",
                                          "remote_throttled_s", "local_cpu_s", "remote_cpu_s")} for s in rows]
        assert 1 - burst_s / ideal - 0.005 <= ratio <= 1.05, (split, ratio, diagnostics)


def test_nothing_is_left_after_the_run(smoke):
    _, run, _ = smoke
    _assert_nothing_left(run.environment()["run_id"])


# ----------------------------------------------------------------- a throttled UE explains itself

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_throttled_node_says_so_per_sample(backend, tmp_path):
    """A UE node with a 5 % CPU quota running the whole model: every sample
    reports CFS throttling and CPU time far below its wall time, from the
    node's own cgroup; the unthrottled run of the same model does not."""
    from rich.console import Console

    from testbed.analysis.results import RunFolder
    from testbed.sweep import SweepOptions, run_experiment

    _need_root()
    exp = yaml.safe_load(SMOKE.read_text())
    exp.update(name="throttled", splits=[31])
    exp["nodes"]["local"]["cpus"] = 0.05
    exp["runs"].update(samples=3, max_seconds=30, kpi_runs=1, layer_runs=1)
    path = tmp_path / "throttled.yaml"
    path.write_text(yaml.safe_dump(exp))
    run = RunFolder(run_experiment(path, SweepOptions(backend=backend, output=tmp_path / "out",
                                                      metrics_listen="127.0.0.1:0", progress=False),
                                   console=Console(file=io.StringIO())))
    for s in run.samples():
        assert s["local_throttled_periods"] >= 1 and s["local_throttled_s"] > 0, s
        # 5 % of the head's wall time, give or take one CFS period's slice
        assert s["local_cpu_s"] < 0.5 * s["head_s"], s


# ----------------------------------------------------------------- control plane is not shaped

@pytest.mark.parametrize("backend", BACKENDS)
def test_control_traffic_is_not_shaped(backend, tmp_path):
    """With the data link at 1 Mbit/s both ways, 1 MB over the control plane
    takes far less than the 8 s it would take on the data link, while a part
    delivered over the data link takes its bytes·8/rate."""
    import hashlib
    import secrets

    from testbed.deploy import NodeSpec, deploy
    from testbed.link.profile import Direction
    from testbed.link.shaper import Shaper
    from testbed.model.splitter import split_model
    from testbed.model.zoo import resolve

    _need_root()
    model = resolve({"builtin": "posenet"})
    manifest = split_model(model, [30], tmp_path)
    tail = (tmp_path / manifest["splits"][0]["tail"]).read_bytes()  # ~130 KB, a real model
    run_id, token = "tbt" + secrets.token_hex(3), secrets.token_urlsafe(16)
    rate = 1_000_000
    with deploy(run_id, NodeSpec(cpus=1), NodeSpec(cpus=1), backend=backend, token=token) as dep:
        local, remote = dep.local.client(token), dep.remote.client(token)
        shapers = [Shaper(node.shaping) for node in (dep.local, dep.remote)]
        try:
            for shaper in shapers:
                shaper.apply(Direction(rate_bps=rate))
            local.connect_peer(dep.remote.data_host, dep.remote.data_port)
            blob = secrets.token_bytes(1_000_000)
            t0 = time.monotonic()
            remote.stage_part(blob, hashlib.sha256(blob).hexdigest())
            control_s = time.monotonic() - t0
            rtts = []
            for _ in range(5):
                t0 = time.monotonic()
                local.health()
                rtts.append(time.monotonic() - t0)
            timing = remote.deliver_part(local, tail, hashlib.sha256(tail).hexdigest(), role="tail")
        finally:
            for shaper in shapers:
                shaper.clear()
                shaper.close()
    on_data_link = len(tail) * 8 / rate
    assert timing["delivery_s"] >= 0.9 * on_data_link, timing  # the data link IS shaped
    assert control_s < 1_000_000 * 8 / rate / 8, control_s     # 1 MB at 1 Mbit/s would take 8 s
    assert float(np.median(rtts)) < 0.1, rtts
    _assert_nothing_left(run_id)


# ----------------------------------------------------------------- SIGINT mid-run

@pytest.mark.parametrize("backend", BACKENDS)
def test_sigint_mid_run_tears_down_and_exits_130(backend, tmp_path):
    _need_root()
    exp = yaml.safe_load(SMOKE.read_text())
    exp["name"] = "sigint"
    exp["runs"].update({"samples": 100000, "max_seconds": 120})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(exp))
    testbed = Path(sys.executable).with_name("testbed")
    proc = subprocess.Popen([str(testbed), "run", str(path), "--backend", backend, "--output", str(tmp_path / "out"),
                             "--metrics-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    run_id = None
    deadline = time.monotonic() + 300
    err_lines: list[str] = []
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            err_lines.append(line)
            m = re.search(r"run id: (\S+)", line)
            if m:
                run_id = m.group(1)
                break
        assert run_id, "".join(err_lines)
        # let it get into the configurations (layers profiled, samples running)
        run_dir = next((tmp_path / "out").iterdir())
        while time.monotonic() < deadline and not (run_dir / "layers.csv").exists():
            time.sleep(0.2)
        time.sleep(2.0)
        assert proc.poll() is None, "run ended before the signal"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(err_lines) + err
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()
    _assert_nothing_left(run_id)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["run_id"] == run_id


# ----------------------------------------------------------------- runs.repeat

def test_repeats_land_in_one_folder_in_the_recorded_order_and_resume(tmp_path):
    """repeat: 2 — every configuration twice in one run folder, in the order the
    recorded seed gives; dropping the last summary row and resuming measures
    exactly that (repeat, profile, split) again."""
    import shutil

    from rich.console import Console

    from testbed.analysis.results import RunFolder
    from testbed.sweep import Plan, SweepOptions, run_experiment

    _need_root()
    exp = yaml.safe_load(SMOKE.read_text())
    exp.update(name="repeats", splits=[0, 12, 31])
    exp["runs"].update(samples=2, repeat=2, seed=11, kpi_runs=1, layer_runs=1)
    path = tmp_path / "repeats.yaml"
    path.write_text(yaml.safe_dump(exp))
    opts = dict(backend="netns", metrics_listen="127.0.0.1:0", progress=False)
    run = RunFolder(run_experiment(path, SweepOptions(output=tmp_path / "out", **opts),
                                   console=Console(file=io.StringIO())))
    assert run.config()["order_seed"] == 11
    order = [(r["repeat"], r["profile"], r["split"]) for r in run.summary()]
    from types import SimpleNamespace
    profiles = [SimpleNamespace(name=p["name"]) for p in run.config()["resolved_profiles"]]
    expected = Plan(SimpleNamespace(runs=SimpleNamespace(repeat=2)), profiles, path, None, [0, 12, 31], seed=11)
    assert order == [c.key for c in expected.configurations]
    assert len(run.configurations()) == 3 and all(r["repeats"] == 2 for r in run.configurations())
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    lines = (copy / "summary.csv").read_text().splitlines(keepends=True)
    (copy / "summary.csv").write_text("".join(lines[:-1]))
    run_experiment(path, SweepOptions(resume=copy, **opts), console=Console(file=io.StringIO()))
    again = RunFolder(copy)
    assert [(r["repeat"], r["profile"], r["split"]) for r in again.summary()] == order


# ----------------------------------------------------------------- --resume

@pytest.mark.parametrize("smoke", ["netns"], indirect=True)  # backend-independent: once is enough
def test_resume_measures_only_what_is_missing(smoke, tmp_path):
    """Drop the last configuration's summary row (as if killed after its samples
    were written): --resume measures exactly that configuration again."""
    import shutil

    from rich.console import Console

    from testbed.analysis.results import RunFolder
    from testbed.sweep import SweepOptions, run_experiment

    backend, run, _ = smoke
    copy = tmp_path / run.path.name
    shutil.copytree(run.path, copy)
    lines = (copy / "summary.csv").read_text().splitlines(keepends=True)
    (copy / "summary.csv").write_text("".join(lines[:-1]))
    dropped = run.summary()[-1]
    before = [s for s in run.samples() if (s["profile"], s["split"]) != (dropped["profile"], dropped["split"])]
    run_experiment(SMOKE, SweepOptions(resume=copy, backend=backend, metrics_listen="127.0.0.1:0", progress=False),
                   console=Console(file=io.StringIO()))
    again = RunFolder(copy)
    assert again.finished() == run.finished()
    samples = again.samples()
    redone = [s for s in samples if (s["profile"], s["split"]) == (dropped["profile"], dropped["split"])]
    assert len(redone) == again.summary()[-1]["count"]
    assert samples[:len(before)] == before  # finished configurations untouched
    assert len(again.layers()) == len(run.layers())  # layers profiled once per run
    assert len(again.environment()["resumed"]) == 1
    _assert_nothing_left(again.environment()["resumed"][0]["run_id"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float16_model_sweeps_with_computing_layers_only(backend, tmp_path):
    """PoseNet with float16 weights (62 DEQUANTIZE ops on constants folded into the
    31 convolutions that read them): three split points measured on real nodes,
    per-layer latency for the 31 computing layers only, the cut never a weight."""
    from rich.console import Console

    from testbed.analysis.results import RunFolder
    from testbed.sweep import SweepOptions, run_experiment

    _need_root()
    exp = yaml.safe_load(SMOKE.read_text())
    exp.update(name="fp16", model={"builtin": "posenet", "scheme": "float16"}, splits=[0, 12, 31])
    exp["runs"].update(samples=2, kpi_runs=1, layer_runs=2)
    path = tmp_path / "fp16.yaml"
    path.write_text(yaml.safe_dump(exp))
    run = RunFolder(run_experiment(path, SweepOptions(backend=backend, output=tmp_path / "out",
                                                      metrics_listen="127.0.0.1:0", progress=False),
                                   console=Console(file=io.StringIO())))
    manifest = run.manifest()
    assert manifest["model"]["layers"] == 31 and manifest["model"]["folded_ops"] == 62
    layers = run.layers()
    assert sorted((r["node"], r["layer"]) for r in layers) == sorted(
        (n, i) for n in ("local", "remote") for i in range(31))
    assert "DEQUANTIZE" not in {r["op"] for r in layers}
    assert {r["split"] for r in run.summary()} == {0, 12, 31}
    cut12 = next(s for s in manifest["splits"] if s["k"] == 12)["cut"]
    assert len(cut12) == 1 and cut12[0]["dtype"] == "float32"  # an activation, not a weight
    _assert_nothing_left(run.environment()["run_id"])
