"""The split-point planner: hand-computed predictions, the choice moving with
bandwidth, inputs read from result files, and judging against measurements."""

from __future__ import annotations

import json

import pytest

from testbed.analysis import planner
from testbed.analysis.planner import Link, ModelProfile, best, predict
from testbed.errors import ConfigError, TestbedError
from tests.unit.report_synthetic_run import make_run

pytestmark = pytest.mark.unit

# 3 layers; the local node is 10x slower than the remote one.
MODEL = ModelProfile(local_s=(0.010, 0.010, 0.010), remote_s=(0.001, 0.001, 0.001),
                     cut_bytes={0: 1_000_000, 1: 100_000, 2: 1_000}, result_bytes=100)


def _link(rate_bps: float, delay_s: float = 0.0) -> Link:
    return Link(f"{rate_bps:g}", rate_bps, delay_s, rate_bps, delay_s)


def test_hand_computed_prediction_with_delay():
    preds = {p.split: p for p in predict(MODEL, Link("l", 8_000_000, 0.005, 16_000_000, 0.010))}
    # k=1: head 10 ms; up 100 kB·8/8 Mbit = 100 ms + 5 ms; tail 2 ms; down 100 B·8/16 Mbit = 0.05 ms + 10 ms
    assert preds[1].head_s == pytest.approx(0.010)
    assert preds[1].uplink_s == pytest.approx(0.105)
    assert preds[1].tail_s == pytest.approx(0.002)
    assert preds[1].downlink_s == pytest.approx(0.01005)
    assert preds[1].e2e_s == pytest.approx(0.12705)
    # k=N (device anchor): nothing crosses the link, not even the delay
    assert preds[3].e2e_s == pytest.approx(0.030) and preds[3].uplink_s == preds[3].downlink_s == 0
    # k=0 (network anchor): the input crosses; all layers remote
    assert preds[0].e2e_s == pytest.approx(0 + 1.0 + 0.005 + 0.003 + 0.01005)


@pytest.mark.parametrize("rate_bps, expected", [
    (100e6, 1),   # k=1: 10 + 8 + 2 + 0.008 = 20.008 ms beats k=2: 21.088 ms
    (10e6, 2),    # k=1: 92.08 ms; k=2: 20 + 0.8 + 1 + 0.08 = 21.88 ms
    (1e6, 2),     # k=2: 20 + 8 + 1 + 0.8 = 29.8 ms, just under the device's 30 ms
    (0.5e6, 3),   # k=2: 38.6 ms; everything on the device wins
])
def test_best_split_moves_toward_the_device_as_bandwidth_drops(rate_bps, expected):
    assert best(predict(MODEL, _link(rate_bps))).split == expected


def test_tie_goes_to_the_larger_split():
    m = ModelProfile((0.01, 0.01), (0.01, 0.01), {0: 0, 1: 0}, 0)
    assert best(predict(m, Link("free"))).split == 2


def test_unshaped_direction_costs_only_its_delay():
    link = Link("half", uplink_rate_bps=None, uplink_delay_s=0.002, downlink_rate_bps=8e6, downlink_delay_s=0.0)
    p = {x.split: x for x in predict(MODEL, link)}
    assert p[0].uplink_s == pytest.approx(0.002)
    assert p[0].downlink_s == pytest.approx(100 * 8 / 8e6)


def test_ad_hoc_link_from_human_units():
    link = planner.link_from_args("5mbit", "20mbit", "10ms")
    assert (link.uplink_rate_bps, link.downlink_rate_bps) == (5_000_000, 20_000_000)
    assert link.uplink_delay_s == link.downlink_delay_s == pytest.approx(0.010)
    with pytest.raises(ConfigError, match="--uplink"):
        planner.link_from_args("5 mbps", None)
    with pytest.raises(ConfigError):
        planner.link_from_args(None, None)


def test_profile_by_name_from_netem_profiles():
    link = planner.link_from_profile("ladder-10mbit")
    assert link.uplink_rate_bps == 10_000_000 and link.name == "ladder-10mbit"


def test_model_from_a_run_folder_uses_wire_bytes_and_the_manifest(tmp_path):
    run = make_run(tmp_path)
    m = planner.model_from_run(run, calibrate=False)
    assert m.num_layers == 6
    assert m.cut_bytes[0] == 600_000 + 64          # measured wire bytes replace the manifest's raw bytes
    assert m.result_bytes == 2_000 + 64
    assert m.local_s[3] == pytest.approx(0.025)


def test_calibration_scales_layers_to_the_whole_model_kpi(tmp_path):
    run = make_run(tmp_path)
    base = planner.model_from_files(run / "layers.csv", run / "manifest.json", calibrate=False)
    parts = [{"node": "local", "part": "head", "split": 6, "steady_mean_s": 2 * sum(base.local_s)},
             {"node": "remote", "part": "tail", "split": 0, "steady_mean_s": sum(base.remote_s)}]
    cal = planner.model_from_files(run / "layers.csv", run / "manifest.json", parts_rows=parts, calibrate=True)
    assert cal.calibration["local"] == pytest.approx(2.0) and cal.calibration["remote"] == pytest.approx(1.0)
    assert sum(cal.local_s) == pytest.approx(2 * sum(base.local_s))


def test_missing_inputs_are_one_clear_error(tmp_path):
    run = make_run(tmp_path)
    (run / "manifest.json").rename(tmp_path / "elsewhere.json")
    with pytest.raises(TestbedError, match="manifest"):
        planner.model_from_files(run / "layers.csv")
    m = planner.model_from_files(run / "layers.csv", tmp_path / "elsewhere.json")
    assert m.num_layers == 6
    only_local = tmp_path / "local.csv"
    only_local.write_text("\n".join(line for line in (run / "layers.csv").read_text().splitlines()
                                    if not line.startswith("remote")) + "\n")
    with pytest.raises(TestbedError, match="remote"):
        planner.model_from_files(only_local, tmp_path / "elsewhere.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"layers": 9}, "splits": []}))
    with pytest.raises(TestbedError, match="9 layers"):
        planner.model_from_files(run / "layers.csv", bad)


def test_evaluate_predicts_measurements_and_finds_the_best_split(tmp_path):
    ev = planner.evaluate(make_run(tmp_path))
    assert len(ev.configurations) == 14
    assert max(abs(c["error_pct"]) for c in ev.configurations) < 5
    choices = {c["profile"]: c for c in ev.choices}
    assert choices["fast"]["chosen_split"] == 1 and choices["slow"]["chosen_split"] == 6
    assert ev.worst_ratio() == pytest.approx(1.0)
    # Among offloading points only, 'slow' must pick k=5 (10 kB cut) and that is the measured best too.
    assert choices["slow"]["offload_chosen_split"] == choices["slow"]["offload_best_split"] == 5


def test_evaluate_judges_a_wrong_choice_by_measured_time(tmp_path):
    run = make_run(tmp_path)
    # A planner that believes the local node is free always keeps everything local.
    wrong = planner.model_from_run(run, calibrate=False)
    wrong = ModelProfile(tuple(0.0 for _ in wrong.local_s), wrong.remote_s, wrong.cut_bytes, wrong.result_bytes)
    ev = planner.evaluate(run, wrong)
    fast = next(c for c in ev.choices if c["profile"] == "fast")
    assert fast["chosen_split"] == 6
    assert fast["ratio_mean"] == pytest.approx(fast["chosen_e2e_mean_s"] / fast["best_e2e_mean_s"])
    assert fast["ratio_mean"] > 1.4
