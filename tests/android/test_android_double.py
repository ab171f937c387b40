"""The Android path end to end against the device double, through the real adb server and adbutils.

``testbed android devices|check|profile|parse``, a sweep with ``backend: android`` (composed
e2e, device state, phone folder removed), and the faults: no such phone, several phones,
unauthorized, offline, a binary for another ABI or not executable, /data/local/tmp full, a
model the phone's runtime refuses, and the phone unplugged mid-run (configuration marked
failed, results kept, ``--resume`` finishes it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.android]
runner = CliRunner()


def _cli(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def _one_error_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


def test_devices_check_profile_leave_nothing_on_the_phone(double, benchmark_binary, posenet_parts: Path) -> None:
    d = double()
    code, out = _cli("android", "devices", "--json")
    assert code == 0, out
    [row] = [r for r in json.loads(out) if r["serial"] == d.serial]
    assert row["state"] == "device" and row["model"] == "Pixel 7" and row["abi"] == "arm64-v8a"
    assert row["soc"] == "Google GS201" and row["android"] == "14"

    binary = benchmark_binary()
    code, out = _cli("android", "check", "--serial", d.serial, "--benchmark-model", str(binary))
    assert code == 0, out
    assert "op profiling     yes (CSV file)" in out and "8 cores readable" in out and "status 0" in out
    assert not [n for n in d.ls() if n.startswith("testbed-")]

    code, out = _cli("android", "profile", str(posenet_parts / "head_03.tflite"), "--serial", d.serial,
                     "--benchmark-model", str(binary), "--cores", "big", "--threads", "1", "--runs", "5", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["mask"] == "c0"                                # cpu6-7: the highest cpuinfo_max_freq
    assert doc["kpis"]["steady_mean_s"] > 0 and doc["kpis"]["init_s"] > 0
    assert sorted(doc["layers_s"]) == ["0", "1", "2"]         # the op table mapped onto layer indices
    assert not [n for n in d.ls() if n.startswith("testbed-")]


@pytest.mark.parametrize("variant", [{"tool": "tflite", "legacy": True}, {"tool": "litert"}])
def test_profile_with_other_builds(double, benchmark_binary, posenet_parts: Path, variant: dict) -> None:
    d = double()
    code, out = _cli("android", "profile", str(posenet_parts / "head_03.tflite"), "--serial", d.serial,
                     "--benchmark-model", str(benchmark_binary(variant)), "--runs", "3", "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["kpis"]["steady_mean_s"] > 0
    assert doc["tool"] == variant["tool"]
    assert (len(doc["layers_s"]) == 3) == (variant["tool"] == "tflite")   # the LiteRT tool has no op profiling


def test_parse_saved_output(tmp_path: Path) -> None:
    fixture = Path(__file__).with_name("fixtures") / "tflite_profile_stdout.txt"
    code, out = _cli("android", "parse", str(fixture), "--json")
    assert code == 0, out
    assert json.loads(out)["kpis"]["steady_mean_s"] == pytest.approx(3085.72e-6)
    junk = tmp_path / "junk.log"
    junk.write_text("hello\n")
    code, out = _cli("android", "parse", str(junk))
    assert code == 1 and "not benchmark_model output" in _one_error_line(out)


def test_faults_are_one_line_naming_the_phone(double, benchmark_binary, posenet_parts: Path, tmp_path: Path) -> None:
    d = double()
    head = str(posenet_parts / "head_03.tflite")
    code, out = _cli("android", "check", "--serial", "127.0.0.1:9", "--benchmark-model", str(benchmark_binary()))
    assert code == 1 and "phone 127.0.0.1:9: not attached" in _one_error_line(out)

    double()                                                   # a second phone: auto cannot choose
    code, out = _cli("android", "check")
    assert code == 1 and "several phones attached" in _one_error_line(out)

    x86 = benchmark_binary(abi="x86_64", name="bm_x86")
    code, out = _cli("android", "profile", head, "--serial", d.serial, "--benchmark-model", str(x86))
    line = _one_error_line(out)
    assert code == 1 and f"phone {d.serial}" in line and "built for x86_64" in line and "arm64-v8a" in line
    assert not [n for n in d.ls() if n.startswith("testbed-")]

    not_elf = tmp_path / "script.sh"
    not_elf.write_text("#!/bin/sh\n")
    code, out = _cli("android", "profile", head, "--serial", d.serial, "--benchmark-model", str(not_elf))
    assert code == 1 and "not an Android executable" in _one_error_line(out)

    from tests.unit.model_samples import custom_op_model
    refused = tmp_path / "custom.tflite"
    refused.write_bytes(custom_op_model())
    code, out = _cli("android", "profile", str(refused), "--serial", d.serial, "--benchmark-model",
                     str(benchmark_binary()), "--runs", "2")
    line = _one_error_line(out)
    assert code == 1 and f"phone {d.serial}: benchmark_model refused model.tflite" in line
    assert not [n for n in d.ls() if n.startswith("testbed-")]


def test_unauthorized_offline_and_full_phones(double, benchmark_binary, posenet_parts: Path) -> None:
    u = double("--unauthorized")
    code, out = _cli("android", "check", "--serial", u.serial)
    assert code == 1 and "unauthorized" in _one_error_line(out) and "Allow USB debugging" in out
    u.stop()
    full = double("--set", "data_capacity_kb=1000")
    code, out = _cli("android", "profile", str(posenet_parts / "head_31.tflite"), "--serial", full.serial,
                     "--benchmark-model", str(benchmark_binary()))
    line = _one_error_line(out)
    assert code == 1 and f"phone {full.serial}: /data/local/tmp is full" in line
    assert not [n for n in full.ls() if n.startswith("testbed-")]


def test_offline_phone(double, adb_server) -> None:
    off = double("--offline", connect=False)
    try:
        adb_server.connect(off.serial)
    except Exception:  # noqa: BLE001 - adb may answer with an error; the state is what counts
        pass
    code, out = _cli("android", "check", "--serial", off.serial)
    line = _one_error_line(out)
    assert code == 1 and f"phone {off.serial}" in line and ("offline" in line or "not attached" in line)


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sweep's remote node needs root (netns backend)")


def _experiment(tmp_path: Path, binary: Path, serial: str, splits: str) -> Path:
    exp = tmp_path / "android.yaml"
    exp.write_text(f"""name: android-test
model: {{builtin: posenet}}
splits: {splits}
nodes:
  local: {{backend: android, serial: "{serial}", benchmark_model: {binary}, threads: 1, cores: big}}
  remote: {{backend: netns}}
network: [ladder-100mbit]
runs: {{warmup: 1, samples: 4, kpi_runs: 4, layer_runs: 2, max_seconds: 20}}
metrics: {{listen: "127.0.0.1:0"}}
output: {tmp_path / "results"}
""")
    return exp


def test_sweep_composes_e2e_and_survives_an_unplugged_phone(double, benchmark_binary, tmp_path: Path) -> None:
    _need_root()
    from testbed.analysis.results import RunFolder

    # benchmarks: 1 the whole model (layers.csv), 2 head k=2, 3 head k=3 <- unplugged here
    d = double("--disconnect-after", "2")
    exp = _experiment(tmp_path, benchmark_binary(), d.serial, "[0, 2, 3, 31]")
    code, out = _cli("run", str(exp))
    assert code == 1, out
    assert f"phone {d.serial}" in out and "marked failed" in out and "--resume" in out
    run_dir = next((tmp_path / "results").iterdir())
    run = RunFolder(run_dir)
    assert [r["split"] for r in run.summary()] == [0, 2]
    assert [(f["split"], f["profile"]) for f in run.failures()] == [(3, "ladder-100mbit")]

    d.stop()                                        # plug the phone back in (same serial, same folder)
    d.args = []
    d.start()
    code, out = _cli("run", str(exp), "--resume", str(run_dir))
    assert code == 0, out
    rows = RunFolder(run_dir).summary()
    assert sorted(r["split"] for r in rows) == [0, 2, 3, 31]
    for r in rows:
        assert r["clock"] == "composed" and r["phone_serial"] == d.serial and r["phone_mask"] == "c0"
        assert r["head_source"] == ("none" if r["split"] == 0 else "phone")
        assert r["phone_temp_after_c"] >= r["phone_temp_before_c"]
    samples = RunFolder(run_dir).samples()
    assert {s["clock"] for s in samples} == {"composed"}
    heads = [s for s in samples if s["split"] == 3]
    assert all(s["head_source"] == "phone" and s["proxy_head_s"] > 0 for s in heads)
    parts = {(p["split"], p["part"]): p for p in RunFolder(run_dir).parts()}
    assert parts[(3, "head")]["node"] == "phone" and parts[(3, "head")]["steady_mean_s"] > 0
    local_layers = [r for r in RunFolder(run_dir).layers() if r["node"] == "local"]
    assert len(local_layers) == 31 and all(r["mean_s"] > 0 for r in local_layers)
    env = RunFolder(run_dir).environment()
    assert env["android"]["phone"]["model"] == "Pixel 7" and env["android"]["mask"] == "c0"
    # The resumed session removed its own folder; the unplugged one's is left for `testbed cleanup`
    # (a later run removes it by itself once the process that made it is gone; here it is this one).
    [left] = [n for n in d.ls() if n.startswith("testbed-")]
    code, out = _cli("cleanup", "--run", left.removeprefix("testbed-"))
    assert code == 0 and f"phone {d.serial}: /data/local/tmp/{left}" in out
    assert not [n for n in d.ls() if n.startswith("testbed-")]


def test_cleanup_removes_what_a_killed_run_left(double, adb_server) -> None:
    d = double()
    left = d.root / "data/local/tmp/testbed-dead01"
    left.mkdir(parents=True)
    (left / "benchmark_model").write_bytes(b"x")
    code, out = _cli("cleanup", "--run", "dead01")
    assert code == 0, out
    assert f"phone {d.serial}: /data/local/tmp/testbed-dead01" in out
    assert not left.exists()
